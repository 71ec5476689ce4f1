"""Where a pretrain step of the llmlab model spends its time: torch.profiler table of the top ops,
next to the same step of the equivalent transformers LlamaForCausalLM.

    python benchmarks/profile_pretrain.py [--size 5m] [--seq-len 128] [--batch-size 8] [--steps 4] [--rows 25]

One step = forward + loss + backward + AdamW step + zero_grad on llmlab's packed pretrain batches
(per-document position ids). Prints each model's ``key_averages()`` sorted by self CPU time, and
the share of the step spent in attention-related ops. Optionally ``--trace DIR`` writes Chrome
traces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(C.SIZES), default="5m")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--trace", type=Path)
    C.add_threads_arg(ap)
    args = ap.parse_args()
    C.apply_threads(args.threads)
    C.quiet()
    import pretrain_throughput as P

    ns = argparse.Namespace(warmup_steps=2, timed_steps=args.steps, seq_len=args.seq_len,
                            batch_size=args.batch_size, precision="fp32")
    s = P.Setup(ns, args.size)
    batches = s.batches()
    print(C.machine_note())
    for name, model in (("llmlab", s.llmlab_model()), ("llama", P.llama_model(s))):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(b):
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for b in batches[:2]:
            step(b)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for b in batches[2:]:
                step(b)
        ka = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ka)
        attn = sum(e.self_cpu_time_total for e in ka if any(k in e.key for k in (
            "attention", "sdpa", "_efficient", "flash", "softmax", "masked_fill", "baddbmm", "bmm")))
        print(f"\n===== {name}: {total / 1e3 / args.steps:.1f} ms self CPU per step; attention-related "
              f"{100 * attn / total:.0f}% =====")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if args.trace:
            args.trace.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.trace / f"{name}.json"))


if __name__ == "__main__":
    main()
