"""What a checkpoint save costs the step loop, with and without ``distributed.async_checkpoint``:
FSDP2 on 2 gloo processes on CPU, through llmlab's own Checkpointer (DCP shards, finalised
checksummed folder).

Each mode runs in a fresh ``torchrun``: the model (``--d-model``, ``--layers``, vocabulary 32 000,
untied) is sharded, trained ``--steps`` AdamW steps and checkpointed every ``--save-every`` steps
(``none`` never saves). Rank 0 prints, per mode, the median step time, the mean time of a step
that saves (the step plus the save call: what the loop waits for), the whole run's wall time and
its excess over ``none`` per save (the real cost, including a background write competing with
training for the CPU). Timings are noisy on a shared machine; compare modes within one run.

    python benchmarks/checkpoint_async.py            # 66 M parameters: ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "sync", "async")


def _checkpointer(out: Path, mode: str, steps: int, save_every: int):
    """llmlab's Checkpointer for a stand-in stage (no data, empty stage state)."""
    from llmlab.train.checkpointer import Checkpointer
    from llmlab.train.fsdp import ShardedStateIO

    stage = SimpleNamespace(ctx=SimpleNamespace(name="bench", stage_dir=out,
                                                plan=SimpleNamespace(config={"scheduler": None})),
                            state_dict=dict)
    tc = SimpleNamespace(max_steps=steps, save_every=save_every, keep_last=2, early_stopping=None,
                         save_best_only=False, optimizer=SimpleNamespace(name="adamw"), reset_optimizer=False,
                         batch_size=1, gradient_accumulation_steps=1)
    from accelerate import Accelerator

    return Checkpointer(stage, tc, fingerprint="bench", accelerator=Accelerator(cpu=True),
                        state_io=ShardedStateIO(async_save=mode == "async"))


def _worker(mode: str, out: Path, d_model: int, layers: int, steps: int, save_every: int) -> None:
    """One torchrun process: shard, train ``steps`` steps saving in ``mode``; rank 0 prints JSON."""
    import torch
    import torch.distributed as dist

    from llmlab.config import DistributedConfig
    from checkpoint_rss import bench_model

    from llmlab.train.fsdp import shard_model

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = bench_model(d_model, layers)
    n_params = sum(p.numel() for p in model.parameters())
    shard_model(model, DistributedConfig.from_dict({"strategy": "fsdp"}), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = _checkpointer(out, mode, steps, save_every)
    x = torch.randint(0, 32000, (2, 64))
    plain, saving = [], []
    dist.barrier()
    t_start = time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        model(x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        due = mode != "none" and step % save_every == 0
        if due:
            ckpt.save(step, model, opt, sched)
        (saving if due else plain).append(time.perf_counter() - t0)
    ckpt.finish()
    dist.barrier()
    wall = time.perf_counter() - t_start
    if dist.get_rank() == 0:
        print(json.dumps({"mode": mode, "params_M": round(n_params / 1e6, 1), "steps": steps,
                          "median_step_s": round(statistics.median(plain), 3),
                          "mean_saving_step_s": round(statistics.mean(saving), 3) if saving else None,
                          "wall_s": round(wall, 2), "saves": len(saving)}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    """Run each mode under its own ``torchrun --nproc_per_node 2`` and print records and costs."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker[0], Path(args.worker[1]), args.d_model, args.layers, args.steps, args.save_every)
        return
    print(f"load average {os.getloadavg()[0]:.1f}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    records = {}
    for mode in MODES:
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                   "--d-model", str(args.d_model), "--layers", str(args.layers), "--steps", str(args.steps),
                   "--save-every", str(args.save_every), "--worker", mode, d]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            if done.returncode or not lines:
                print(done.stdout[-2000:] + done.stderr[-2000:])
                continue
            records[mode] = json.loads(lines[0])
            print(lines[0])
    base = records.get("none")
    for mode in ("sync", "async"):
        r = records.get(mode)
        if base and r and r["saves"]:
            print(f"{mode}: the loop waits {r['mean_saving_step_s'] - r['median_step_s']:.2f} s per save; "
                  f"the run takes {(r['wall_s'] - base['wall_s']) / r['saves']:.2f} s longer per save")


if __name__ == "__main__":
    main()
