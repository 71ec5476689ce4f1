"""Model FLOPs per token, the device's peak FLOP/s and model FLOPs utilisation (MFU).

MFU (Chowdhery et al. 2022, "PaLM", appendix B) is the model FLOP/s a run achieves — the FLOPs
the model's forward and backward passes need per token times the tokens per second — divided by
the device's peak FLOP/s. It counts the arithmetic the model needs, not what the kernels do
(rematerialisation, padding waste and optimizer arithmetic are not counted), so it compares runs,
tools and machines.

* :func:`flops_per_token` is pure Python (``llmlab plan`` may import it).
* :func:`peak_flops`: the datasheet peak of a known GPU (:data:`GPU_PEAK_FLOPS`), else measured
  once per machine by a short matmul micro-benchmark (:func:`measure_peak`) and cached in
  ``$XDG_CACHE_HOME/llmlab/peak_flops.json`` (default ``~/.cache/llmlab``; ``LLMLAB_CACHE_DIR``
  overrides the folder), keyed by device name, torch threads, dtype and torch version. The file is
  llmlab's own: an unreadable one is left as it is and the measurement is used uncached.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from llmlab.models.params import as_model_spec, mamba2_dims, transformer_dims

#: dense (no structured sparsity) tensor-core peaks in FLOP/s by GPU name, matched by substring in
#: this order. Sources: NVIDIA H100 datasheet (SXM: BF16/FP16 1,979 TFLOPS with sparsity = 989 dense,
#: FP32 67; PCIe: 1,513 → 756, FP32 51; NVL: 1,671 → 835, FP32 60), H200 datasheet (as H100 SXM),
#: A100 datasheet (BF16/FP16 312, FP32 19.5). fp32 is the non-tensor-core FP32 rate (llmlab does not
#: turn TF32 on).
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
)


def flops_per_token(model_cfg, vocab_size: int, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) of an ``arch`` model, the PaLM count.

    Transformer (Chowdhery et al. 2022, PaLM, appendix B; Kaplan et al. 2020, table 1):
    ``6 * N + 12 * L * H * Dh * T``, where N is the number of weights that enter a matrix multiply
    once per token — q, k, v and o projections, the feed-forward (for a mixture of experts the
    router and the ``experts_per_token`` active experts only) and the LM head (V * D, counted also
    when tied to the embedding); the embedding lookup, norms and biases are not counted — L the
    layers, H * Dh the attention width and T = ``seq_len``. 2N FLOPs forward, 4N backward;
    attention scores and their weighted sum are 4 * T * H * Dh per layer forward, twice that
    backward (every key position counted, causal masking ignored, as PaLM does). torch's
    ``FlopCounterMode`` counts the same (tests/train/test_flops.py).

    Mamba2 (Dao & Gu 2024): ``6 * N + 12 * L * I * S``: N is in_proj (D x (2I + 2GS + heads)),
    out_proj (I x D), the depthwise conv1d (conv_dim x kernel: one multiply-add per weight per
    token) and the LM head; the scan term is the recurrent form of the SSM, per layer and token
    I * S multiply-adds to update the state and I * S to read it out (4 * I * S FLOPs forward, x3
    with backward), I = expand * D, S = state_size. The chunked SSD kernels do somewhat more (the
    intra-chunk quadratic part); that is hardware work, not model FLOPs. The scan term is 4 % of the
    total at d_model 768 and 30 % at d_model 64 (state_size 64, vocabulary 4,096 and 100), so it is
    kept.

    Args:
        model_cfg: a ``model:`` section (dict or spec) with ``arch`` transformer or mamba2.
        vocab_size: the embedding rows V (the model's ``config.vocab_size``).
        seq_len: the training context T in tokens.

    Returns:
        FLOPs per token (an int).

    Raises:
        ValueError: a ``from_pretrained`` section (its shapes are known only once loaded).
    """
    spec = as_model_spec(model_cfg)
    arch = getattr(spec, "arch", None)
    v, t = int(vocab_size), int(seq_len)
    if arch == "transformer":
        k = transformer_dims(spec)
        d, width, kv_width = k["d_model"], k["n_heads"] * k["head_dim"], k["n_kv_heads"] * k["head_dim"]
        ffn = (3 if k["gated"] else 2) * d * k["d_ff"]
        if k["n_experts"]:
            ffn = ffn * k["experts_per_token"] + d * int(k["n_experts"])
        n = k["n_layers"] * (2 * d * width + 2 * d * kv_width + ffn) + v * d
        return 6 * n + 12 * k["n_layers"] * width * t
    if arch == "mamba2":
        k = mamba2_dims(spec)
        d, inner = k["d_model"], k["intermediate"]
        per_layer = d * k["in_proj"] + inner * d + k["conv_dim"] * k["conv_kernel"]
        n = k["n_layers"] * per_layer + v * d
        return 6 * n + 12 * k["n_layers"] * inner * k["state_size"]
    raise ValueError("FLOPs per token need model.arch transformer or mamba2 (a from_pretrained model's "
                     "shapes are known only once it is loaded)")


def stage_flops_per_token(stage, model) -> int | None:
    """:func:`flops_per_token` of the model a training ``stage`` trains (its vocabulary from
    ``model.config``, T its ``seq_len``); None for a ``from_pretrained`` model. The count is the
    language model's whatever the stage does with it: a reward model's score head, LoRA's frozen
    weights (no weight gradients) and a DPO reference model's forwards are not told apart."""
    spec = stage.ctx.model_spec
    if getattr(spec, "arch", None) is None:  # from_pretrained
        return None
    return flops_per_token(spec, int(model.config.vocab_size), int(stage.ctx.plan.training.seq_len))


def gpu_peak_flops(name: str, dtype: str) -> float | None:
    """Datasheet peak FLOP/s of GPU ``name`` (``torch.cuda.get_device_name()``) for ``dtype``
    (bf16 | fp16 | fp32), or None when the GPU is not in :data:`GPU_PEAK_FLOPS`."""
    for key, peaks in GPU_PEAK_FLOPS:
        if key.lower() in name.lower():
            return peaks[dtype]
    return None


def measure_peak(dtype, device: str = "cpu", size: int = 2048, seconds: float = 3.0, windows: int = 3,
                 cpu_time: bool = False) -> float:
    """Best FLOP/s of ``size`` x ``size`` @ ``size`` x ``size`` matmuls (``torch.mm``) over ``windows``
    timed windows after a warm-up; for ``size`` >= 1024 also ``size // 2``, whose operands stay in
    cache longer on a small CPU (the best wins). Takes about ``seconds``.

    ``cpu_time`` (CPU only): time each window by the CPU time the process used divided by torch's
    threads instead of the wall clock, so time slices other processes take on a shared machine do
    not count: the rate the cores give when they run this process."""
    if size >= 1024:
        return max(_measure(dtype, device, size, seconds / 2, windows, cpu_time),
                   _measure(dtype, device, size // 2, seconds / 2, windows, cpu_time))
    return _measure(dtype, device, size, seconds, windows, cpu_time)


def _measure(dtype, device: str, size: int, seconds: float, windows: int, cpu_time: bool = False) -> float:
    import torch

    threads = torch.get_num_threads()

    def busy(wall0: float, cpu0: float) -> float:
        wall = time.perf_counter() - wall0
        return min(wall, (time.process_time() - cpu0) / threads) if cpu_time else wall

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up (oneDNN / cuBLAS heuristics, page faults)
        torch.mm(a, b, out=out)
    sync()
    flop, best = 2.0 * size**3, 0.0
    for _ in range(windows):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            torch.mm(a, b, out=out)
            n += 1
            if n % 4 == 0:
                sync()
                if time.perf_counter() - t0 >= seconds / windows:
                    break
        sync()
        best = max(best, n * flop / max(busy(t0, c0), 1e-9))
    return best


def cache_file() -> Path:
    """``$LLMLAB_CACHE_DIR/peak_flops.json``, else ``$XDG_CACHE_HOME/llmlab/peak_flops.json``, else
    ``~/.cache/llmlab/peak_flops.json``."""
    root = os.environ.get("LLMLAB_CACHE_DIR")
    if root:
        return Path(root) / "peak_flops.json"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llmlab" / "peak_flops.json"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``; else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _read_cache(path: Path) -> dict | None:
    """The cache's entries; {} when there is none; None when the file is not llmlab's JSON object."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and all(isinstance(v, (int, float)) for v in data.values()) else None


def cached_peak(key: str, measure) -> float:
    """The cached peak of ``key``, else ``measure()`` (FLOP/s), stored under ``key`` (written to a
    temporary file and renamed, so a reader never sees half a file). An unreadable cache file is
    left untouched."""
    path = cache_file()
    cache = _read_cache(path)
    if cache is not None and key in cache and cache[key] > 0:
        return float(cache[key])
    value = float(measure())
    if cache is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**cache, key: value}, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the measurement still serves this run
    return value


#: how the CPU peak is measured, part of its cache key (a new method measures again): the best of 40
#: windows of about 25 ms, each timed by the process's CPU time per thread. On 2 cores at load average
#: 4, wall-clock windows read 52-60 GFLOP/s fp32 and 140-198 bf16; CPU-time windows 92-98 and 203,
#: as wall-clock windows on the quiet machine (94 and 209, docs/performance.md)
_CPU_METHOD = "cpu-time best of 40"


def peak_flops(device, precision: str) -> float:
    """Peak FLOP/s of one ``device`` (a torch device) in ``precision`` (bf16 | fp16 | fp32; mixed
    precision runs its matrix multiplies in the low precision): a known GPU's datasheet value, else
    measured once per machine (:func:`measure_peak`, about 1.5 s, with the current torch threads on a
    CPU, timed by CPU time so that other processes on the machine do not lower it) and cached
    (:func:`cached_peak`); deleting the entry from the cache file measures again. On a busy CPU the
    MFU is then the share of the hardware's rate the run got, waiting for the cores included."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = gpu_peak_flops(name, precision)
        if known is not None:
            return known
        key = f"cuda {name}|{precision}|torch {torch.__version__}"
        return cached_peak(key, lambda: measure_peak(dtype, str(device), 4096, 1.0))
    threads = torch.get_num_threads()
    key = f"cpu {cpu_name()}|threads {threads}|{precision}|torch {torch.__version__}|{_CPU_METHOD}"
    size = 512 if threads <= 4 else 1024  # large enough to keep every thread busy
    return cached_peak(key, lambda: measure_peak(dtype, "cpu", size, 1.0, windows=40, cpu_time=True))


__all__ = ["GPU_PEAK_FLOPS", "cache_file", "cached_peak", "cpu_name", "flops_per_token", "gpu_peak_flops",
           "measure_peak", "peak_flops", "stage_flops_per_token"]
