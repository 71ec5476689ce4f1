"""FLOPs per token (the PaLM count) and the device peak behind MFU (llmlab/train/flops.py)."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llmlab.models.build import build_model
from llmlab.train import flops as fl

DENSE = {"arch": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 32}
GQA_TIED = {**DENSE, "n_kv_heads": 2, "attention_type": "gqa", "d_ff": 96, "activation": "gelu", "tie_embeddings": True}
MAMBA = {"arch": "mamba2", "d_model": 64, "n_layers": 2, "max_seq_len": 32}


def test_transformer_hand_computed():
    # per layer: q, k, v, o 4*64*64 = 16,384; swiglu d_ff 192 (8/3*64 rounded up to 64): 3*64*192 = 36,864
    # N = 2 * 53,248 + lm head 100*64 = 112,896; attention 12 * 2 layers * 64 * T 32 = 49,152
    assert fl.flops_per_token(DENSE, 100, 32) == 6 * 112_896 + 49_152 == 726_528


def test_mamba2_hand_computed():
    # I = 2*64 = 128, 4 heads of 32, state 64, 1 group: conv_dim 128 + 2*64 = 256, in_proj 128 + 256 + 4 = 388
    # per layer 64*388 + 128*64 + conv 256*4 = 34,048; N = 2 * 34,048 + 100*64 = 74,496
    # scan 12 * 2 layers * 128 * 64 = 196,608
    assert fl.flops_per_token(MAMBA, 100, 32) == 6 * 74_496 + 196_608 == 643_584


@pytest.mark.parametrize("cfg", [DENSE, GQA_TIED, MAMBA], ids=["dense", "gqa_tied_gelu", "mamba2"])
def test_matmul_part_matches_torch_flop_counter(cfg):
    """torch's FlopCounterMode over a real forward + backward counts every matrix multiply: its
    ``aten.mm`` FLOPs per token are the 6N part (Mamba2: less the depthwise conv, counted apart)."""
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=100)
    x = torch.randint(0, 100, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=x, labels=x).loss.backward()
    mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm] / x.numel()
    if cfg["arch"] == "transformer":
        width = cfg["d_model"]
        assert mm == fl.flops_per_token(cfg, 100, 32) - 12 * cfg["n_layers"] * width * 32
    else:
        conv = 2 * 256 * 4  # two layers' depthwise conv weights
        assert mm == fl.flops_per_token(cfg, 100, 32) - 12 * 2 * 128 * 64 - 6 * conv


def test_moe_counts_active_experts_only():
    moe = {**DENSE, "n_experts": 4, "experts_per_token": 2}
    ffn = 3 * 64 * 192
    # one more active expert per layer and the router (64 x 4), nothing for the two idle experts
    assert fl.flops_per_token(moe, 100, 32) - fl.flops_per_token(DENSE, 100, 32) == 6 * 2 * (ffn + 64 * 4)


def test_pretrained_section_is_refused():
    with pytest.raises(ValueError, match="from_pretrained"):
        fl.flops_per_token({"from_pretrained": "/nowhere"}, 100, 32)


def test_gpu_table():
    assert fl.gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert fl.gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert fl.gpu_peak_flops("NVIDIA H200", "fp32") == 67e12
    assert fl.gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == 312e12
    assert fl.gpu_peak_flops("Tesla T4", "bf16") is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(fl, "measure_peak", lambda *a, **k: calls.append(a) or 1.5e11)
    cpu = torch.device("cpu")
    assert fl.peak_flops(cpu, "fp32") == 1.5e11
    assert fl.peak_flops(cpu, "fp32") == 1.5e11
    assert len(calls) == 1  # the second came from the cache file
    (key,) = json.loads((tmp_path / "peak_flops.json").read_text())
    assert f"threads {torch.get_num_threads()}" in key and "fp32" in key
    fl.peak_flops(cpu, "bf16")  # another dtype is another entry
    assert len(calls) == 2 and len(json.loads((tmp_path / "peak_flops.json").read_text())) == 2


def test_a_cache_file_llmlab_cannot_read_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fl, "measure_peak", lambda *a, **k: 2e11)
    (tmp_path / "peak_flops.json").write_text("not json, someone else's\n")
    assert fl.peak_flops(torch.device("cpu"), "fp32") == 2e11
    assert (tmp_path / "peak_flops.json").read_text() == "not json, someone else's\n"


@pytest.mark.parametrize("cpu_time", [False, True])
def test_measure_peak_is_positive_and_quick(cpu_time):
    assert fl.measure_peak(torch.float32, "cpu", size=64, seconds=0.05, cpu_time=cpu_time) > 0
