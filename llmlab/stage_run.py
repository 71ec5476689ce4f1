"""Running one stage of a run session: where its weights start, training it (or, for a stage that
trains nothing, computing its results), and its ``stage.json`` (:class:`llmlab.layout.StageRecord`)
from ``start()`` to ``finish()``.

:class:`llmlab.runner.Runner` decides what runs (skip, start over, resume) and builds the stage;
the functions here run it on the :class:`llmlab.session.RunSession` and say what happened as a
:class:`StageOutcome`.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

from llmlab.layout import RunLayout, StageLayout, StageRecord
from llmlab.metricsfile import read_records
from llmlab.ownership import make_dir
from llmlab.runplan import PretrainedSpec, RunPlan, StagePlan
from llmlab.session import RunError, RunSession, package_versions, processes_here


@dataclass
class StageOutcome:
    """What one stage did in a run: ``action`` is ran | resumed | extended | skipped | stopped, and
    ``info`` its stage.json."""

    name: str
    type: str
    action: str
    info: dict


def now() -> str:
    """The current UTC time as ISO 8601 (seconds), as stage.json records times."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def load_stage_output(stage_dir: Path) -> Path:
    """The HF-format directory a downstream stage starts from.

    Raises:
        RunError: the stage has no finished output.
    """
    final = StageLayout(stage_dir).final
    if (final / "config.json").is_file():
        return final
    raise RunError(f"stage {stage_dir.name} has no finished output at {final}; run it first")


def _model_base(plan: RunPlan, stage: StagePlan) -> Path | None:
    """The weights ``stage``'s model is built on: its ``weights_from`` stage's final/, or — when it
    continues an adapter (:class:`llmlab.runplan.StageInit`) — that adapter's own base; None: the
    ``model:`` section."""
    if stage.init.adapter_from is not None:
        return _model_base(plan, plan.stage(stage.init.adapter_from))
    frm = stage.init.weights_from
    return None if frm is None else plan.stage(frm).layout.final


def init_weights(plan: RunPlan, stage: StagePlan) -> tuple[Path | None, Path | None]:
    """(init_path, init_adapter) of ``stage`` from its :attr:`~llmlab.runplan.StagePlan.init`: its
    ``weights_from`` stage's final/, or — when it continues the unmerged adapter of
    ``adapter_from`` — that stage's adapter/ and the adapter's base (an adapter trained on the
    ``model:`` section itself is continued from the merged final/ instead).

    Raises:
        RunError: the ``weights_from`` stage has no final/.
    """
    frm = stage.init.weights_from
    if frm is None or not stage.trains:
        return None, None
    final = load_stage_output(plan.stage(frm).layout.dir)
    if stage.init.adapter_from is None:
        return final, None
    base = _model_base(plan, stage)
    if base is None:
        return final, None
    return base, plan.stage(stage.init.adapter_from).layout.adapter


def metrics_summary(path: Path) -> dict:
    """First and last train loss and eval metrics from metrics.jsonl (robust to resumes)."""
    out: dict = {}
    for rec in read_records(path):
        if "loss" in rec:
            out.setdefault("first_loss", rec["loss"])
            out["last_loss"] = rec["loss"]
        if "eval_loss" in rec:
            out.setdefault("first_eval", dict(rec))
            out["last_eval"] = dict(rec)
    return out


def progress_bar(console):
    """The per-stage progress bar: steps, loss, tokens/s, MFU, elapsed and remaining time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:>8,.0f} tok/s"),
                    TextColumn("{task.fields[mfu]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, transient=False)


def warn_memory(plan: RunPlan, name: str, session: RunSession, console) -> None:
    """Warn when the stage's planned peak memory is more than the device has free
    (:func:`llmlab.runguard.memory_shortfall`); a warning, not an error: it is an estimate."""
    from llmlab.plan import model_params, stage_memory, vocab_size_for
    from llmlab.runguard import memory_shortfall

    if isinstance(plan.model, PretrainedSpec):  # from_pretrained: plan has no estimate for it
        return
    vocab = vocab_size_for(plan)
    _, parts = stage_memory(plan, name, model_params(plan, vocab), vocab,
                            shards=session.distributed.shards, device=session.device.type)
    message = memory_shortfall(name, parts, session.device,
                               processes_here=processes_here(session.distributed.world_size))
    if message:
        console.print(f"warning: {message}", style="yellow", markup=False, highlight=False)


def print_evaluation(stage: StagePlan, console) -> None:
    """A stage that trains nothing (evaluate) shows its comparison table from results.json, also
    when it is skipped as done; nothing when the file is missing or unreadable."""
    if stage.trains:
        return
    from llmlab.stages.evaluate import comparison_table

    try:
        results = json.loads(stage.layout.results.read_text())
    except (OSError, ValueError):
        return
    console.print(comparison_table(results, title=f"{stage.name}: evaluation"))


def evaluate_stage(stage, plan_stage: StagePlan, session: RunSession, layout: RunLayout, console) -> StageOutcome:
    """Run a stage that trains nothing (evaluate; main process only): its results, stage.json and
    the comparison table."""
    from llmlab.stages.evaluate import comparison_table

    name, lay = plan_stage.name, plan_stage.layout
    console.print(f"[bold]▶[/] stage {name} ({plan_stage.type}: {', '.join(plan_stage.params.models)})")
    record = StageRecord.start(name, plan_stage.type, plan_stage.fingerprint, plan_stage.fingerprint_parts, now(),
                               tokenizer_sha256=session.tok_sha, versions=dict(package_versions()),
                               models=list(plan_stage.params.models))
    if session.is_main:
        make_dir(lay.dir, "stage")
        record.write(lay.record)
        t0 = time.perf_counter()
        results = stage.run()
        console.print(comparison_table(results, title=f"{name}: evaluation"))
        record.finish(finished_at=now(), wall_time_s=round(time.perf_counter() - t0, 2),
                      outputs={"results": layout.portable(lay.results)})
        record.write(lay.record)
    session.accelerator.wait_for_everyone()
    return StageOutcome(name, plan_stage.type, "ran", record.to_json())


def _training_record(stage, plan_stage: StagePlan, status: str, previous: dict, session: RunSession,
                     layout: RunLayout) -> StageRecord:
    """The stage.json of a training stage that starts (or continues: its first start time and the
    max_steps it was extended from are kept)."""
    extended_from = list(previous.get("extended_from") or [])
    if status == "extend":  # record it: an extended stage differs from a fresh run of its length
        extended_from.append(int(previous["max_steps"]))
    return StageRecord.start(
        plan_stage.name, plan_stage.type, plan_stage.fingerprint, plan_stage.fingerprint_parts,
        previous.get("started_at") or now(), tokenizer_sha256=session.tok_sha, versions=dict(package_versions()),
        max_steps=plan_stage.training.max_steps, init_path=layout.portable(stage.ctx.init_path),
        init_adapter=layout.portable(stage.ctx.init_adapter), device=session.device.type,
        precision=session.precision, threads=session.threads, distributed=session.distributed.to_json(),
        **({"extended_from": extended_from} if extended_from else {}))


def _finish_fields(result, previous: dict, lay: StageLayout) -> dict:
    """The stage.json fields every end of a training run sets: steps, tokens, time (summed over
    resumed runs), FLOPs and the first and last losses of metrics.jsonl."""
    summary = metrics_summary(lay.metrics)
    return dict(steps=result.steps, flops=result.flops or None,
                wall_time_s=round(result.wall_time_s, 2) + float(previous.get("wall_time_s") or 0.0),
                tokens=result.tokens, resumed_from=result.resumed_from,
                first_loss=summary.get("first_loss"), last_loss=summary.get("last_loss"),
                first_eval=summary.get("first_eval"), last_eval=summary.get("last_eval"))


def _print_early_stopping(name: str, es: dict, max_steps: int, console) -> None:
    best = ("no finite eval_loss: final/ holds the last step" if es["best_step"] is None else
            f"final/ holds step {es['best_step']} (eval_loss {es['best_eval_loss']:.4f})")
    console.print(f"[cyan]■[/] stage {name}: early stopping at step {es['stopped_at']} of "
                  f"{max_steps} (eval_loss did not improve by more than {es['min_delta']:g} "
                  f"in {es['patience']} evaluations); {best}", highlight=False)


def train_stage(stage, plan_stage: StagePlan, status: str, detail: str, session: RunSession, plan: RunPlan,
                console) -> StageOutcome:
    """Train ``stage`` (resuming or extending it), then write final/ and stage.json (main process);
    a stage that ``max_time`` stopped keeps its checkpoint and records ``status: stopped``."""
    import torch

    from llmlab.train.final import save_final
    from llmlab.train.loop import train

    name, lay, layout = plan_stage.name, plan_stage.layout, plan.layout
    action = {"partial": "resumed", "extend": "extended"}.get(status, "ran")
    if action != "ran":
        console.print(f"[cyan]→[/] stage {name}: {status} ({detail}); continuing")
    else:
        console.print(f"[bold]▶[/] stage {name} ({plan_stage.type})")
    if session.is_main:
        make_dir(lay.dir, "stage")
    previous = lay.read_record() or {}
    record = _training_record(stage, plan_stage, status, previous, session, layout)
    if session.is_main:
        record.write(lay.record)
        warn_memory(plan, name, session, console)
    session.accelerator.wait_for_everyone()
    with progress_bar(console) as progress:
        model, result = train(stage, fingerprint=plan_stage.fingerprint, accelerator=session.accelerator,
                              reset_optimizer=session.reset_optimizer, progress=progress if session.is_main else None)
    max_steps = plan_stage.training.max_steps
    if session.is_main and result.stopped:  # max_time: partial, resumable; no final/
        record.finish(status="stopped", **_finish_fields(result, previous, lay))
        record.write(lay.record)
        console.print(f"[yellow]■[/] stage {name}: max_time reached after step {result.steps} of {max_steps}; "
                      "checkpoint saved. Run the same command to continue it (later stages wait for it).")
        action = "stopped"
    elif session.is_main:
        model = stage.finalize(model)  # e.g. PPO detaches and saves its value head
        written = save_final(model, session.tokenizer, lay, chat=plan_stage.spec.kind != "text", lora=plan_stage.lora)
        record.finish(finished_at=now(), **_finish_fields(result, previous, lay), final_metrics=result.final_metrics,
                      outputs={k: layout.portable(v) for k, v in written.items()},
                      **({"early_stopping": result.early_stopping} if result.early_stopping else {}))
        record.write(lay.record)
        if result.early_stopping:
            _print_early_stopping(name, result.early_stopping, max_steps, console)
    session.accelerator.wait_for_everyone()
    del model
    if session.device.type == "cuda":
        torch.cuda.empty_cache()
    return StageOutcome(name, plan_stage.type, "stopped" if result.stopped else action, record.to_json())
