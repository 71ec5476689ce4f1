"""Pretraining tokens/s, MFU and peak RSS of llmlab's loop against transformers' Trainer and a
minimal hand-written PyTorch loop, measured side by side in one run.

    python benchmarks/pretrain_throughput.py                 # 5m and 25m, fp32, ~4-5 min on 2 cores
    python benchmarks/pretrain_throughput.py --quick         # 5m only, fewer steps, ~1 min
    python benchmarks/pretrain_throughput.py --sizes 5m --seq-len 256 --batch-size 16 --reps 3 --timed-steps 20
    python benchmarks/pretrain_throughput.py --precision bf16   # autocast bf16 for all three
    python benchmarks/pretrain_throughput.py --precision defaults  # each tool as it comes out of the box
    python benchmarks/pretrain_throughput.py --no-rss            # skip the memory subprocesses

Contenders (same tokenizer, same packed King James Bible blocks with per-document position ids, same
model shape, same seed, same batch, AdamW(β=0.9/0.95, wd 0.1 on matrices) with the same cosine
schedule and grad-clip 1.0, no eval or checkpoint inside the timed window):

llmlab    ``llmlab.train.loop.train`` on the recipe's pretrain stage (accelerate, metrics.jsonl,
          finite check, grad clip, scheduler: the real loop). Batches come from llmlab's StageData
          (built once and shared between repetitions, so tokenisation is not timed).
trainer   ``transformers.Trainer`` with the equivalent ``LlamaForCausalLM`` (llmlab's own exporter
          maps the config: d_model/layers/heads/kv-heads/d_ff/vocab/rope/eps, tied embeddings), SDPA
          attention, the same blocks as a Dataset in the same order (sequential sampler),
          report_to none, no eval/save, logging off. Llama sees the same position ids and so the
          same per-document (block-diagonal) causal attention as llmlab.
minimal   a hand-written loop on the same ``LlmlabForCausalLM``: forward, backward, clip, step,
          schedule, zero_grad; batches from a list; the loss read once at the end.

Precision: ``fp32`` or ``bf16`` (autocast) is the same for all three. ``defaults`` compares what
each tool does when the user sets nothing: llmlab's ``precision: auto`` (bf16 autocast on a GPU or
a CPU with native bf16 instructions, else fp32) against the Trainer's default (fp32) and the
minimal loop in fp32. MFU is then taken against the peak of the dtype each contender computes in.

Timing: each repetition builds a fresh model (same seed) and runs ``--warmup-steps`` untimed steps,
then ``--timed-steps`` timed ones; the time from the end of the last warm-up step to the end of the
last step is measured. Repetitions are interleaved (the contenders' order rotates each repetition)
and the best (least disturbed by other processes: interference only ever adds time, as in
``timeit``) and the median tokens/s per contender are reported, with ratios. MFU = tokens/s × (6N + 12·L·H·Q·T) / peak,
where the peak is this machine's measured matmul rate for the dtype (benchmarks/peak_flops.py).

Peak RSS: each contender runs alone in a fresh subprocess (``--child``) for warm-up + 3 steps; its
peak resident set (``VmHWM`` from /proc/self/status, else ``ru_maxrss``) is reported. The llmlab child runs a whole pretrain stage as ``llmlab run`` would
(``train()`` builds the stage's data itself: tokenisation, datasets/arrow); the other two load the
already-packed blocks from a file.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402


# ---------------------------------------------------------------------------------------------
# set-up shared by the contenders
# ---------------------------------------------------------------------------------------------
class Setup:
    """Resolved recipe, tokenizer and the pretrain StageData for one size."""

    def __init__(self, args, size: str, workdir: Path | None = None):
        self.size = size
        self.warm, self.timed = args.warmup_steps, args.timed_steps
        self.steps = self.warm + self.timed
        self.workdir = workdir or C.make_workdir(f"pretrain-{size}")
        rec = C.base_recipe(size, seq_len=args.seq_len, batch_size=args.batch_size, max_steps=self.steps)
        rec["precision"] = "auto" if args.precision == "defaults" else args.precision
        rec["stages"]["pretrain"]["log_every"] = self.warm
        self.resolved = C.resolve(rec, self.workdir)
        self.cfg = self.resolved["stages"]["pretrain"]
        self.tok = C.tokenizer_for(self.resolved)
        self._data = None
        self.bf16 = args.precision == "bf16"

    @property
    def data(self):
        if self._data is None:
            self._data = C.stage_data(self.resolved, "pretrain", self.tok)
        return self._data

    def batches(self) -> list[dict]:
        return [self.data.train_batch(i) for i in range(self.steps)]

    def llmlab_model(self):
        from llmlab.models.build import build_model

        torch.manual_seed(self.resolved["seed"])
        return build_model(self.resolved["model"], tokenizer=self.tok)


def _schedule(opt, cfg, steps):
    from llmlab.train.optim import build_scheduler

    return build_scheduler(opt, cfg["scheduler"], steps)


# ---------------------------------------------------------------------------------------------
# contenders: each returns {"tokens": int, "seconds": float} of the timed window
# ---------------------------------------------------------------------------------------------
def run_llmlab(s: Setup, rep: int, own_data: bool = False) -> dict:
    """The real loop (``llmlab.train.loop.train``) on the recipe's pretrain stage."""
    import shutil

    from llmlab.session import resolve_precision, setup_accelerator
    from llmlab.runplan import build_run_plan
    from llmlab.stages.base import StageContext
    from llmlab.stages.lm import PretrainStage
    from llmlab.train.loop import train

    shared = None if own_data else s.data

    class BenchPretrain(PretrainStage):
        def setup(self, model):
            if shared is None:
                super().setup(model)
            else:
                self._data = shared

    stage_dir = s.workdir / "run" / f"pretrain-rep{rep}"
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True)
    device = torch.device("cpu")
    C.reset_accelerate()  # a Trainer run before this one in the process set its own state
    acc = setup_accelerator(device, resolve_precision(s.resolved["precision"], device))
    ctx = StageContext.for_stage(build_run_plan(s.resolved), "pretrain", s.tok, stage_dir=stage_dir, device=device)
    model, result = train(BenchPretrain(ctx), fingerprint="bench", accelerator=acc)
    recs = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    recs = {r["step"]: r for r in recs if "loss" in r}
    a, b = recs[s.warm], recs[s.steps]
    shutil.rmtree(stage_dir, ignore_errors=True)
    return {"tokens": b["tokens"] - a["tokens"], "seconds": b["elapsed_s"] - a["elapsed_s"], "loss": b["loss"]}


def run_minimal(s: Setup, rep: int, batches: list[dict] | None = None) -> dict:
    """A hand-written loop on the same llmlab model."""
    from llmlab.train.optim import _param_groups

    batches = batches if batches is not None else s.batches()
    model = s.llmlab_model()
    model.train()
    ocfg = s.cfg["optimizer"]
    opt = torch.optim.AdamW(_param_groups(model, float(ocfg["weight_decay"])), lr=float(ocfg["lr"]),
                            betas=(0.9, 0.95), eps=1e-8)
    sched = _schedule(opt, s.cfg, s.steps)
    tokens, t_start = 0, None
    for step, batch in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 == s.warm:
            t_start = time.perf_counter()
        elif step + 1 > s.warm:
            tokens += batch["input_ids"].numel()
    seconds = time.perf_counter() - t_start
    return {"tokens": tokens, "seconds": seconds, "loss": float(loss)}


def llama_model(s: Setup):
    from transformers import LlamaForCausalLM

    from llmlab.models.export import target_config

    ref = s.llmlab_model()
    cfg = target_config(ref.config, "llama")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(s.resolved["seed"])
    model = LlamaForCausalLM(cfg)
    assert C.n_params(model) == C.n_params(ref), (C.n_params(model), C.n_params(ref))
    del ref
    return model


def run_trainer(s: Setup, rep: int, batches: list[dict] | None = None) -> dict:
    """transformers.Trainer on the equivalent LlamaForCausalLM."""
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import Trainer, TrainingArguments, default_data_collator

    batches = batches if batches is not None else s.batches()
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]

    class Rows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    marks = {}

    clock = C.step_clock(marks, (s.warm, s.steps))
    targs = TrainingArguments(**{**C.hf_trainer_kwargs({**s.cfg, "max_steps": s.steps}, s.workdir / f"trainer-rep{rep}",
                                                       s.resolved["seed"]), "bf16": s.bf16}, remove_unused_columns=False)
    trainer = InOrder(model=llama_model(s), args=targs, train_dataset=Rows(), data_collator=default_data_collator,
                      callbacks=[clock])
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # Trainer prints its summary dict
        out = trainer.train()
    tokens = s.timed * s.cfg["batch_size"] * s.cfg["seq_len"]
    return {"tokens": tokens, "seconds": marks[s.steps] - marks[s.warm], "loss": out.training_loss}


CONTENDERS = {"llmlab": run_llmlab, "trainer": run_trainer, "minimal": run_minimal}


# ---------------------------------------------------------------------------------------------
# memory: one contender alone in a fresh interpreter
# ---------------------------------------------------------------------------------------------
def child(args) -> None:
    import psutil

    C.quiet()
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    s = Setup(args, args.sizes[0], workdir=Path(args.workdir))
    if args.child == "llmlab":
        r = run_llmlab(s, 0, own_data=True)
    else:
        batches = torch.load(Path(args.workdir) / "batches.pt", weights_only=True)
        r = CONTENDERS[args.child](s, 0, batches=batches)
    # VmHWM: this process's own peak RSS. (ru_maxrss is not usable here: Linux carries the
    # parent's high-water mark over fork+exec, so every child would report the parent's peak.)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        status = Path("/proc/self/status").read_text()
        peak_kb = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration):
        pass
    print("CHILD " + json.dumps({"maxrss_mb": peak_kb / 1024, "rss_after_imports_mb": rss0 / 2**20, **r}))


def measure_rss(args, s: Setup) -> dict:
    torch.save(s.batches()[: s.warm + 3], s.workdir / "batches.pt")
    out = {}
    for name in CONTENDERS:
        cmd = [sys.executable, __file__, "--child", name, "--workdir", str(s.workdir), "--sizes", s.size,
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--precision", args.precision,
               "--warmup-steps", str(s.warm), "--timed-steps", "3"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("CHILD ")]
        if p.returncode or not line:
            print(f"  rss child {name} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
            continue
        out[name] = json.loads(line[-1][6:])
    return out


# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=None, choices=list(C.SIZES), help="default: 5m 25m (--quick: 5m)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (5m) / 4 (25m and larger)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="untimed steps per repetition (default 3)")
    ap.add_argument("--timed-steps", type=int, default=None, help="timed steps per repetition (default 6; --quick 4)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 4; --quick 2)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "defaults"], default="fp32",
                    help="fp32 / bf16 for all three, or each tool's default (llmlab auto, Trainer fp32)")
    ap.add_argument("--only", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--quick", action="store_true", help="~1 minute: 5m only, 1 repetition, fewer steps")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    C.add_threads_arg(ap)
    args = ap.parse_args()
    C.apply_threads(args.threads)
    if args.sizes is None:
        args.sizes = ["5m"] if args.quick else ["5m", "25m"]
    args.warmup_steps = args.warmup_steps or (2 if args.quick else 3)
    args.timed_steps = args.timed_steps or (4 if args.quick else 6)
    args.reps = args.reps or (2 if args.quick else 4)
    if args.child:
        args.batch_size = args.batch_size or 8
        return child(args)
    C.quiet()

    from peak_flops import measure_peak

    print(C.machine_note())
    from llmlab.session import resolve_precision

    llmlab_precision = resolve_precision("auto", torch.device("cpu")) if args.precision == "defaults" \
        else args.precision
    others = "fp32" if args.precision == "defaults" else args.precision
    peaks = {}
    for prec in dict.fromkeys([others, llmlab_precision]):
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        peaks[prec] = measure_peak(dtype, "cpu", size=1024 if args.quick else 2048, seconds=2.0, windows=4)
        print(f"measured peak matmul rate ({prec}): {peaks[prec] / 1e9:.1f} GFLOP/s")
    if args.precision == "defaults":
        print(f"precision: llmlab 'auto' -> {llmlab_precision}; Trainer and minimal loop fp32 (their defaults)")
    peak_of = {name: peaks[llmlab_precision if name == "llmlab" else others] for name in CONTENDERS}
    results = {"machine": C.machine_note(), "peak_flops": peaks, "precision": args.precision, "sizes": {}}

    for size in args.sizes:
        bs = args.batch_size or (8 if size in ("1m", "5m") else 4)
        a = argparse.Namespace(**{**vars(args), "batch_size": bs})
        s = Setup(a, size)
        _ = s.data
        model = s.llmlab_model()
        n, mc = C.n_params(model), model.config
        fpt = C.flops_per_token(n, mc.n_layers, mc.n_heads, mc.head_dim, args.seq_len)
        del model
        print(f"\n== {size}: {n / 1e6:.2f} M parameters, batch {bs} x seq {args.seq_len} "
              f"({bs * args.seq_len} tokens/step), {args.warmup_steps} warm-up + {args.timed_steps} timed steps, "
              f"{args.reps} interleaved repetitions ==")
        runs = {k: [] for k in args.only}
        for rep in range(args.reps):
            order = args.only[rep % len(args.only):] + args.only[: rep % len(args.only)]
            for name in order:
                gc.collect()
                r = CONTENDERS[name](s, rep)
                tps = r["tokens"] / r["seconds"]
                runs[name].append(tps)
                print(f"  rep {rep} {name:<8} {tps:10.0f} tok/s  (loss {r['loss']:.3f}, load {os.getloadavg()[0]:.2f})",
                      flush=True)
        rss = {} if args.no_rss else measure_rss(a, s)
        rows, res = [], {}
        best = {k: max(v) for k, v in runs.items()}
        med = {k: C.median(v) for k, v in runs.items()}
        for name in args.only:
            tps = best[name]
            mfu = tps * fpt / peak_of[name]
            r = {"tokens_per_s_best": tps, "tokens_per_s_median": med[name], "mfu": mfu, "runs": runs[name],
                 **({"rss": rss[name]} if name in rss else {})}
            res[name] = r
            rows.append([name, f"{tps:,.0f}", f"{med[name]:,.0f}", f"{100 * mfu:.1f}%",
                         f"{tps / best['trainer']:.2f}x" if "trainer" in best else "-",
                         f"{med[name] / med['trainer']:.2f}x" if "trainer" in med else "-",
                         f"{tps / best['minimal']:.2f}x" if "minimal" in best else "-",
                         f"{rss[name]['maxrss_mb']:.0f}" if name in rss else "-",
                         f"{rss[name]['maxrss_mb'] / rss['minimal']['maxrss_mb']:.2f}x" if name in rss and "minimal" in rss else "-"])
        print(C.table(rows, ["contender", "tok/s best", "tok/s median", "MFU (best)", "vs trainer (best)",
                             "vs trainer (median)", "vs minimal (best)", "peak RSS MB", "RSS vs minimal"]))
        if "llmlab" in best and "trainer" in best:
            ratio = best["llmlab"] / best["trainer"]
            print(f"target llmlab >= 1.3x trainer tokens/s (precision {args.precision}): {ratio:.2f}x -> "
                  f"{'MET' if ratio >= 1.3 else 'NOT MET'}")
        if "llmlab" in rss and "minimal" in rss:
            rr = rss["llmlab"]["maxrss_mb"] / rss["minimal"]["maxrss_mb"]
            print(f"target llmlab peak RSS <= 1.2x minimal: {rr:.2f}x -> {'MET' if rr <= 1.2 else 'NOT MET'}")
        results["sizes"][size] = {"params": n, "flops_per_token": fpt, "batch_size": bs, "seq_len": args.seq_len,
                                  "contenders": res}
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
