"""Generation follows transformers' cache contract, checked on models whose replies depend on the prompt.

Each model is trained on four prompt -> continuation pairs until it gives every continuation token a
teacher-forced probability >= 0.9 (a lead of >= log 9 ~ 2.2 logits over every other token, far beyond
the ~1e-5 by which a CPU's floating-point paths move a logit), so its greedy replies are the
continuations on any CPU. The prompts differ only in their second token (and their length); every
continuation alternates a shared token with a prompt-specific one (``20 t 20 t 20 t``), so after each
``20`` the model must look back past the newest token to answer. A model that drops its KV cache between decoding steps (the
transformers 5.24 ``cache=`` rename), mis-positions left-padded rows or cuts the prompt gives a
different reply: the tests compare, through ``model.generate`` and :func:`llmlab.rl.generation.sample`,

* the greedy reply with the KV cache == without it == the trained continuation, for every prompt;
* a left-padded batch of all four prompts == each prompt alone;

and, for untrained (random) weights, the logits ``generate`` saw with its cache == a full forward.
"""

from __future__ import annotations

import pytest
import torch

from llmlab.rl.generation import cache_argument, sample
from tests.numerics import fit_to_margin, learning_note

PAD, BOS, EOS, SHARED = 0, 1, 2, 20
PROMPTS = [[BOS, 10 + i] + [4] * (1 + i) + [5, 6] for i in range(4)]  # lengths 5..8, same last tokens
CONTINUATIONS = [[SHARED, 21 + i] * 3 + [EOS] for i in range(4)]
VOCAB = 32


MARGIN_PROB = 0.9  # every continuation token's teacher-forced probability
# measured on one Zen 4 under AVX-512, AVX2 and no-SIMD kernels, mkldnn on and off: 100-300 steps
MAX_STEPS = 2000


def _batch():
    """The four pairs, right-padded: ids, attention mask, and labels on the continuation only."""
    seqs = [p + c for p, c in zip(PROMPTS, CONTINUATIONS)]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), PAD)
    labels = torch.full((len(seqs), T), -100)
    for r, (p, c) in enumerate(zip(PROMPTS, CONTINUATIONS)):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        labels[r, len(p): len(p) + len(c)] = torch.tensor(c)
    return ids, (ids != PAD).long(), labels


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _llmlab(**over):
    def build():
        from llmlab.models.build import build_model

        cfg = {"arch": "transformer", "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_seq_len": 64,
               "tie_embeddings": True, **over}
        return build_model(cfg, vocab_size=VOCAB)
    return build


MODELS = {
    "llama": _llama,
    "llmlab-rope-gqa": _llmlab(positional_encoding="rope", attention_type="gqa", n_kv_heads=2),
    "llmlab-alibi-layernorm": _llmlab(positional_encoding="alibi", norm_type="layernorm", activation="gelu"),
    "llmlab-sinusoidal-mqa": _llmlab(positional_encoding="sinusoidal", attention_type="mqa", n_kv_heads=1),
    "llmlab-sliding-window": _llmlab(positional_encoding="rope", sliding_window=6),
}


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = MODELS[request.param]()
        steps, worst = fit_to_margin(model, *_batch(), min_prob=MARGIN_PROB, max_steps=MAX_STEPS, lr=3e-3,
                                     weight_decay=0.0, check_every=50)
    finally:
        torch.set_num_threads(before)
    assert worst >= MARGIN_PROB, learning_note(
        f"{request.param} did not fit the four pairs in {steps} steps (smallest continuation-token "
        f"probability {worst:.3f} < {MARGIN_PROB}; raise MAX_STEPS)")
    return model


def _left_pad(prompts):
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), PAD)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = torch.tensor(p)
        mask[r, P - len(p):] = 1
    return ids, mask


def _generate(model, prompts, use_cache: bool) -> list[list[int]]:
    ids, mask = _left_pad(prompts)
    n = len(CONTINUATIONS[0])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             use_cache=use_cache, pad_token_id=PAD, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


def test_the_model_passes_its_cache_under_the_name_forward_takes(trained):
    assert cache_argument(trained) in ("cache", "past_key_values")


def test_generate_with_cache_equals_without_and_follows_the_prompt(trained):
    for prompt, want in zip(PROMPTS, CONTINUATIONS):
        cached = _generate(trained, [prompt], use_cache=True)[0]
        uncached = _generate(trained, [prompt], use_cache=False)[0]
        assert uncached == want  # the model learned a prompt-dependent reply
        assert cached == uncached


def test_generate_left_padded_batch_equals_each_row_alone(trained):
    alone = [_generate(trained, [p], use_cache=True)[0] for p in PROMPTS]
    assert alone == CONTINUATIONS
    assert _generate(trained, PROMPTS, use_cache=True) == alone
    assert _generate(trained, PROMPTS[::-1], use_cache=True) == alone[::-1]


def test_rl_sample_left_padded_batch_follows_each_prompt(trained):
    ids, mask = _left_pad(PROMPTS)
    comp, cmask = sample(trained, ids, mask, max_new_tokens=len(CONTINUATIONS[0]) + 3,
                         generator=torch.Generator().manual_seed(0), temperature=0.0, eos_token_id=EOS,
                         pad_token_id=PAD)
    rows = [[t for t, m in zip(c, cm) if m] for c, cm in zip(comp.tolist(), cmask.tolist())]
    assert rows == CONTINUATIONS  # greedy, stopped at EOS, one row per prompt
    # one at a time gives the same
    for p, want in zip(PROMPTS, CONTINUATIONS):
        i, m = _left_pad([p])
        c, _ = sample(trained, i, m, max_new_tokens=len(want), generator=torch.Generator().manual_seed(0),
                      temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
        assert c[0].tolist() == want


def test_rl_sample_without_a_cache_equals_with_it(trained, monkeypatch):
    """The recompute-everything path (models that return no cache) gives the same greedy replies."""
    import llmlab.rl.generation as gen

    ids, mask = _left_pad(PROMPTS)
    kw = dict(max_new_tokens=len(CONTINUATIONS[0]), generator=torch.Generator().manual_seed(0), temperature=0.0,
              pad_token_id=PAD)
    with_cache, _ = sample(trained, ids, mask, **kw)
    monkeypatch.setattr(gen, "cache_argument", lambda model: None)
    without, _ = sample(trained, ids, mask, **kw)
    assert without.tolist() == with_cache.tolist() == CONTINUATIONS


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_logits_equal_a_full_forward_for_random_weights(name):
    """Holds for any weights: each step's logits under the KV cache equal those of one forward pass over
    the prompt and the tokens generated so far (left-padded batch, so positions and masks count too)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids, mask = _left_pad(PROMPTS)
    n = len(CONTINUATIONS[0])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             use_cache=True, pad_token_id=PAD, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
        full_mask = torch.cat([mask, torch.ones(len(PROMPTS), n, dtype=torch.long)], 1)
        position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
        full = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=position_ids,
                     use_cache=False).logits
    P = ids.shape[1]
    for k, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, full[:, P - 1 + k], rtol=1e-4, atol=1e-4)
