"""llmlab against LitGPT, side by side: tokens/s, held-out loss at equal tokens, start-up and peak
RSS, on the same model, tokenizer, data and batch (issue 27).

    python benchmarks/vs_litgpt.py                       # the table: 3 configurations x 2 tools x --reps
    python benchmarks/vs_litgpt.py --reps 1 --steps 30   # a quick look
    python benchmarks/vs_litgpt.py --configs fp32-same fp32-same-compiled bf16-same bf16-same-compiled
    python benchmarks/vs_litgpt.py --sweep               # llmlab only: lr x warm-up x weight decay grid

It installs nothing. LitGPT runs in its own virtual environment (its pins differ from llmlab's),
made once with:

    python3.11 -m venv /work/litgpt-venv
    /work/litgpt-venv/bin/pip install torch==2.13.0          # the CPU build, first
    /work/litgpt-venv/bin/pip install torch==2.13.0 litgpt requests litdata torchmetrics
    /work/litgpt-venv/bin/pip uninstall -y torchvision      # litdata pulls it in; litgpt never imports it

(naming ``torch==2.13.0`` again in the second command keeps pip from upgrading torch to the newest
release for litdata's torchvision; ``--litgpt-python`` points at another venv's Python.)

What is compared (both tools as a user runs them, each in its own fresh process, one thread:
``OMP_NUM_THREADS=1``, and ``threads: 1`` in the recipe):

* Model: Llama-style, d_model 256, 4 layers, 4 heads (MHA), d_ff 688, RoPE (θ 10,000), RMSNorm,
  SwiGLU, untied embeddings, vocabulary 4,096: 5.26 M parameters in both.
* Data: llmlab's tokenizer (4,096-token BPE trained on the King James Bible) and llmlab's packed
  256-token blocks of the KJV chapters (eval_split 0.05), in llmlab's order; LitGPT gets exactly
  these blocks (as ``max_seq_length`` 255: input row[:-1], targets row[1:], the same 255 predicted
  tokens per row as llmlab's shifted labels). llmlab keeps attention inside each document of a
  block (its packed-pretraining default); LitGPT attends across documents (it has no such mode).
* Batch 8 x 256, ``--steps`` 100 (204,800 tokens); timing over the steps after ``--warmup-steps``.
* llmlab: ``python -m llmlab run`` on a written recipe (its whole loop: data, eval at step 0 and at
  the end, logging every step, final save). LitGPT: ``litgpt.pretrain.setup`` (Fabric, always
  ``torch.compile``, a 2-batch sanity validation, logging every step, final save) through
  benchmarks/_litgpt_child.py.
* Held-out loss: llmlab's ``eval_loss`` definition (llmlab.heldout: the held-out chapters, each
  conditioned on the start token and cut into 256-token windows overlapping by one, nats per
  scored token, fp32) after the last step; LitGPT's trained model is scored on the very same windows.

Configurations (one row of the table each):

``fp32-defaults``  fp32; no optimizer keys in llmlab's recipe, LitGPT's ``setup()`` defaults (AdamW
                   lr 1e-3, β 0.9/0.999, wd 0.01 on every tensor, warm-up min(2000, steps), cosine
                   to 4e-5, clip 1.0).
``fp32-same``      fp32; identical optimizer settings: AdamW lr 1e-3, β 0.9/0.95, ε 1e-8, wd 0.1 on
                   matrices only, 10 warm-up steps, cosine to 1e-4, clip 1.0.
``bf16-same``      each tool's default precision (llmlab ``precision: auto``, LitGPT ``bf16-mixed``
                   on a CPU: bf16 autocast for both on a CPU with native bf16) and the identical
                   optimizer settings.
``fp32-same-compiled``, ``bf16-same-compiled``  as ``fp32-same`` / ``bf16-same`` with llmlab's
                   ``compile: true`` (LitGPT compiles in every configuration, so these are the
                   compiled-against-compiled rows; not in the default ``--configs``).

Runs are interleaved (each repetition runs every configuration, the tools' order alternating) and
the best and median tokens/s are reported (others' load only ever adds time), with the load average
at each run, and beside them tokens per CPU-second of the training process (user + system time
over the same steps), which a busy machine disturbs far less than wall time. Start-up is the wall time from launching the process to the end of step 1 (warm
caches: the tokenizer and token store are built before the first timed run; torch.compile's
on-disk caches are whatever earlier runs left), per configuration: compiling adds to it. Peak RSS is the
process's VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SAME = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "warmup": 10, "min_lr_ratio": 0.1}
MODEL = dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=688)
CONFIGS = {  # name: (llmlab precision key or None for auto, optimizer settings or None for defaults,
    #                llmlab's `compile`; LitGPT always compiles)
    "fp32-defaults": ("fp32", None, False),
    "fp32-same": ("fp32", SAME, False),
    "bf16-same": (None, SAME, False),
    "fp32-same-compiled": ("fp32", SAME, True),
    "bf16-same-compiled": (None, SAME, True),
}
DEFAULT_CONFIGS = ["fp32-defaults", "fp32-same", "bf16-same"]
CHILD = Path(__file__).resolve().parent / "_litgpt_child.py"


def recipe(args, precision: str | None, opt: dict | None, compile_: bool = False) -> dict:
    """The llmlab recipe of one configuration (no optimizer keys at all when ``opt`` is None;
    ``compile: true`` only when ``compile_``)."""
    stage = {"type": "pretrain", "datasets": {"bible": 1.0}, "seq_len": args.seq_len, "batch_size": args.batch_size,
             "max_steps": args.steps, "eval_every": 10**6, "eval_steps": 8, "save_every": 10**6, "log_every": 1}
    if opt is not None:
        stage["optimizer"] = {"name": "adamw", "lr": opt["lr"], "weight_decay": opt["weight_decay"],
                              "beta1": opt["betas"][0], "beta2": opt["betas"][1], "eps": opt["eps"]}
        stage["scheduler"] = {"name": "cosine", "warmup_steps": opt["warmup"], "min_lr_ratio": opt["min_lr_ratio"]}
    rec = {"name": "vs-litgpt", "seed": 1234, "threads": 1,
           "tokenizer": {"train": {"datasets": ["bible"], "vocab_size": 4096}},
           "model": {"arch": "transformer", **MODEL, "attention_type": "mha", "max_seq_len": args.seq_len,
                     "positional_encoding": "rope", "norm_type": "rmsnorm", "activation": "swiglu",
                     "tie_embeddings": False},
           "datasets": {"bible": {"builtin": "kjv", "format": "text", "eval_split": 0.05}},
           "stages": {"pretrain": stage}}
    if precision is not None:
        rec["precision"] = precision
    if compile_:
        rec["compile"] = True
    return rec


class Prepared:
    """One configuration's recipe file with its tokenizer and token store built (warm caches), and
    (``dump``) the training blocks and held-out windows written for LitGPT."""

    def __init__(self, args, name: str, precision: str | None, opt: dict | None, compile_: bool, dump: Path | None):
        self.name, self.opt, self.precision = name, opt, precision
        self.dir = args.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.resolved = C.resolve(recipe(args, precision, opt, compile_), self.dir)
        self.recipe_path, self.out = self.dir / "bench.yaml", Path(self.resolved["output_dir"])
        tok = C.tokenizer_for(self.resolved)
        data = C.stage_data(self.resolved, "pretrain", tok)
        if dump is not None:
            import torch

            from llmlab.heldout import document_windows, start_token

            rows = torch.cat([data.train_batch(i)["input_ids"] for i in range(args.steps)])
            torch.save(rows, dump / "train.pt")
            start = start_token(tok)
            windows = [w for doc in data.heldout().examples for w in document_windows(doc, start, args.seq_len)]
            (dump / "windows.json").write_text(json.dumps(windows))


def proc_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (/proc/PID/stat), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_llmlab(args, p: Prepared, tag: str) -> dict:
    """``python -m llmlab run`` on the configuration's recipe in a fresh process."""
    shutil.rmtree(p.out / "pretrain", ignore_errors=True)  # the benchmark's own previous run
    metrics = p.out / "pretrain" / "metrics.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(C.ROOT)}
    log = open(args.workdir / f"{tag}.log", "w")
    launch = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "run", str(p.recipe_path)], env=env, cwd=str(C.ROOT),
                            stdout=log, stderr=subprocess.STDOUT)
    startup, rss, cpu = None, 0.0, {}
    w, s = args.warmup_steps, args.steps
    while proc.poll() is None:  # every 20 ms: peak RSS, and the CPU time when steps w and s are logged
        rss = max(rss, proc_rss_mb(proc.pid) or 0.0)
        text = metrics.read_text() if metrics.exists() else ""
        if startup is None and '"loss"' in text:
            startup = time.time() - launch
        for k in (w, s):
            if k not in cpu and f'{{"step": {k}, "loss"' in text:
                cpu[k] = proc_cpu_s(proc.pid)
        time.sleep(0.02)
    log.close()
    if proc.returncode:
        raise SystemExit(f"llmlab run failed ({proc.returncode}); see {args.workdir / f'{tag}.log'}")
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    train = {r["step"]: r for r in recs if "loss" in r}
    evals = {r["step"]: r for r in recs if "eval_loss" in r}
    tokens = (s - w) * args.batch_size * args.seq_len
    cpu_s = cpu[s] - cpu[w] if cpu.get(s) is not None and cpu.get(w) is not None else float("nan")
    return {"startup_s": startup, "tokens_per_s": tokens / (train[s]["elapsed_s"] - train[w]["elapsed_s"]),
            "tokens_per_cpu_s": tokens / cpu_s,
            "heldout_loss": evals[s]["eval_loss"], "peak_rss_mb": rss, "last_loss": train[s]["loss"]}


def run_litgpt(args, p: Prepared, tag: str) -> dict:
    """``litgpt.pretrain`` on the same blocks in a fresh process of the LitGPT venv."""
    o = p.opt
    spec = {"train": str(args.workdir / "train.pt"), "windows": str(args.workdir / "windows.json"),
            "model": {**MODEL, "vocab_size": 4096, "seq_len": args.seq_len, "rope_theta": 10000.0, "norm_eps": 1e-5},
            "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "precision": "32-true" if p.precision == "fp32" else None, "seed": 1234,
            "optimizer": None if o is None else {**o, "min_lr": o["lr"] * o["min_lr_ratio"]},
            "out_dir": str(args.workdir / f"{tag}-out"), "launch_time": time.time()}
    spec_path = args.workdir / f"{tag}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([args.litgpt_python, str(CHILD), str(spec_path)], env=env, capture_output=True, text=True,
                         cwd=str(args.workdir))
    (args.workdir / f"{tag}.log").write_text(out.stdout + out.stderr)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(f"LitGPT run failed ({out.returncode}); see {args.workdir / f'{tag}.log'}")
    shutil.rmtree(args.workdir / f"{tag}-out", ignore_errors=True)
    return json.loads(line[-1][7:])


TOOLS = {"llmlab": run_llmlab, "litgpt": run_litgpt}


def fmt_pair(xs: list[float], f: str = ",.0f") -> str:
    return f"{max(xs):{f}} / {C.median(xs):{f}}" if len(xs) > 1 else f"{xs[0]:{f}}"


def report(runs: dict, names: list[str]) -> None:
    """The issue's table: llmlab, LitGPT and llmlab / LitGPT (best / median where repeated)."""
    def col(cfg, tool, key):
        return [r[key] for r in runs[cfg][tool]]

    def ratio(cfg, key, better_high=True):
        a, b = col(cfg, "llmlab", key), col(cfg, "litgpt", key)
        if key.startswith("tokens_per"):
            return f"{max(a) / max(b):.2f} / {C.median(a) / C.median(b):.2f}"
        return f"{C.median(a) / C.median(b):.2f}"

    rows = []
    labels = {"fp32-defaults": "tokens/s, fp32, each tool's defaults", "fp32-same": "tokens/s, fp32, identical settings",
              "bf16-same": "tokens/s, default precision (bf16 autocast), identical settings",
              "fp32-same-compiled": "tokens/s, fp32, identical settings, llmlab compile: true",
              "bf16-same-compiled": "tokens/s, bf16 autocast, identical settings, llmlab compile: true"}
    for cfg in names:
        for key, unit in (("tokens_per_s", ""), ("tokens_per_cpu_s", " per CPU-second")):
            rows.append([labels.get(cfg, cfg) + unit, fmt_pair(col(cfg, "llmlab", key)),
                         fmt_pair(col(cfg, "litgpt", key)), ratio(cfg, key)])
    for cfg, label in (("fp32-same", "identical settings"), ("fp32-defaults", "each tool's defaults"),
                       ("fp32-same-compiled", "identical settings, llmlab compiled")):
        if cfg in runs:
            a, b = C.median(col(cfg, "llmlab", "heldout_loss")), C.median(col(cfg, "litgpt", "heldout_loss"))
            rows.append([f"held-out loss at equal tokens, {label}", f"{a:.3f}", f"{b:.3f}", f"{a - b:+.3f} nats"])
    for cfg in names:  # per configuration: llmlab's compile: true adds its compile time here
        su = [[r["startup_s"] for r in runs[cfg][tool] if r["startup_s"]] for tool in ("llmlab", "litgpt")]
        if all(su):
            rows.append([f"start-up to step 1 (s, min-max), {cfg}", *(f"{min(x):.1f}-{max(x):.1f}" for x in su),
                         f"{C.median(su[0]) / C.median(su[1]):.2f}"])
    cfg = "fp32-same" if "fp32-same" in runs else names[0]
    a, b = C.median(col(cfg, "llmlab", "peak_rss_mb")), C.median(col(cfg, "litgpt", "peak_rss_mb"))
    rows.append([f"peak RSS MB ({cfg})", f"{a:,.0f}", f"{b:,.0f}", f"{a / b:.2f}"])
    print(C.table(rows, ["", "llmlab", "LitGPT", "llmlab / LitGPT"]))


def sweep(args) -> None:
    """llmlab alone, fp32, over ``--lrs`` x ``--warmups`` x ``--wds`` (plus the no-optimizer-keys
    default): held-out loss at the same tokens for each."""
    grid = [("defaults", None)] * args.with_defaults + [(f"lr{lr:g}-wu{wu}-wd{wd:g}", {**SAME, "lr": lr, "warmup": wu, "weight_decay": wd})
                                   for lr in args.lrs for wu in args.warmups for wd in args.wds]
    rows = []
    for name, opt in grid:
        p = Prepared(args, f"sweep-{name}", "fp32", opt, False, None)
        r = run_llmlab(args, p, f"sweep-{name}")
        load = os.getloadavg()[0]
        rows.append([name, f"{r['heldout_loss']:.3f}", f"{r['last_loss']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{load:.1f}"])
        print("  " + "  ".join(rows[-1]), flush=True)
    print(C.table(rows, ["optimizer", "held-out loss", "last train loss", "tok/s", "load"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions of every configuration")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the tokens/s window")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS,
                    help="the *-compiled ones run llmlab with `compile: true` (LitGPT compiles in every one)")
    ap.add_argument("--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS))
    ap.add_argument("--litgpt-python", default="/work/litgpt-venv/bin/python")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    ap.add_argument("--json", type=Path, help="also write every run's numbers here")
    ap.add_argument("--sweep", action="store_true", help="llmlab only: held-out loss over an optimizer grid")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    ap.add_argument("--warmups", type=int, nargs="+", default=[0, 10])
    ap.add_argument("--wds", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--no-defaults", dest="with_defaults", action="store_false",
                    help="--sweep: leave out the run without optimizer keys")
    args = ap.parse_args()
    args.workdir = args.workdir or C.make_workdir("vs-litgpt")
    C.quiet()
    print(C.machine_note())
    print(f"work folder {args.workdir}; batch {args.batch_size} x {args.seq_len}, {args.steps} steps "
          f"({args.steps * args.batch_size * args.seq_len:,} tokens), tokens/s over steps {args.warmup_steps + 1}-{args.steps}")
    if args.sweep:
        return sweep(args)
    if "litgpt" in args.tools and not Path(args.litgpt_python).exists():
        raise SystemExit(f"no LitGPT venv at {args.litgpt_python}: make it as this script's docstring says")
    prepared = {n: Prepared(args, n, *CONFIGS[n], dump=args.workdir if i == 0 else None)
                for i, n in enumerate(args.configs)}
    runs = {n: {t: [] for t in args.tools} for n in args.configs}
    for rep in range(args.reps):
        for i, name in enumerate(args.configs):
            order = args.tools if (rep + i) % 2 == 0 else args.tools[::-1]
            for tool in order:
                r = TOOLS[tool](args, prepared[name], f"{name}-{tool}-rep{rep}")
                r["load"] = os.getloadavg()[0]
                runs[name][tool].append(r)
                print(f"  rep {rep} {name:<14} {tool:<7} {r['tokens_per_s']:7,.0f} tok/s  "
                      f"{r['tokens_per_cpu_s']:7,.0f} tok/CPU-s  held-out {r['heldout_loss']:.3f}  "
                      f"start-up {r['startup_s'] or float('nan'):.1f} s  RSS {r['peak_rss_mb']:,.0f} MB  "
                      f"load {r['load']:.2f}", flush=True)
    if set(args.tools) == set(TOOLS):
        report(runs, args.configs)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps({"machine": C.machine_note(), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
