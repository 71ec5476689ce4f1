"""Rank 0's peak memory during one FSDP checkpoint save: the full state gathered to rank 0 (llmlab
before DCP) against DCP shards every rank writes (llmlab.train.dcp), 2 gloo processes on CPU; and
during the gather of ``final/``'s plain model: the full state dict gathered then copied into the
unsharded model (llmlab before 2026-12-06, ``final_state_dict``) against one parameter at a time
straight into it (:func:`llmlab.train.fsdp.gather_full_model`, ``final_per_param``).

Each mode runs in a fresh ``torchrun`` (peak RSS is per process): the model (``--d-model``,
``--layers``, vocabulary 32 000, untied) is sharded with FSDP2, takes one AdamW step, and then one
checkpoint is saved while a thread samples rank 0's RSS every 2 ms. Prints, per mode, the RSS
before the save, the peak during it, the increase and the save's wall time (noisy on a shared
machine; the RSS increase is the result).

    python benchmarks/checkpoint_rss.py            # 66 M parameters: ~2 min
    python benchmarks/checkpoint_rss.py --modes final_state_dict final_per_param
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: checkpoint saves (full, dcp) and final/ gathers (final_state_dict, final_per_param)
MODES = ("full", "dcp", "final_state_dict", "final_per_param")


def _release_freed_memory() -> None:
    """Give the heap memory freed so far (the step's gathered blocks, gradients) back to the OS
    (glibc's ``malloc_trim``), so that a save reusing it does not hide its cost from the RSS."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the increase may be understated
        pass


def bench_model(d_model: int, layers: int):
    """The benchmarks' FSDP model (also benchmarks/checkpoint_async.py): llmlab's Llama-style
    transformer, ``d_model`` wide, ``layers`` deep, 8 heads, d_ff 4 x d_model, vocab 32,000, untied."""
    from llmlab.models.build import build_model

    cfg = {"arch": "transformer", "d_model": d_model, "n_layers": layers, "n_heads": 8, "n_kv_heads": 8,
           "attention_type": "gqa", "d_ff": 4 * d_model, "max_seq_len": 64, "positional_encoding": "rope",
           "norm_type": "rmsnorm", "activation": "swiglu", "tie_embeddings": False}
    return build_model(cfg, vocab_size=32000)


def _worker(mode: str, out: Path, d_model: int, layers: int) -> None:
    """One torchrun process: shard, step, then save once or gather final/'s model in ``mode``
    (:data:`MODES`); rank 0 prints JSON."""
    import psutil
    import torch
    import torch.distributed as dist

    from llmlab.config import DistributedConfig
    from llmlab.train import checkpoint as ck
    from llmlab.train import dcp
    from llmlab.train.fsdp import ShardedStateIO, _materialize, gather_full_model, meta_skeleton, shard_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = bench_model(d_model, layers)
    n_params = sum(p.numel() for p in model.parameters())
    skeleton = meta_skeleton(model) if rank == 0 else None
    shard_model(model, DistributedConfig.from_dict({"strategy": "fsdp"}), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 32000, (1, 16))
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gc.collect()
    _release_freed_memory()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    if mode == "full":
        io = ShardedStateIO()
        weights, optim = io.model_state(model), io.optimizer_state(model, opt)
        if rank == 0:
            ck.save_checkpoint(out, 1, model_state=weights, optimizer_state=optim, scheduler=sched,
                               stage_state={}, trainer_state={})
        del weights, optim
    elif mode == "final_state_dict":  # the whole state dict on rank 0, then copied into the plain model
        weights = ShardedStateIO().model_state(model)
        if rank == 0:
            _materialize(skeleton)
            skeleton.load_state_dict(weights, strict=False)
        del weights
    elif mode == "final_per_param":
        gather_full_model(model, skeleton, rank == 0)
    else:
        tmp = [str(ck.begin_checkpoint(out, 1)) if rank == 0 else None]
        dist.broadcast_object_list(tmp, 0)
        dcp.save(Path(tmp[0]), model, opt)
        if rank == 0:
            ck.save_checkpoint(out, 1, model_state=None, optimizer_state=None, scheduler=sched, stage_state={},
                               trainer_state={}, tmp=Path(tmp[0]))
    dist.barrier()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if rank == 0:
        print(json.dumps({"mode": mode, "params_M": round(n_params / 1e6, 1), "rss_before_MB": base >> 20,
                          "peak_during_save_MB": peak[0] >> 20, "increase_MB": (peak[0] - base) >> 20,
                          "save_s": round(seconds, 1)}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    """Run both modes, each under its own ``torchrun --nproc_per_node 2``, and print their records."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker[0], Path(args.worker[1]), args.d_model, args.layers)
        return
    print(f"load average {os.getloadavg()[0]:.1f}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   __file__, "--d-model", str(args.d_model), "--layers", str(args.layers), "--worker", mode, d]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            print(lines[0] if done.returncode == 0 and lines else done.stdout[-2000:] + done.stderr[-2000:])


if __name__ == "__main__":
    main()
