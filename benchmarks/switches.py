"""What each speed switch buys on this machine, for the llmlab model: one pretrain step
(forward + loss + backward + AdamW step) per variant, measured side by side in one process.

    python benchmarks/switches.py                 # 5m model, all switches, ~3 min on 2 cores
    python benchmarks/switches.py --quick         # fewer repetitions, no compile (~1 min)
    python benchmarks/switches.py --size 25m --batch-size 4 --only fp32 bf16 compile

Variants (each its own copy of the same initial weights and its own optimizer; same batches):

fp32           eager, fp32, AdamW (foreach) — llmlab's default on CPU (``precision: auto``)
bf16           ``torch.autocast("cpu", bfloat16)`` around forward+loss (what ``precision: bf16``
               does through accelerate); weights and optimizer stay fp32
compile        ``torch.compile(model)`` (inductor), fp32; compile time reported separately
compile_bf16   both
fused_adamw    fp32 eager with ``AdamW(fused=True)`` (a recipe's ``optimizer.fused: true``)
grad_ckpt      fp32 eager with ``model.gradient_checkpointing_enable()``
                 (``model.gradient_checkpointing: true``: memory for time)
no_doc_mask    fp32 eager, the same blocks without position ids: plain causal attention
                 (``is_causal``) instead of the per-document mask packing needs — the price of
                 not letting documents attend across their EOS

Timing: every variant is warmed up (compiling where it compiles), then the repetitions interleave
the variants, ``--steps`` steps each; reported are the best and median step time and the speed-up
against fp32.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402

VARIANTS = ["fp32", "bf16", "compile", "compile_bf16", "fused_adamw", "grad_ckpt", "no_doc_mask"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(C.SIZES), default="5m")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per repetition")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5; --quick 3)")
    ap.add_argument("--only", nargs="+", choices=VARIANTS, default=None)
    ap.add_argument("--quick", action="store_true")
    C.add_threads_arg(ap)
    args = ap.parse_args()
    C.apply_threads(args.threads)
    args.reps = args.reps or (3 if args.quick else 5)
    variants = args.only or ([v for v in VARIANTS if "compile" not in v] if args.quick else VARIANTS)
    if "fp32" not in variants:
        variants = ["fp32"] + variants
    C.quiet()
    import pretrain_throughput as P
    from llmlab.train.optim import _param_groups

    ns = argparse.Namespace(warmup_steps=2, timed_steps=args.steps, seq_len=args.seq_len,
                            batch_size=args.batch_size, precision="fp32")
    s = P.Setup(ns, args.size)
    batches = [s.data.train_batch(i) for i in range(args.steps + 2)]
    base = s.llmlab_model()
    print(C.machine_note())
    print(f"{args.size}: {C.n_params(base) / 1e6:.2f} M parameters, batch {args.batch_size} x seq {args.seq_len}")

    runs = {}
    for v in variants:
        m = copy.deepcopy(base)
        m.train()
        if v == "grad_ckpt":
            m.gradient_checkpointing_enable()
        opt = torch.optim.AdamW(_param_groups(m, 0.1), lr=1e-3, betas=(0.9, 0.95), fused=(v == "fused_adamw") or None)
        fwd = torch.compile(m) if "compile" in v else m
        bf16 = v in ("bf16", "compile_bf16")
        strip = v == "no_doc_mask"

        def step(b, fwd=fwd, opt=opt, bf16=bf16, strip=strip):
            if strip:
                b = {k: t for k, t in b.items() if k != "position_ids"}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = fwd(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        t0 = time.perf_counter()
        try:
            for b in batches[:2]:
                step(b)
        except Exception as e:  # compile needs a C++ toolchain; report, do not die
            print(f"  {v}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        runs[v] = {"step": step, "times": [], "warmup_s": time.perf_counter() - t0}
        print(f"  {v:<13} warm-up (2 steps{', incl. compile' if 'compile' in v else ''}): "
              f"{runs[v]['warmup_s']:.1f} s", flush=True)

    for rep in range(args.reps):
        order = list(runs)
        order = order[rep % len(order):] + order[: rep % len(order)]
        for v in order:
            for b in batches[2:]:
                t0 = time.perf_counter()
                runs[v]["step"](b)
                runs[v]["times"].append(time.perf_counter() - t0)

    best0 = min(runs["fp32"]["times"])
    med0 = C.median(runs["fp32"]["times"])
    tokens = args.batch_size * args.seq_len
    rows = []
    for v, r in runs.items():
        b, md = min(r["times"]), C.median(r["times"])
        rows.append([v, f"{1e3 * b:.0f}", f"{1e3 * md:.0f}", f"{tokens / b:,.0f}", f"{best0 / b:.2f}x", f"{med0 / md:.2f}x"])
    print(C.table(rows, ["variant", "best ms/step", "median ms/step", "tok/s (best)", "speed-up (best)",
                         "speed-up (median)"]))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
