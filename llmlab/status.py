"""The status of a stage in a run directory: done | extend | partial | stale | pending, and why.

Typed inputs only: a stage's :class:`~llmlab.runplan.StagePlan` (:func:`plan_stage_status`, what
:meth:`llmlab.runplan.RunPlan.statuses` calls once per stage), or its directory, its fingerprint
record (``{"fingerprint", "parts", "output"}``, computed once by the plan builder) and its step
count. Nothing here reads the recipe or computes a fingerprint. Pure Python (no torch).
"""

from __future__ import annotations

from pathlib import Path

from llmlab.layout import StageLayout


def explain_change(old: dict | None, new: dict) -> str:
    """A short human reason why a stage's fingerprint parts changed, e.g.
    ``config.optimizer.lr: 0.003 → 0.001``."""
    if not old:
        return "no record of the previous fingerprint"
    diffs: list[str] = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            if path.startswith("inputs."):
                diffs.append(f"input stage {path.split('.', 1)[1]} changed")
            elif path.startswith("data."):
                diffs.append(f"dataset {path.split('.', 1)[1]} changed")
            elif path == "tokenizer":
                diffs.append("tokenizer changed")
            else:
                diffs.append(f"{path}: {a!r} → {b!r}")

    walk(old, new, "")
    return "; ".join(diffs[:4]) + (" …" if len(diffs) > 4 else "") if diffs else "unknown change"


def read_stage_json(stage_dir: Path) -> dict | None:
    """``<stage_dir>/stage.json`` as a dict, or None when missing or unreadable."""
    return StageLayout(Path(stage_dir)).read_record()


def latest_checkpoint_step(stage_dir: Path) -> int | None:
    """Step of the newest checkpoint directory (not verified; plan's quick look)."""
    return StageLayout(Path(stage_dir)).latest_checkpoint_step()


def _done_status(info: dict, max_steps: int) -> tuple[str, str]:
    """(status, detail) of a training stage whose stage.json says done under its fingerprint."""
    done_steps = int(info.get("max_steps") or 0)
    if done_steps < max_steps:
        return "extend", f"continues from step {done_steps} to {max_steps}"
    if done_steps > max_steps:
        return "stale", f"max_steps lowered from {done_steps} to {max_steps}"
    earlier = info.get("extended_from") or []
    if earlier:  # the schedule was recomputed at each extension: not a fresh run's weights
        return "done", (f"{done_steps} steps, extended from {' → '.join(map(str, earlier))}; "
                        f"differs from a fresh {done_steps}-step run (--force retrains it)")
    es = info.get("early_stopping")
    if es:  # done: patience ran out before max_steps
        return "done", f"early stopped at step {es.get('stopped_at')} of {done_steps}; final/ holds step {es.get('best_step')}"
    return "done", f"{done_steps} steps"


def stage_status(stage_dir: Path, fp: dict, max_steps: int) -> tuple[str, str]:
    """(status, detail) of one training stage: done | extend | partial | stale | pending.

    ``fp``: its fingerprint record (:attr:`llmlab.runplan.StagePlan.fingerprint_record`);
    ``max_steps``: the steps the recipe asks for (more than stage.json's: extend)."""
    layout = StageLayout(Path(stage_dir))
    info = layout.read_record()
    ck = layout.latest_checkpoint_step()
    if info is None:
        return ("partial", f"at step {ck}") if ck else ("pending", "")
    if info.get("fingerprint") != fp["fingerprint"]:
        return "stale", explain_change(info.get("parts"), fp["parts"])
    if info.get("status") == "done" and not (layout.final / "config.json").is_file():
        return ("partial", f"final/ is missing; at step {ck}") if ck else ("pending", "final/ is missing")
    if info.get("status") == "done":
        return _done_status(info, max_steps)
    if info.get("status") == "stopped":
        return "partial", f"stopped by max_time; at step {ck}"
    return ("partial", f"at step {ck}") if ck else ("pending", "started, no checkpoint yet")


def results_stage_status(stage_dir: Path, fp: dict, results_file: str) -> tuple[str, str]:
    """(status, detail) of a stage that trains nothing (evaluate): ``done`` (stage.json says done with
    this fingerprint and ``results_file`` exists), ``stale`` (another fingerprint; detail says what
    changed) or ``pending``. The counterpart of :func:`stage_status`, which looks for final/ and steps."""
    info = read_stage_json(stage_dir)
    if info is None:
        return "pending", ""
    if info.get("fingerprint") != fp["fingerprint"]:
        return "stale", explain_change(info.get("parts"), fp["parts"])
    if info.get("status") == "done":
        if (Path(stage_dir) / results_file).is_file():
            return "done", results_file
        return "pending", f"{results_file} is missing"
    return "pending", "started, not finished"


def plan_stage_status(stage) -> tuple[str, str]:
    """(status, detail) of a planned stage (a :class:`llmlab.runplan.StagePlan`; not imported here:
    the plan imports this module), by its spec's rule: :func:`stage_status` for a stage
    that trains, :func:`results_stage_status` for one that writes results (reads its stage.json once)."""
    if not stage.trains:
        return results_stage_status(stage.layout.dir, stage.fingerprint_record(), stage.spec.results_file)
    return stage_status(stage.layout.dir, stage.fingerprint_record(), stage.training.max_steps)


__all__ = ["explain_change", "latest_checkpoint_step", "plan_stage_status", "read_stage_json",
           "results_stage_status", "stage_status"]
