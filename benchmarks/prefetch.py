"""Does the step wait for data? Micro-batches built in the step's process against DataLoader
workers (llmlab.data.prefetch), measured side by side in one run.

    python benchmarks/prefetch.py [--seq-len 1024] [--batch-size 32] [--step-ms 50] [--steps 40]

A GPU step leaves the host CPU idle while the device computes; here that step is simulated by
``time.sleep(--step-ms)`` (the CPU is free, as under a real accelerator). Each contender asks
for the same ``--steps`` micro-batches of a pretrain stage on the King James Bible (built-in
``kjv``, a 4,096-token tokenizer trained on the fly, packed ``--batch-size`` x ``--seq-len``
blocks, read from the memory-mapped token store) and "steps" on each:

direct    ``StageData.train_batch(index)`` in the loop's process (llmlab's default on a CPU);
workers   ``BatchPrefetcher`` with 2 DataLoader workers, prefetch factor 2 (pinned memory needs
          CUDA and is off here).

Printed: the first batch's time (the workers' start-up), then the median time per micro-batch
spent waiting for data (outside the simulated step), the wall time per step, and the ratios. On a CPU-only machine the default stays
``direct``: with real CPU steps the workers would compete with the step for the same cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--step-ms", type=float, default=50.0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--stage", choices=("pretrain", "sft", "dpo"), default="pretrain",
                    help="pretrain: packed kjv blocks; sft: chatterbot conversations; dpo: chatterbot pairs")
    args = ap.parse_args()

    from llmlab.data.pipeline import build_stage_data
    from llmlab.data.prefetch import BatchPrefetcher, step_indices
    from llmlab.data.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        recipe = {"name": "prefetch", "seed": 1, "output_dir": tmp,
                  "tokenizer": {"train": {"datasets": ["bible"], "vocab_size": 4096}},
                  "model": {"arch": "transformer", "max_seq_len": args.seq_len},
                  "datasets": {"bible": {"builtin": "kjv", "format": "text"},
                               "sft": {"builtin": "chatterbot", "format": "messages"},
                               "dpo": {"builtin": "chatterbot_pairs", "format": "preference"}},
                  "stages": {args.stage: {"type": args.stage, "datasets": {"bible" if args.stage == "pretrain" else
                                                                           args.stage: 1.0},
                                          "seq_len": args.seq_len, "batch_size": args.batch_size,
                                          "max_steps": args.steps, "max_dropped_fraction": 1.0}}}
        tok = build_tokenizer(recipe, Path(tmp) / "tokenizer")
        data = build_stage_data(recipe, args.stage, tok)
        indices = step_indices(0, args.steps, 1, 1, 0)
        results = {}
        for name, workers in (("direct", 0), ("workers", 2)):
            pre = BatchPrefetcher(data.train_batch, indices, data.train_batch, num_workers=workers)
            waits = []
            t0 = time.perf_counter()
            for i in indices:
                t = time.perf_counter()
                batch = pre.get(i)
                waits.append(time.perf_counter() - t)
                assert len(batch) > 0
                time.sleep(args.step_ms / 1e3)
            wall = time.perf_counter() - t0
            pre.close()
            # the first batch of the workers includes starting them: reported apart
            rest = sorted(waits[1:])
            results[name] = (waits[0] * 1e3, rest[len(rest) // 2] * 1e3, wall / len(indices) * 1e3)
        print(f"{args.stage}: {args.steps} micro-batches of {args.batch_size} x {args.seq_len} tokens, simulated step "
              f"{args.step_ms:.0f} ms")
        for name, (first_ms, wait_ms, step_ms) in results.items():
            print(f"  {name:8s} first batch {first_ms:7.1f} ms; then waiting for data {wait_ms:6.2f} ms per step "
                  f"(median); wall {step_ms:7.2f} ms per step")
        print(f"  workers / direct: waiting x{results['workers'][1] / max(results['direct'][1], 1e-9):.2f}, "
              f"wall per step x{results['workers'][2] / results['direct'][2]:.3f}")


if __name__ == "__main__":
    main()
