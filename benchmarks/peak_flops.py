"""Measured peak matmul rate of this machine (the denominator of MFU), fp32 and bf16.

    python benchmarks/peak_flops.py [--size 2048] [--seconds 3] [--json]

Times square ``torch.mm`` of ``--size`` (best of several ~``--seconds`` windows, after a warm-up)
in fp32 and bf16, on CPU (all torch threads) and on CUDA when present. The best rate is the
"peak" used by pretrain_throughput.py: on a shared or small machine it is the rate the hardware
really gives a GEMM right now, not the datasheet number (which on a CPU depends on the clock and on
which AVX-512 / AMX units the kernels use).

Also importable: ``measure_peak(dtype, device, size, seconds) -> FLOP/s`` (llmlab.train.flops's, which
``llmlab run`` uses for the MFU of CPU runs and of GPUs missing from its datasheet table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # llmlab from this checkout

from llmlab.train.flops import measure_peak  # noqa: E402, F401 (re-exported for the other benchmarks)


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
