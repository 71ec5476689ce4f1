"""Shared helpers for the model tests: tiny configurations that run in milliseconds on CPU."""

import pytest
import torch

# tiny matrices: threads only add overhead (and contend with parallel test runs)
torch.set_num_threads(1)

VOCAB = 64

#: the base tiny transformer (gqa, rope, rmsnorm, swiglu); variants change one component
BASE = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)

#: every value of every component, one change from BASE at a time
VARIANTS = {
    "pe_sinusoidal": dict(positional_encoding="sinusoidal"),
    "pe_rope": dict(positional_encoding="rope", rope_theta=500.0),
    "pe_alibi": dict(positional_encoding="alibi"),
    "pe_alibi_6heads": dict(positional_encoding="alibi", d_model=48, n_heads=6, n_kv_heads=3),
    "pe_yarn": dict(positional_encoding="yarn", rope_scaling={"factor": 4.0, "original_max_seq_len": 16}),
    "norm_layernorm": dict(norm_type="layernorm"),
    "norm_rmsnorm": dict(norm_type="rmsnorm", norm_eps=1e-6),
    "attn_mha": dict(attention_type="mha", n_kv_heads=4),
    "attn_mqa": dict(attention_type="mqa", n_kv_heads=1),
    "attn_gqa": dict(attention_type="gqa", n_kv_heads=2),
    "sliding_window": dict(sliding_window=3),
    "sliding_window_alibi": dict(sliding_window=4, positional_encoding="alibi"),
    "attention_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "act_relu": dict(activation="relu"),
    "act_gelu": dict(activation="gelu"),
    "act_leaky_relu": dict(activation="leaky_relu"),
    "act_silu": dict(activation="silu"),
    "act_swiglu": dict(activation="swiglu"),
    "dropout": dict(dropout=0.1),
    "untied": dict(tie_embeddings=False),
    "moe": dict(n_experts=4, experts_per_token=2),
    "moe_plain_sinusoidal": dict(n_experts=3, experts_per_token=1, activation="gelu", positional_encoding="sinusoidal"),
}


def tiny_cfg(**overrides) -> dict:
    """A recipe ``model:`` section for a tiny transformer."""
    cfg = {"arch": "transformer", **BASE}
    cfg.update(overrides)
    return cfg


def make_model(seed: int = 0, **overrides):
    """A tiny LlmlabForCausalLM in eval mode, seeded."""
    from llmlab.models.build import build_model

    torch.manual_seed(seed)
    model = build_model(tiny_cfg(**overrides), vocab_size=VOCAB)
    return model.eval()


@pytest.fixture(params=sorted(VARIANTS), ids=sorted(VARIANTS))
def variant(request):
    return request.param, VARIANTS[request.param]
