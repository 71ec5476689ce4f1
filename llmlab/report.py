"""``llmlab report RUN_DIR``: loss and eval curves of every stage to a PNG, the summary table, and
the replies to each stage's ``sample_prompts`` (first and last sampled step)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from llmlab.console import make_console
from llmlab.metricsfile import read_records
from llmlab.layout import RunLayout, StageLayout


def read_metrics(stage_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a stage's metrics.jsonl."""
    train, evals = [], []
    for rec in read_records(StageLayout(stage_dir).metrics):
        if "samples" in rec:  # replies to sample_prompts: read_samples
            continue
        (evals if "eval_loss" in rec else train).append(rec)
    return train, evals


def read_samples(stage_dir: Path) -> list[dict]:
    """The ``samples`` records of a stage's metrics.jsonl (``{"step", "samples": [{"prompt",
    "greedy", "sampled", "seed"}]}``, :mod:`llmlab.train.samples`), in step order."""
    return [rec for rec in read_records(StageLayout(stage_dir).metrics) if "samples" in rec]


def _one_line(text: str) -> str:
    """``text`` with its line breaks shown as ``\\n`` (a reply of blank lines stays one row)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def samples_table(stage_dir: Path) -> Table | None:
    """The replies to ``sample_prompts`` at the stage's first and last sampled steps (None: none)."""
    records = read_samples(stage_dir)
    if not records:
        return None
    shown = [records[0]] if len(records) == 1 else [records[0], records[-1]]
    t = Table(title=f"{stage_dir.name}: replies to sample_prompts (greedy / sampled)")
    for col in ("step", "prompt", "greedy", "sampled"):
        t.add_column(col, overflow="fold")
    for rec in shown:
        for s in rec["samples"]:
            t.add_row(str(rec["step"]), *(_one_line(s[k]) for k in ("prompt", "greedy", "sampled")))
    return t


def stage_dirs(run_dir: Path) -> list[Path]:
    """Stage directories of a run, in the order of its resolved recipe when present."""
    order: list[str] = []
    resolved = RunLayout(run_dir).resolved_recipe
    if resolved.exists():
        import yaml

        stages = (yaml.safe_load(resolved.read_text()) or {}).get("stages")
        order = list(stages) if isinstance(stages, dict) else []
    found = {d.name: d for d in run_dir.iterdir() if StageLayout(d).record.is_file()}
    return [found[n] for n in order if n in found] + [d for n, d in sorted(found.items()) if n not in order]


def plot(run_dir: Path, out: Path) -> Path:
    """Draw one panel per stage (train loss and eval loss against step) into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = stage_dirs(run_dir)
    if not stages:
        raise FileNotFoundError(f"{run_dir}: no stage with a stage.json (is this a llmlab run directory?)")
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.6), squeeze=False)
    for ax, d in zip(axes[0], stages):
        train, evals = read_metrics(d)
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
        info = json.loads(StageLayout(d).record.read_text())
        ax.set_title(f"{d.name} ({info.get('type', '?')})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report_command(run_dir: Path, output: Path | None = None) -> int:
    """Print the summary table of a run and write its curves to ``output`` (default
    ``RUN_DIR/report.png``). Returns the exit status."""
    console = make_console()
    run_dir = Path(run_dir)
    try:
        png = plot(run_dir, output or run_dir / "report.png")
    except FileNotFoundError as e:
        console.print(f"error: {e}", style="red")
        return 1
    t = Table(title=str(run_dir))
    for col in ("stage", "type", "status", "steps", "loss first → last", "eval loss first → last", "wall time"):
        t.add_column(col)
    for d in stage_dirs(run_dir):
        i = json.loads(StageLayout(d).record.read_text())
        fe = (i.get("first_eval") or {}).get("eval_loss")
        le = (i.get("last_eval") or {}).get("eval_loss")
        fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        t.add_row(d.name, str(i.get("type")), str(i.get("status")), str(i.get("steps", "-")),
                  f"{fmt(i.get('first_loss'))} → {fmt(i.get('last_loss'))}", f"{fmt(fe)} → {fmt(le)}",
                  f"{float(i.get('wall_time_s') or 0):.1f} s")
    console.print(t)
    for d in stage_dirs(run_dir):
        st = samples_table(d)
        if st is not None:
            console.print(st)
    console.print(f"curves: {png}")
    return 0
