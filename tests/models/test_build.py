"""build_model / load_causal_lm / load_reward_model / apply_lora, Hugging Face format round trips."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmlab.models.build import apply_lora, build_model, load_causal_lm, load_reward_model, mamba2_config
from llmlab.models.modeling_llmlab import LlmlabForCausalLM
from tests.models.conftest import VOCAB, make_model

REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeTokenizer:
    """What build_model reads from a tokenizer: its length and special ids."""

    pad_token_id = None
    bos_token_id = 1
    eos_token_id = 2

    def __len__(self):
        return 77


def test_build_transformer_reads_the_recipe_keys():
    cfg = {"arch": "transformer", "d_model": 48, "n_layers": 3, "n_heads": 6, "n_kv_heads": 2, "activation": "swiglu",
           "positional_encoding": "alibi", "sliding_window": 16, "tie_embeddings": False, "norm_type": "layernorm",
           "gradient_checkpointing": True, "n_experts": None}
    model = build_model(cfg, tokenizer=FakeTokenizer())
    c = model.config
    assert c.model_type == "llmlab"
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads) == (77, 48, 3, 6, 2)
    assert c.attention_type == "gqa" and c.d_ff == 128  # 8/3 * 48 = 128 (already a multiple of 64)
    assert c.sliding_window == 16 and c.positional_encoding == "alibi" and not c.tie_word_embeddings
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (2, 1, 2)  # pad falls back to eos
    assert model.model.gradient_checkpointing
    assert isinstance(model.model.norm, torch.nn.LayerNorm)


def test_build_defaults_and_determinism():
    torch.manual_seed(3)
    a = build_model({"arch": "transformer"}, vocab_size=100)
    torch.manual_seed(3)
    b = build_model({"arch": "transformer"}, vocab_size=100)
    c = a.config
    assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff, c.max_seq_len) == (256, 4, 4, 4, 704, 512)
    assert (c.positional_encoding, c.norm_type, c.activation, c.attention_type) == ("rope", "rmsnorm", "swiglu", "mha")
    assert c.tie_word_embeddings and c.norm_eps == 1e-5 and c.init_std == 0.02
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_build_rejects_keys_of_another_arch():
    with pytest.raises(ValueError, match="state_size"):
        build_model({"arch": "transformer", "state_size": 16}, vocab_size=10)
    with pytest.raises(ValueError, match="arch"):
        build_model({"arch": "rwkv"}, vocab_size=10)


def test_mamba2_mapping():
    c = mamba2_config({"arch": "mamba2", "d_model": 64, "n_layers": 3, "state_size": 16, "head_dim": 16, "expand": 2,
                       "conv_kernel": 3, "n_groups": 2, "chunk_size": 32, "tie_embeddings": False}, 50)
    assert (c.hidden_size, c.num_hidden_layers, c.num_heads, c.head_dim, c.state_size) == (64, 3, 8, 16, 16)
    assert (c.expand, c.conv_kernel, c.n_groups, c.chunk_size, c.tie_word_embeddings) == (2, 3, 2, 32, False)
    with pytest.raises(ValueError, match="head_dim"):
        mamba2_config({"arch": "mamba2", "d_model": 40, "head_dim": 32}, 50)
    with pytest.raises(ValueError, match="n_groups"):
        mamba2_config({"arch": "mamba2", "d_model": 32, "head_dim": 16, "n_groups": 3}, 50)


def test_mamba2_generate_with_and_without_cache_and_learns():
    torch.manual_seed(0)
    model = build_model({"arch": "mamba2", "d_model": 32, "n_layers": 2, "state_size": 16, "head_dim": 16,
                         "chunk_size": 8}, vocab_size=VOCAB)
    x = torch.randint(0, VOCAB, (2, 11))
    out = model(x, labels=x)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        a = model.generate(x[:, :5], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        b = model.generate(x[:, :5], max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
        # the chunked scan over a prompt longer than chunk_size equals step-by-step recurrence
        full = model(x, use_cache=False).logits
        out = model(x[:, :9], use_cache=True)
        # the cache under the name this transformers version uses (cache_params before 5.2x, cache
        # after), with the cache_position that transformers 5.0 requires for a decoding step
        name = "cache_params" if "cache_params" in out.keys() else "cache"
        step = model(x[:, 9:10], **{name: out[name]}, use_cache=True, cache_position=torch.arange(9, 10))
    assert torch.equal(a, b)
    assert torch.allclose(step.logits[:, -1], full[:, 9], atol=1e-4)


def test_save_load_roundtrip_and_auto_class(tmp_path):
    model = make_model(n_experts=2, positional_encoding="alibi")
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "modeling_llmlab.py", "configuration_llmlab.py"} <= files
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llmlab"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_llmlab.LlmlabForCausalLM"
    x = torch.randint(0, VOCAB, (2, 9))
    # llmlab imported: the Auto class loads it without trust_remote_code, as our own class
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(auto) is LlmlabForCausalLM
    loaded = load_causal_lm(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x).logits, auto(x).logits)
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert load_causal_lm(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_from_pretrained_section(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    again = build_model({"from_pretrained": str(tmp_path), "dtype": "float32"})
    x = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    assert build_model({"from_pretrained": str(tmp_path), "dtype": "bfloat16"}).dtype == torch.bfloat16
    with pytest.raises(PermissionError, match="--allow-code"):
        build_model({"from_pretrained": str(tmp_path), "trust_remote_code": True})
    assert build_model({"from_pretrained": str(tmp_path), "trust_remote_code": True}, allow_code=True) is not None


def test_pickle_checkpoints_are_refused(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    os.remove(tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        build_model({"from_pretrained": str(tmp_path)})
    with pytest.raises(OSError):
        load_causal_lm(tmp_path)


def test_reward_model_from_causal_lm(tmp_path):
    model = make_model(tie_embeddings=False)
    model.save_pretrained(tmp_path)
    rm = load_reward_model(tmp_path)
    assert rm.config.num_labels == 1 and rm.score.weight.shape == (1, 32)
    assert rm.score.weight.abs().sum() > 0  # a fresh, initialised head
    for (n, p), (m, q) in zip(rm.model.named_parameters(), model.model.named_parameters()):
        assert n == m and torch.equal(p, q)  # the body is the LM's
    rm.eval()
    x = torch.randint(1, VOCAB, (1, 6))
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long()
    with torch.no_grad():
        alone = rm(x).logits
        both = rm(torch.cat([padded, torch.cat([x, x[:, :3]], 1)]), attention_mask=torch.cat([mask, torch.ones_like(mask)])).logits
        # the score reads the last real token: hidden state at x's last token times score
        h = rm.model(x).last_hidden_state[:, -1]
    assert both.shape == (2, 1)
    assert torch.allclose(both[0], alone[0], atol=1e-5)
    assert torch.allclose(alone, rm.score(h), atol=1e-6)
    # a saved reward model keeps its trained head
    rm.save_pretrained(tmp_path / "rm")
    again = load_reward_model(tmp_path / "rm")
    assert torch.equal(again.score.weight, rm.score.weight)


def test_reward_model_error_for_mamba2(tmp_path):
    torch.manual_seed(0)
    build_model({"arch": "mamba2", "d_model": 32, "n_layers": 1}, vocab_size=VOCAB).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mamba2.*no sequence-classification"):
        load_reward_model(tmp_path)


@pytest.mark.parametrize("preset,expected", [
    ("minimal", {"q_proj", "v_proj"}),
    ("attention_only", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("ffn_only", {"gate_proj", "up_proj", "down_proj"}),
    ("all", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_apply_lora_presets(preset, expected):
    model = make_model()
    x = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        before = model(x).logits
    peft_model = apply_lora(model, {"preset": preset, "r": 4, "alpha": 8, "dropout": 0.0}, "transformer_gated")
    adapted = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert adapted == expected
    assert all(("lora_" in n) == p.requires_grad for n, p in peft_model.named_parameters())
    lora_layer = next(m for m in peft_model.modules() if isinstance(getattr(m, "scaling", None), dict))
    assert lora_layer.scaling["default"] == 2.0  # alpha / r
    with torch.no_grad():  # B starts at zero: the adapted model equals the base
        assert torch.allclose(peft_model(x).logits, before, atol=1e-6)


def test_apply_lora_errors_and_mamba2():
    mamba = build_model({"arch": "mamba2", "d_model": 32, "n_layers": 1}, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="means nothing"):
        apply_lora(mamba, {"preset": "attention_only"}, "mamba2")
    with pytest.raises(ValueError, match="PEFT cannot adapt"):
        apply_lora(mamba, {"preset": "custom", "target_modules": ["out_proj"]}, "mamba2")
    peft_model = apply_lora(mamba, {"preset": "all", "r": 2}, None)  # key derived from the config
    assert any(".in_proj.lora_A." in n for n, _ in peft_model.named_parameters())


def test_reward_model_with_lora_trains_the_head(tmp_path):
    make_model().save_pretrained(tmp_path)
    rm = load_reward_model(tmp_path)
    peft_model = apply_lora(rm, {"preset": "minimal", "r": 2}, None)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable)


REMOTE_SCRIPT = textwrap.dedent('''
    import importlib.abc, sys
    class HideLlmlab(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "llmlab" or name.startswith("llmlab."):
                raise ImportError("llmlab is not installed here")
    sys.meta_path.insert(0, HideLlmlab())
    import os
    repo = os.path.realpath(sys.argv[2])
    sys.path = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != repo]
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    d = sys.argv[1]
    try:
        AutoModelForCausalLM.from_pretrained(d, trust_remote_code=False)
        raise SystemExit("loaded custom code without trust_remote_code")
    except ValueError:
        pass
    m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    assert "llmlab" not in sys.modules
    assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
    x = torch.load(d + "/x.pt")
    with torch.no_grad():
        torch.save({"logits": m(x).logits, "gen": m.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)},
                   d + "/out.pt")
    rm = AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True, num_labels=1)
    assert rm(x).logits.shape == (x.shape[0], 1)
''')


def test_trust_remote_code_without_llmlab(tmp_path):
    model = make_model(positional_encoding="yarn", rope_scaling={"factor": 2.0, "original_max_seq_len": 32},
                       sliding_window=4, n_experts=2)
    model.save_pretrained(tmp_path)
    x = torch.randint(0, VOCAB, (2, 7))
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    proc = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path), str(REPO_ROOT)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        assert torch.equal(out["logits"], model(x).logits)
        assert torch.equal(out["gen"], model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_lora_arch_key_for_saved_llmlab_models():
    from llmlab.models import lora_presets
    from llmlab.models.build import arch_key_for_model

    assert arch_key_for_model(make_model(activation="gelu")) == "transformer_plain"
    assert arch_key_for_model(make_model()) == "transformer_gated"
    assert lora_presets.arch_key_for_model_type("llmlab", {"activation": "relu"}) == "transformer_plain"
    assert lora_presets.arch_key_for_model_type("llama") == "transformer_gated"


def test_resize_token_embeddings_keeps_tying():
    model = make_model()
    model.resize_token_embeddings(VOCAB + 6)
    assert model.config.vocab_size == VOCAB + 6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model(torch.tensor([[VOCAB + 5, 1, 2]])).logits.shape == (1, 3, VOCAB + 6)


def test_mamba2_save_and_load_causal_lm(tmp_path):
    torch.manual_seed(0)
    model = build_model({"arch": "mamba2", "d_model": 32, "n_layers": 1, "tie_embeddings": False}, vocab_size=VOCAB)
    model.save_pretrained(tmp_path)
    again = load_causal_lm(tmp_path)
    x = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_a_pretrained_model_grows_for_the_tokens_llmlab_adds(tmp_path):
    """A checkpoint whose tokenizer has no pad and no ChatML tokens: the run's tokenizer adds
    three, and the model built from the recipe's ``from_pretrained`` grows to fit (old rows kept)
    instead of failing at setup with "the model's vocabulary does not cover the tokenizer"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llmlab.data.tokenizer import _load_pretrained
    from llmlab.models.build import grow_embeddings_for

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["In the beginning God created the heaven and the earth."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=raw.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=False))
    base.save_pretrained(tmp_path)
    tok = _load_pretrained({"from_pretrained": str(tmp_path)}, [], "chatml")
    assert len(tok) == raw.get_vocab_size() + 3  # <pad>, <|im_start|>, <|im_end|>
    model = build_model({"from_pretrained": str(tmp_path), "dtype": "float32"}, tokenizer=tok)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tok)
    n = raw.get_vocab_size()
    assert torch.equal(emb[:n], base.get_input_embeddings().weight)
    assert torch.equal(head[:n], base.get_output_embeddings().weight)
    assert model.config.pad_token_id == tok.pad_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "In the beginning"}], return_tensors="pt",
                                  return_dict=True)["input_ids"]
    assert int(ids.max()) >= n and torch.isfinite(model(ids).logits).all()  # the new tokens run
    # a model that already fits is left alone
    assert not grow_embeddings_for(model, tok)
