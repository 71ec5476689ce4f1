"""GPU paths: bf16 and flash-attn agree with fp32 SDPA; Mamba2 CUDA kernels agree with the PyTorch
path. Skipped without CUDA (and without flash-attn / mamba_ssm for those tests)."""

import importlib.util

import pytest
import torch

from tests.models.conftest import VOCAB, make_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None

CASES = {
    "rope_gqa": dict(),
    "alibi": dict(positional_encoding="alibi"),
    "window": dict(sliding_window=8),
    "alibi_window_mqa": dict(positional_encoding="alibi", sliding_window=8, attention_type="mqa", n_kv_heads=1),
    "yarn": dict(positional_encoding="yarn", rope_scaling={"factor": 2.0, "original_max_seq_len": 32}),
}


def _ids(b=2, t=64):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(0)).cuda()


def _gpu_model(dtype, backend, **over):
    model = make_model(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, **over).cuda().to(dtype)
    model.config.attn_backend = backend
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_sdpa_close_to_fp32(name):
    x = _ids()
    ref = _gpu_model(torch.float32, "sdpa", **CASES[name])
    low = _gpu_model(torch.bfloat16, "sdpa", **CASES[name])
    with torch.no_grad():
        a, b = ref(x).logits.float(), low(x).logits.float()
    err = (a - b).abs().max().item()
    print(f"bf16 vs fp32 sdpa [{name}]: max abs diff {err:.3e}")
    assert err < 0.05


@pytest.mark.skipif(not HAS_FLASH, reason="flash-attn is not installed")
@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_attn_matches_sdpa(name):
    x = _ids()
    model = _gpu_model(torch.bfloat16, "sdpa", **CASES[name])
    with torch.no_grad():
        sdpa = model(x).logits.float()
        model.config.attn_backend = "flash"
        flash = model(x).logits.float()
        # decoding with a cache through flash-attn equals its full pass
        out = model(x[:, :40], use_cache=True)
        step = model(x[:, 40:41], past_key_values=out.past_key_values, use_cache=True).logits.float()
    err = (sdpa - flash).abs().max().item()
    print(f"flash vs sdpa bf16 [{name}]: max abs diff {err:.3e}")
    assert err < 0.05
    assert (step[:, 0] - flash[:, 40]).abs().max().item() < 0.05


@pytest.mark.skipif(not HAS_FLASH, reason="flash-attn is not installed")
@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_documents_through_flash_varlen_match_the_masked_sdpa_path(name):
    """Packed rows (restarting position ids) take flash_attn_varlen_func under ``auto``; the
    per-document mask through SDPA is the reference."""
    import llmlab.models.modeling_llmlab as ml

    x = _ids()
    pos = torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)])[None].expand(2, -1).cuda()
    model = _gpu_model(torch.bfloat16, "sdpa", **CASES[name])
    with torch.no_grad():
        sdpa = model(x, position_ids=pos).logits.float()
        model.config.attn_backend = "auto"
        calls = []
        real = ml._flash_attn_varlen_func
        ml._flash_attn_varlen_func = lambda *a, **k: calls.append(1) or real(*a, **k)
        try:
            varlen = model(x, position_ids=pos).logits.float()
        finally:
            ml._flash_attn_varlen_func = real
    err = (sdpa - varlen).abs().max().item()
    print(f"flash varlen vs sdpa doc mask bf16 [{name}]: max abs diff {err:.3e}")
    assert calls and err < 0.05


def test_generate_on_gpu_with_and_without_cache():
    model = _gpu_model(torch.float32, "auto", sliding_window=8)
    x = _ids(t=12)
    with torch.no_grad():
        a = model.generate(x, max_new_tokens=16, do_sample=False, pad_token_id=0)
        b = model.generate(x, max_new_tokens=16, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_MAMBA_SSM, reason="mamba_ssm is not installed")
def test_mamba2_kernels_match_torch_path(monkeypatch):
    import transformers.models.mamba2.modeling_mamba2 as mm

    from llmlab.models.build import build_model

    torch.manual_seed(0)
    model = build_model({"arch": "mamba2", "d_model": 64, "n_layers": 2, "state_size": 16, "head_dim": 16,
                         "chunk_size": 16}, vocab_size=VOCAB).cuda().eval()
    x = _ids(t=48)
    with torch.no_grad():
        fast = model(x).logits.float()
        gen_fast = model.generate(x[:, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
    for name in ("causal_conv1d_update", "causal_conv1d_fn", "mamba2_split_conv1d_scan_combined",
                 "mamba2_selective_state_update", "mamba2_chunk_scan"):
        fn = getattr(mm, name, None)
        if fn is not None and hasattr(fn, "__wrapped__"):
            monkeypatch.setattr(mm, name, fn.__wrapped__)
    with torch.no_grad():
        slow = model(x).logits.float()
        gen_slow = model.generate(x[:, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
    err = (fast - slow).abs().max().item()
    print(f"mamba2 kernels vs torch path fp32: max abs diff {err:.3e}")
    assert err < 1e-3
    assert torch.equal(gen_fast, gen_slow)
