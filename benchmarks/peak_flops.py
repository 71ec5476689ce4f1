"""Measured peak matmul rate of this machine (the denominator of MFU), fp32 and bf16.

    python benchmarks/peak_flops.py [--size 2048] [--seconds 3] [--json]

Times square ``torch.mm`` of ``--size`` (best of several ~``--seconds`` windows, after a warm-up)
in fp32 and bf16, on CPU (all torch threads) and on CUDA when present. The best rate is the
"peak" used by pretrain_throughput.py: on a shared or small machine it is the rate the hardware
really gives a GEMM right now, not the datasheet number (which on a CPU depends on the clock and on
which AVX-512 / AMX units the kernels use).

Also importable: ``measure_peak(dtype, device, size, seconds) -> FLOP/s``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def measure_peak(dtype: torch.dtype, device: str = "cpu", size: int = 2048, seconds: float = 3.0,
                 windows: int = 3) -> float:
    """Best FLOP/s of ``size``×``size`` @ ``size``×``size`` matmuls over ``windows`` timed windows
    (also tries ``size // 2``, whose operands stay in cache longer on a small CPU; the best wins)."""
    if size >= 1024:
        return max(_measure(dtype, device, size, seconds / 2, windows), _measure(dtype, device, size // 2, seconds / 2, windows))
    return _measure(dtype, device, size, seconds, windows)


def _measure(dtype, device, size, seconds, windows) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up (oneDNN / cuBLAS heuristics, page faults)
        torch.mm(a, b, out=out)
    sync()
    flop = 2.0 * size**3
    best = 0.0
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            n += 1
            if n % 4 == 0:
                sync()
                if time.perf_counter() - t0 >= seconds / windows:
                    break
        sync()
        best = max(best, n * flop / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=3.0, help="time per dtype (split into windows)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    res = {}
    for dev in devices:
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            res[f"{dev}_{name}"] = measure_peak(dt, dev, args.size, args.seconds)
    if args.json:
        print(json.dumps(res))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"{'device/dtype':<14}{'GFLOP/s':>12}")
    for k, v in res.items():
        print(f"{k:<14}{v / 1e9:>12.1f}")
    for dev in devices:
        print(f"{dev}: bf16 / fp32 = {res[f'{dev}_bf16'] / res[f'{dev}_fp32']:.2f}x")


if __name__ == "__main__":
    main()
