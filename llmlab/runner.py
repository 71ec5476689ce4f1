"""Execute a recipe's stage graph: skip finished stages, resume a partial one, start the rest.

Each stage leaves ``<output_dir>/<stage>/`` with ``final/`` (HF format), ``metrics.jsonl``,
``stage.json`` and ``checkpoints/`` (see docs/architecture.md). Outputs are written to a temporary
directory and renamed, so a kill never leaves a half-written ``final/`` that looks finished.

:class:`Runner` takes every fact from the :class:`llmlab.runplan.RunPlan`: the stages' statuses are
read once (:meth:`llmlab.runplan.RunPlan.statuses`), a stage's weights start where its
:attr:`~llmlab.runplan.StagePlan.init` says. What every stage shares is set up once
(:func:`llmlab.session.open_session`); one stage runs in :mod:`llmlab.stage_run`. The ``llmlab run``
command is :func:`llmlab.commands.run.run_command`.
"""

from __future__ import annotations

from rich.console import Console

from llmlab.console import make_console, process_rank
from llmlab.ownership import check_replaceable, check_run_dir, claim_run_dir, remove_owned
from llmlab.runplan import StagePlan, build_run_plan
from llmlab.session import RunError, RunSession, open_session, package_versions, setup_tokenizer
from llmlab.stage_run import StageOutcome, evaluate_stage, init_weights, print_evaluation, train_stage

__all__ = ["RunError", "Runner", "StageOutcome", "package_versions", "select_stages"]


def select_stages(order: list[str], only: str | None, from_stage: str | None, until: str | None) -> tuple[list[str], set[str]]:
    """(stages to consider in order, stages to rerun regardless of status).

    Raises:
        RunError: a named stage does not exist.
    """
    for opt, name in (("--only", only), ("--from", from_stage), ("--until", until)):
        if name is not None and name not in order:
            raise RunError(f"{opt} {name}: no such stage (stages: {', '.join(order)})")
    selected = list(order)
    forced: set[str] = set()
    if from_stage:
        selected = order[order.index(from_stage):]
        forced = set(selected)
    if until:
        selected = [s for s in selected if order.index(s) <= order.index(until)]
    if only:
        selected = [only]
    return selected, forced


class Runner:
    """Runs one resolved recipe in its output directory: a run session set up once, then
    :meth:`execute` for each selected stage."""

    def __init__(self, recipe: dict, console: Console | None = None, allow_code: bool = False):
        self.plan = build_run_plan(recipe)  # the stage graph: inputs, init, fingerprints, once
        self.layout = self.plan.layout
        self.out = self.plan.settings.output_dir
        self.order = self.plan.order
        self.console = console or make_console()
        self.allow_code = allow_code
        self.session: RunSession | None = None
        self.statuses: dict[str, tuple[str, str]] = {}

    def ensure_tokenizer(self):
        """(the run's tokenizer, its files' sha256), trained first when absent or changed
        (:func:`llmlab.session.setup_tokenizer`)."""
        return setup_tokenizer(self.plan, self.console)

    def claim_output_dir(self, adopt: bool = False) -> None:
        """Create or take the run directory for llmlab (:func:`llmlab.ownership.check_run_dir`,
        then :func:`~llmlab.ownership.claim_run_dir` on one process).

        Raises:
            NotOwnedError: it holds files llmlab did not write and ``adopt`` is not set (or they
                have names llmlab writes); nothing was written.
        """
        check_run_dir(self.out, self.order, adopt)
        if process_rank() != 0:  # one process marks; the others share its folder
            self.out.mkdir(parents=True, exist_ok=True)
        elif claim_run_dir(self.out):
            self.console.print(f"{self.out}: written by an llmlab before ownership markers; marked the folders it "
                               "wrote as llmlab's (other files in it are never deleted)", markup=False, highlight=False)

    def _write_resolved(self) -> None:
        """``recipe.resolved.yaml`` with the versions running it (rank 0; rewritten only when it changed)."""
        from llmlab.recipe import dump_resolved

        resolved_file = self.layout.resolved_recipe
        text = dump_resolved({**self.plan.recipe, "resolved_with": dict(package_versions())})
        if not resolved_file.is_file() or resolved_file.read_text() != text:  # a done run re-checks read-only
            resolved_file.write_text(text)

    def run(self, only=None, from_stage=None, until=None, force=False, reset_optimizer=False,
            adopt=False) -> list[StageOutcome]:
        """Execute the selected stages in order (``adopt``: run in a non-empty folder llmlab did not
        write, :func:`llmlab.ownership.check_run_dir`).

        Raises:
            RunError, llmlab.train.loop.TrainingError, NotOwnedError.
        """
        selected, forced = select_stages(self.order, only, from_stage, until)
        if force:
            forced |= set(selected)
        self.claim_output_dir(adopt)
        if process_rank() == 0:
            self._write_resolved()
        self.statuses = self.plan.statuses()
        todo = [n for n in selected if n in forced or self.statuses[n][0] != "done"]
        self._check_inputs(todo)  # before anything is deleted or trained
        if not todo:
            return [self._skip(self.plan.stage(n)) for n in selected]
        self.session = open_session(self.plan, self.console, todo, reset_optimizer)
        outcomes = []
        for name in selected:
            outcomes.append(self.execute(self.plan.stage(name), forced=name in forced))
            if outcomes[-1].action == "stopped":  # max_time: the stages after it wait for the next run
                break
        return outcomes

    def _check_inputs(self, todo: list[str]) -> None:
        """Refuse the run when a stage to run reads a stage that is neither done nor run earlier by
        this command (``--only dpo`` with a stale ``sft``).

        Raises:
            RunError: naming the stage, its input, the input's status and the command to fix it.
        """
        will_run: set[str] = set()
        for name in todo:
            for role, dep in self.plan.stage(name).inputs.items():
                if dep is not None and dep not in will_run and self.statuses[dep][0] != "done":
                    status, detail = self.statuses[dep]
                    raise RunError(f"stage {name} reads stage {dep} ({role}), which is {status}"
                                   f"{f' ({detail})' if detail else ''}; run it first (--from {dep}); "
                                   "nothing was changed")
            will_run.add(name)

    def _skip(self, stage: StagePlan) -> StageOutcome:
        self.console.print(f"[green]✓[/] stage {stage.name}: done ({self.statuses[stage.name][1]}), skipped")
        print_evaluation(stage, self.console)
        return StageOutcome(stage.name, stage.type, "skipped", stage.layout.read_record() or {})

    def _start_over(self, stage: StagePlan, why: str) -> None:
        """Remove llmlab's files of ``stage`` (a stale or forced one), keeping any other file."""
        self.console.print(f"[yellow]↻[/] stage {stage.name}: {why}; starting over")
        if self.session.is_main:
            kept = remove_owned(stage.layout.dir)
            if kept:
                self.console.print(f"  kept {len(kept)} file(s) in {stage.layout.dir} that llmlab did not write: "
                                   f"{', '.join(kept[:8])}", markup=False, highlight=False)
        self.session.accelerator.wait_for_everyone()

    def execute(self, stage_plan: StagePlan, forced: bool = False) -> StageOutcome:
        """Skip, start over, resume or start one stage on the session (its inputs must be done).

        Raises:
            RunError: an input stage is not done; NotOwnedError: its final/ or adapter/ is not llmlab's.
        """
        from llmlab.stages import stage_class
        from llmlab.stages.base import StageContext

        name, lay, session = stage_plan.name, stage_plan.layout, self.session
        status, detail = self.statuses[name]
        if status == "done" and not forced:
            return self._skip(stage_plan)
        if session.is_main:  # before anything is deleted or trained
            for out in (lay.final, lay.adapter, lay.tmp("final"), lay.tmp("adapter")):
                check_replaceable(out)
        if status == "stale" or forced:
            self._start_over(stage_plan, "forced" if forced and status != "stale" else f"stale: {detail}")
            status = "pending"
        for role, dep in stage_plan.inputs.items():
            dep_status = self.statuses[dep][0] if dep is not None else "done"
            if dep_status != "done":
                raise RunError(f"stage {name} reads stage {dep} ({role}), which is {dep_status}; run it first")
        init_path, init_adapter = init_weights(self.plan, stage_plan)
        ctx = StageContext.for_stage(self.plan, name, session.tokenizer, init_path=init_path,
                                     device=session.device, allow_code=self.allow_code, init_adapter=init_adapter)
        stage = stage_class(stage_plan.type)(ctx)
        if not stage_plan.trains:
            outcome = evaluate_stage(stage, stage_plan, session, self.layout, self.console)
        else:
            outcome = train_stage(stage, stage_plan, status, detail, session, self.plan, self.console)
        if outcome.action != "stopped":
            self.statuses[name] = ("done", "")
        return outcome
