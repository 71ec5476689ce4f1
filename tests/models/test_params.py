"""The parameter count from the config equals the instantiated model's; memory estimate sanity."""

import subprocess
import sys

import pytest
import torch

from llmlab.models import lora_presets
from llmlab.models.params import (
    count_lora_parameters,
    count_parameters,
    estimate_training_memory,
    param_shapes,
)
from tests.models.conftest import VARIANTS, VOCAB, tiny_cfg

MAMBA2_CONFIGS = {
    "default_small": dict(d_model=32, n_layers=2),
    "groups2": dict(d_model=32, n_layers=1, n_groups=2, head_dim=8, state_size=8),
    "expand1_untied": dict(d_model=48, n_layers=2, expand=1, head_dim=16, state_size=16, tie_embeddings=False, conv_kernel=3),
}

TRANSFORMER_CONFIGS = {name: tiny_cfg(**over) for name, over in VARIANTS.items()}
TRANSFORMER_CONFIGS.update({
    "default_d_ff_swiglu": {"arch": "transformer", "d_model": 96, "n_layers": 1, "n_heads": 3},
    "default_d_ff_gelu": {"arch": "transformer", "d_model": 40, "n_layers": 1, "n_heads": 2, "activation": "gelu"},
    "moe_untied_layernorm_biases": tiny_cfg(n_experts=3, experts_per_token=2, tie_embeddings=False, norm_type="layernorm",
                                            attention_bias=True, mlp_bias=True),
})


def _model(cfg):
    from llmlab.models.build import build_model

    torch.manual_seed(0)
    return build_model(cfg, vocab_size=VOCAB)


@pytest.mark.parametrize("name", sorted(TRANSFORMER_CONFIGS))
def test_transformer_count_is_exact(name):
    cfg = TRANSFORMER_CONFIGS[name]
    model = _model(cfg)
    assert count_parameters(cfg, VOCAB) == sum(p.numel() for p in model.parameters())
    # names and shapes too, not only the total
    actual = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert dict(param_shapes(cfg, VOCAB)) == actual


@pytest.mark.parametrize("name", sorted(MAMBA2_CONFIGS))
def test_mamba2_count_is_exact(name):
    cfg = {"arch": "mamba2", **MAMBA2_CONFIGS[name]}
    model = _model(cfg)
    assert count_parameters(cfg, VOCAB) == sum(p.numel() for p in model.parameters())
    assert dict(param_shapes(cfg, VOCAB)) == {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg,preset,dora", [
    (tiny_cfg(), "all", False), (tiny_cfg(), "minimal", False), (tiny_cfg(activation="gelu"), "ffn_only", False),
    (tiny_cfg(n_experts=2), "all", False), (tiny_cfg(), "attention_only", False),
    ({"arch": "mamba2", "d_model": 32, "n_layers": 2}, "all", False),
    (tiny_cfg(), "all", True), (tiny_cfg(), "minimal", True),
])
def test_lora_count_matches_peft(cfg, preset, dora):
    """Also with DoRA's magnitude vectors (one per output feature of each adapted weight)."""
    from llmlab.models.build import apply_lora

    lora = {"preset": preset, "r": 4, "alpha": 8, "use_dora": dora}
    peft_model = apply_lora(_model(cfg), lora, lora_presets.arch_key(cfg))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert count_lora_parameters(cfg, VOCAB, lora) == trainable


def test_count_from_local_safetensors(tmp_path):
    cfg = tiny_cfg(tie_embeddings=False)
    model = _model(cfg)
    model.save_pretrained(tmp_path)
    assert count_parameters({"from_pretrained": str(tmp_path)}, None) == count_parameters(cfg, VOCAB)


def test_memory_estimate_formula():
    cfg = tiny_cfg()
    p = count_parameters(cfg, VOCAB)
    base = estimate_training_memory(cfg, VOCAB, 1, 1, p, "adamw", "fp32")
    # weights + grads + adam states dominate at one token: 4 + 4 + 8 bytes per parameter
    assert base >= 16 * p
    assert base < 16 * p + 100_000
    # activations grow linearly with tokens
    a = estimate_training_memory(cfg, VOCAB, 2, 64, p, "adamw", "fp32")
    b = estimate_training_memory(cfg, VOCAB, 4, 64, p, "adamw", "fp32")
    zero = estimate_training_memory(cfg, VOCAB, 0, 64, p, "adamw", "fp32")
    assert zero == 16 * p  # no tokens: weights + grads + AdamW states only
    assert b - a == a - zero
    # LoRA: fewer trainable -> less; bf16 activations -> less; lion < adamw; checkpointing < none
    assert estimate_training_memory(cfg, VOCAB, 2, 64, 1000, "adamw", "fp32") < a
    assert estimate_training_memory(cfg, VOCAB, 2, 64, p, "adamw", "bf16") < a
    assert estimate_training_memory(cfg, VOCAB, 2, 64, p, "lion", "fp32") < a
    assert estimate_training_memory({**cfg, "gradient_checkpointing": True}, VOCAB, 2, 64, p, "adamw", "fp32") < a


def test_memory_estimate_is_an_upper_bound_of_measured_activations():
    """The activation estimate is not below what autograd actually keeps (saved tensors)."""
    cfg = tiny_cfg(d_model=64, n_heads=4, n_kv_heads=4, d_ff=128, n_layers=2)
    model = _model(cfg).train()
    saved = {}

    def pack(t):
        saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    x = torch.randint(0, VOCAB, (2, 32))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, labels=x).loss
    measured = sum(saved.values())
    p = count_parameters(cfg, VOCAB)
    est = estimate_training_memory(cfg, VOCAB, 2, 32, p, "adamw", "fp32") - 16 * p
    assert est >= 0.5 * measured
    assert est <= 4 * measured
    loss.backward()


def test_params_module_does_not_import_torch():
    code = ("import sys; import llmlab.models.params as p; import llmlab.models.lora_presets; "
            "assert p.count_parameters({'arch': 'transformer'}, 100) > 0; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fsdp_shards_weights_grads_and_optimizer_state_but_not_activations():
    from llmlab.models.params import training_memory

    cfg = tiny_cfg()
    p = count_parameters(cfg, VOCAB)
    whole = training_memory(cfg, VOCAB, 2, 64, p, "adamw", "fp32")
    four = training_memory(cfg, VOCAB, 2, 64, p, "adamw", "fp32", shards=4)
    for part in ("weights", "grads", "optimizer"):
        assert four[part] == -(-whole[part] // 4)
    assert four["activations"] == whole["activations"]  # batch_size is per device
    assert whole["gathered"] == 0
    # the root (embeddings, norm, head) and two blocks are gathered whole at a time: fewer than all layers
    per_block = p - count_parameters({**cfg, "n_layers": cfg["n_layers"] - 1}, VOCAB)
    assert four["gathered"] == (p - cfg["n_layers"] * per_block + 2 * per_block) * 4
    assert estimate_training_memory(cfg, VOCAB, 2, 64, p, "adamw", "fp32", shards=4) == sum(four.values())
