"""Generation: KV cache == no cache (greedy), seeded determinism, streaming, `generate` command."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.inference.generation import GenerationSettings, encode_prompt, generate_ids, generate_text
from llmlab.inference.loading import load_for_inference

from .conftest import REPLIES


def _greedy(model, ids, use_cache, n=16):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=use_cache,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def _assert_cache_consistent(model, prompts, varied=True):
    model.eval()
    for ids in prompts:
        with torch.no_grad():
            cached, uncached = _greedy(model, ids, True), _greedy(model, ids, False)
        assert cached == uncached
        if varied:
            assert len(set(cached)) > 1  # not a degenerate constant stream


def _spread_weights(model):
    """A fresh or barely trained model is nearly uniform; random weights make greedy choices varied."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def test_kv_cache_matches_no_cache_llama(tiny_run):
    model, tok, _ = load_for_inference(tiny_run / "sft" / "final")
    prompts = [encode_prompt(tok, "Hello", True), tok("In the beginning God")["input_ids"]]
    _assert_cache_consistent(model, prompts, varied=False)
    torch.manual_seed(0)
    _assert_cache_consistent(_spread_weights(model), prompts)


def test_kv_cache_matches_no_cache_mamba2():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, expand=2,
                       state_size=16, n_groups=1, chunk_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Mamba2ForCausalLM(cfg)
    _assert_cache_consistent(model, [[5, 17, 33, 8, 60, 3]])


LLMLAB_VARIANTS = {
    "rope-gqa-swiglu": {"positional_encoding": "rope", "attention_type": "gqa", "n_kv_heads": 2},
    "alibi-mha-layernorm": {"positional_encoding": "alibi", "attention_type": "mha", "norm_type": "layernorm",
                            "activation": "gelu"},
    "sinusoidal-mqa": {"positional_encoding": "sinusoidal", "attention_type": "mqa", "n_kv_heads": 1},
    "rope-sliding-window": {"positional_encoding": "rope", "sliding_window": 4},
}


@pytest.mark.parametrize("variant", list(LLMLAB_VARIANTS))
def test_kv_cache_matches_no_cache_llmlab_transformer(variant):
    try:
        from llmlab.models.build import build_model
    except ImportError:
        pytest.skip("llmlab.models.build is not available yet")
    torch.manual_seed(0)
    cfg = {"arch": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "max_seq_len": 128,
           "norm_type": "rmsnorm", "activation": "swiglu", "tie_embeddings": True, **LLMLAB_VARIANTS[variant]}
    model = build_model(cfg, vocab_size=97)
    _assert_cache_consistent(model, [[5, 17, 33, 8, 60, 3]], varied=False)
    _assert_cache_consistent(_spread_weights(model), [[5, 17, 33, 8, 60, 3]])


def test_seeded_sampling_is_reproducible_and_streams(tiny_run):
    model, tok, is_chat = load_for_inference(tiny_run / "sft" / "final")
    s = GenerationSettings(max_new_tokens=30, temperature=1.0, seed=7)
    torch.manual_seed(123)
    before = torch.rand(1)
    pieces: list[str] = []
    # not one of the fixed replies (conftest.REPLIES), which are learnt to near-certainty: the samples vary
    prompt = "Do you like music?"
    a = generate_text(model, tok, prompt, s, is_chat, on_text=pieces.append)
    b = generate_text(model, tok, prompt, s, is_chat)
    assert a.text == b.text and a.token_ids == b.token_ids
    others = {tuple(generate_text(model, tok, prompt, s.replace(seed=k), is_chat).token_ids) for k in (8, 9, 10)}
    assert others - {tuple(a.token_ids)}  # another seed, another sample
    assert len(pieces) > 1 and "".join(pieces) == a.text  # streamed piece by piece, same text
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the global RNG was left alone
    # a chat reply stops at <|im_end|> and never shows special tokens
    g = generate_ids(model, tok, encode_prompt(tok, "Hi", True), GenerationSettings(max_new_tokens=60, temperature=0),
                     True)
    assert "<|im_end|>" not in g.text and "<|im_start|>" not in g.text
    assert g.finish_reason in ("stop", "length")


def test_generate_command_is_deterministic(tiny_run, tmp_path, capsys):
    from llmlab.commands.inference import generate_command

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n"
                       + json.dumps({"prompt": [{"role": "user", "content": "What is AI?"}]}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello"}]}) + "\n")
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}.jsonl"
        assert generate_command(tiny_run, prompts=prompts, output=out, stage="sft", seed=3,
                                max_new_tokens=20, temperature=1.0) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    rows = [json.loads(x) for x in outs[0].splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["seed"] for r in rows] == [3, 4, 5]
    assert rows[2]["prompt"] == [{"role": "user", "content": "Hi"}]  # cut before the assistant turn
    assert all(r["completion_tokens"] >= 1 for r in rows)

    capsys.readouterr()
    assert generate_command(tiny_run / "pretrain" / "final", prompt="In the beginning", seed=1,
                            max_new_tokens=10) == 0
    first = capsys.readouterr().out
    assert generate_command(tiny_run / "pretrain" / "final", prompt="In the beginning", seed=1,
                            max_new_tokens=10) == 0
    assert capsys.readouterr().out == first and first.strip()
    assert generate_command(tiny_run, prompt="x", prompts=prompts) == 2
    assert generate_command(tiny_run, prompt="x", stage="sft", top_p=0) == 2


def test_llmlab_transformer_loads_through_the_auto_classes(tiny_run, tmp_path):
    try:
        from llmlab.models.build import build_model
    except ImportError:
        pytest.skip("llmlab.models.build is not available yet")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_run / "tokenizer")
    torch.manual_seed(0)
    build_model({"arch": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128,
                 "max_seq_len": 128}, tokenizer=tok).save_pretrained(tmp_path / "final")
    tok.save_pretrained(tmp_path / "final")
    model, tok2, _ = load_for_inference(tmp_path / "final")
    assert type(model).__name__ == "LlmlabForCausalLM"
    r = generate_text(model, tok2, "In the beginning", GenerationSettings(max_new_tokens=5, seed=0), False)
    assert r.completion_tokens >= 1


def test_prompt_is_never_cut_the_reply_is_capped(tiny_run):
    """Asking for as many new tokens as the context holds once cut the prompt to one token; now the
    whole prompt is kept, the reply is capped to what is left, and the result says so."""
    from llmlab.inference.generation import PromptTooLongError, context_limit, default_max_new_tokens

    model, tok, is_chat = load_for_inference(tiny_run / "sft" / "final")
    limit = context_limit(model)
    assert limit == 256 and default_max_new_tokens(limit) == 64 and default_max_new_tokens(None) == 256
    ids = encode_prompt(tok, "What is your name?", True)
    greedy = GenerationSettings(temperature=0)
    capped = generate_ids(model, tok, ids, greedy.replace(max_new_tokens=limit), is_chat)
    assert capped.prompt_tokens == len(ids) > 1
    assert capped.completion_tokens <= limit - len(ids)
    assert capped.note and f"capped at {limit - len(ids)}" in capped.note
    # the reply is the one the full prompt gives (greedy, a length well inside the context)
    short = generate_ids(model, tok, ids, greedy.replace(max_new_tokens=20), is_chat)
    assert short.note is None and capped.token_ids[:len(short.token_ids)] == short.token_ids
    default = generate_ids(model, tok, ids, greedy, is_chat)  # no length asked: the default, no note
    assert default.note is None and default.completion_tokens <= 64
    with pytest.raises(PromptTooLongError, match="256"):
        generate_ids(model, tok, list(ids) * (limit // len(ids) + 1), greedy, is_chat)


def test_different_prompts_get_different_replies_and_stop_strings_cut(tiny_run):
    from llmlab.inference.generation import generate_batch

    model, tok, is_chat = load_for_inference(tiny_run / "sft" / "final")
    greedy = GenerationSettings(max_new_tokens=24, temperature=0)
    prompts = [encode_prompt(tok, p, True) for p in ("Hello", "How are you?", "What is your name?")]
    alone = [generate_ids(model, tok, p, greedy, True) for p in prompts]
    assert [r.text for r in alone] == [REPLIES[p] for p in ("Hello", "How are you?", "What is your name?")]
    batch = generate_batch(model, tok, prompts, greedy, True, max_new=[24, 5, 24])
    assert [r.token_ids for r in batch] == [alone[0].token_ids, alone[1].token_ids[:5], alone[2].token_ids]
    assert batch[1].finish_reason == "length" or len(alone[1].token_ids) < 5
    # a stop string ends the text before it, streamed pieces included
    text = alone[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    pieces: list[str] = []
    r = generate_ids(model, tok, prompts[0], greedy, True, on_text=pieces.append, stop=[stop])
    assert r.text == text[: text.find(stop)] and r.finish_reason == "stop" and "".join(pieces) == r.text
