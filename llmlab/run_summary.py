"""The run's summary table (``llmlab run``'s last table) and the cells it shares with the model
card (:mod:`llmlab.push`): key eval metrics per stage type, the held-out coverage, the MFU."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

#: eval metrics worth a glance in the summary table, per stage type (the first found are shown)
KEY_METRICS = (("eval_rewards/accuracies", "acc"), ("eval_rewards/margins", "margin"),
               ("eval_preference_loss", "pref loss"), ("eval_nll_loss", "nll"), ("eval_accuracy", "acc"),
               ("eval_margin", "margin"), ("eval_exact_answer", "exact"), ("eval_reward", "reward"))


def key_metrics(last_eval: dict, first_eval: dict | None = None) -> str:
    """e.g. ``acc 0.62, margin 0.48`` from a stage's last eval record, or ``acc 0.50 → 0.62, …``
    with the stage's first eval record (step 0: the model the stage started from)."""
    first = first_eval or {}

    def one(k: str, label: str) -> str:
        was = f"{first[k]:.3f} → " if k in first and first is not last_eval else ""
        return f"{label} {was}{last_eval[k]:.3f}"
    return ", ".join(one(k, label) for k, label in KEY_METRICS if k in last_eval) or "-"


def coverage_note(last_eval: dict) -> str:
    """`` (80/123 ex.)`` when a stage's eval_loss covers only part of its held-out set (eval_steps ×
    batch_size examples, evenly spaced; docs/evaluation.md), else empty."""
    n, total = last_eval.get("eval_examples"), last_eval.get("eval_heldout_examples")
    return f" ({n}/{total} ex.)" if n is not None and total is not None and n < total else ""


def mfu_cell(flops: dict | None) -> str:
    """The summary's MFU cell from stage.json's ``flops``: ``"12.3 % (0.45 TFLOP/s)"``, or ``-``."""
    if not flops or flops.get("mfu") is None:
        return "-"
    return f"{flops['mfu']:.1%} ({flops['tflops']:.3g} TFLOP/s)"


def summary_table(outcomes: list, out_dir: Path) -> Table:
    """The final table of ``outcomes`` (:class:`llmlab.stage_run.StageOutcome`): stage, action, steps, first and last loss, eval loss (the held-out loss of
    docs/evaluation.md; with the share of the held-out set it covers when not all), wall time, MFU
    (over this run of the stage, evaluations and checkpoints included), output."""
    t = Table(title=f"llmlab run → {out_dir}")
    for col in ("stage", "type", "action", "steps", "loss first → last", "eval loss first → last", "eval metrics",
                "wall time", "MFU", "output"):
        t.add_column(col)

    def f(x):
        return "-" if x is None else f"{x:.4f}"

    for o in outcomes:
        i = o.info
        fe, le = (i.get("first_eval") or {}).get("eval_loss"), (i.get("last_eval") or {}).get("eval_loss")
        t.add_row(o.name, o.type, o.action, str(i.get("steps", "-")), f"{f(i.get('first_loss'))} → {f(i.get('last_loss'))}",
                  f"{f(fe)} → {f(le)}{coverage_note(i.get('last_eval') or {})}", key_metrics(i.get("last_eval") or {}, i.get("first_eval")), f"{i.get('wall_time_s', 0):.1f} s",
                  mfu_cell(i.get("flops")),
                  str((i.get("outputs") or {}).get("final") or (i.get("outputs") or {}).get("results") or "-"))
    return t
