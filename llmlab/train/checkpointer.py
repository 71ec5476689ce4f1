"""The training loop's checkpointer: resume policy, periodic and best saves, pruning, best restore.

Every checkpoint a stage writes goes through :meth:`Checkpointer.save` (which refuses non-finite
weights, so a checkpoint is always finite), and every resume through :meth:`Checkpointer.resume`. The files and their atomic
write are :mod:`llmlab.train.checkpoint`'s.
"""

from __future__ import annotations

import json
import logging
import math
import warnings

import torch

from llmlab.config import TrainingConfig
from llmlab.layout import StageLayout
from llmlab.stages.base import Stage
from llmlab.train import checkpoint as ckpt_lib
from llmlab.train.errors import TrainingError
from llmlab.train.resharding import batch_change  # noqa: F401  (re-exported: its home before resharding.py)

log = logging.getLogger("llmlab")


class Checkpointer:
    """Saves and restores one stage's checkpoints under ``<stage_dir>/checkpoints``.

    Keys read: ``save_every``, ``keep_last``, ``save_best_only``, ``early_stopping`` (which implies the
    best-checkpoint keeping of ``save_best_only``), ``reset_optimizer``, ``optimizer.name``;
    the stage's ``scheduler`` section as given is stored in each checkpoint (a changed schedule is
    fast-forwarded rather than loaded).

    Attributes:
        best_eval, best_step: the lowest ``eval_loss`` seen (on the main process) and its step
            (under early stopping: the lowest that beat the best before it by more than ``min_delta``).
        bad_evals: evaluations in a row without such an improvement (early stopping's counter,
            kept in each checkpoint so a resumed stage stops where an uninterrupted one would).
        stopped_at: the step early stopping ended the stage at (None: it did not).
        last_good: the newest checkpoint written or resumed from (named in non-finite loss errors).
        resumed_from: the step resumed from, or None for a fresh start.
    """

    def __init__(self, stage: Stage, tc: TrainingConfig, *, fingerprint: str, accelerator, state_io=None):
        self.stage = stage
        self.state_io = state_io or ckpt_lib.LOCAL  # whole model, or FSDP shards gathered / sliced
        self.name = stage.ctx.name
        self.layout = StageLayout(stage.ctx.stage_dir)
        self.root = self.layout.checkpoints
        self.fingerprint = fingerprint
        self.max_steps = tc.max_steps
        self.accelerator = accelerator
        self.save_every = int(tc.save_every)
        self.keep_last = int(tc.keep_last)
        self.early_stopping = tc.early_stopping
        self.save_best_only = bool(tc.save_best_only) or self.early_stopping is not None
        self.optimizer_name = tc.optimizer.name
        self.scheduler_cfg = stage.ctx.plan.config.get("scheduler")  # as written: checkpoints compare it as JSON
        self.reset_optimizer = bool(tc.reset_optimizer)
        self.best_eval, self.best_step = math.inf, None
        self.bad_evals, self.stopped_at = 0, None
        self.last_good: str | None = None
        self.resumed_from: int | None = None
        #: DCP shards written in the background (distributed.async_checkpoint; FSDP only)
        self.async_save = bool(self.state_io.async_save)
        self._inflight: PendingSave | None = None
        self._group = None
        #: what a step's data is: micro-batch size, accumulation, processes (stored in each checkpoint)
        self.batch = {"batch_size": int(tc.batch_size),
                      "gradient_accumulation_steps": int(tc.gradient_accumulation_steps),
                      "world_size": int(accelerator.num_processes)}

    # -- resume ----------------------------------------------------------------------------
    def resume(self, model: torch.nn.Module, optimizer, scheduler, *, reset_optimizer: bool = False) -> int:
        """Load the newest intact checkpoint, if any, into ``model`` / ``optimizer`` / ``scheduler``.

        Loads the weights only (fresh optimizer, schedule fast-forwarded) when ``reset_optimizer``
        (or the stage's ``reset_optimizer``) is set or the checkpoint's optimizer or the keys of its
        optimizer state (parameter index, or names under FSDP) differ from this run's (with a
        warning); the scheduler state only when ``max_steps`` and ``scheduler`` are
        unchanged. Restores RNG states and the stage's own state.

        Returns:
            the step to continue from (0 when there is no checkpoint).
        """
        ckpt = ckpt_lib.latest_intact(self.root)
        if ckpt is None:
            return 0
        info = json.loads((ckpt / "trainer_state.json").read_text())
        weights_only = reset_optimizer or self.reset_optimizer
        if info.get("optimizer") != self.optimizer_name and not weights_only:
            warnings.warn(f"stage {self.name}: the checkpoint was trained with optimizer {info.get('optimizer')!r}, "
                          f"the recipe now says {self.optimizer_name!r}: loading the weights only")
            weights_only = True
        saved_format = info.get("optimizer_format", "param_index")
        if saved_format not in (self.state_io.optimizer_format, DCP_FORMAT) and not weights_only:
            warnings.warn(f"stage {self.name}: the checkpoint's optimizer state is keyed by {saved_format} (written "
                          f"under another distributed strategy), this run's by {self.state_io.optimizer_format}: "
                          "loading the weights only")
            weights_only = True
        same_schedule = info.get("max_steps") == self.max_steps and info.get("scheduler") == self.scheduler_cfg
        state = ckpt_lib.load_checkpoint(ckpt, model=model, optimizer=None if weights_only else optimizer,
                                         scheduler=scheduler if (same_schedule and not weights_only) else None,
                                         state_io=self.state_io)
        start_step = int(state["trainer_state"]["step"])
        if not same_schedule or weights_only:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(start_step):
                    scheduler.step()
        self.best_eval = state["trainer_state"].get("best_eval", math.inf) or math.inf
        self.best_step = state["trainer_state"].get("best_step")
        self.bad_evals = int(state["trainer_state"].get("bad_evals") or 0)
        if self._patience_spent(start_step):  # killed after stopping, before stage.json said done
            self.stopped_at = start_step
        self.stage.load_state_dict(state["stage_state"])
        self.resumed_from, self.last_good = start_step, str(ckpt)
        log.info("stage %s: resuming from %s (step %d)", self.name, ckpt, start_step)
        note = batch_change(info.get("batch"), self.batch)
        if note:
            warnings.warn(f"stage {self.name}: {note}")
        return start_step

    # -- best ------------------------------------------------------------------------------
    def observe_eval(self, step: int, eval_loss: float | None) -> bool:
        """Record an evaluation at ``step`` (``eval_loss`` is None off the main process).

        Returns:
            whether it is a new best; the same answer on every rank (broadcast from rank 0).
        """
        improved = False
        min_delta = self.early_stopping.min_delta if self.early_stopping else 0.0
        if self.accelerator.is_main_process and eval_loss is not None:
            improved, _ = plateau_update(self.best_eval, 0, eval_loss, min_delta)
            if improved:
                self.best_eval, self.best_step = eval_loss, step
        if self.accelerator.num_processes > 1:  # every rank must take the same save decision
            from accelerate.utils import broadcast_object_list

            improved = broadcast_object_list([improved], from_process=0)[0]
            if improved:  # every rank knows the best step: restoring it is a collective under FSDP
                self.best_step = step
        self.bad_evals = 0 if improved else self.bad_evals + 1  # the same on every rank
        if self._patience_spent(step):
            self.stopped_at = step
            log.info("stage %s: early stopping at step %d: eval_loss has not improved by more than %g for %d "
                     "evaluations; final/ gets the best step, %s", self.name, step, min_delta, self.bad_evals,
                     self.best_step)
        return improved

    def _patience_spent(self, step: int) -> bool:
        """Whether early stopping ends the stage at ``step`` (never at max_steps: it ends there anyway)."""
        es = self.early_stopping
        return es is not None and self.bad_evals >= es.patience and step < self.max_steps

    def early_stopping_record(self) -> dict | None:
        """What stage.json says of an early stop (None when the stage ran to ``max_steps``)."""
        if self.stopped_at is None:
            return None
        es = self.early_stopping
        return {"stopped_at": self.stopped_at, "best_step": self.best_step,
                "best_eval_loss": None if math.isinf(self.best_eval) else self.best_eval,
                "patience": es.patience, "min_delta": es.min_delta}

    @property
    def should_stop(self) -> bool:
        """Whether early stopping has ended the stage (the same answer on every rank)."""
        return self.stopped_at is not None

    def restore_best(self, model: torch.nn.Module, last_step: int) -> None:
        """Under ``save_best_only`` or ``early_stopping``, load the best checkpoint's weights unless
        ``last_step`` (the step training ended at) was the best."""
        self.finish()
        if self.save_best_only and self.best_step is not None and self.best_step != last_step:
            best = self.layout.checkpoint(self.best_step)
            if best.is_dir() and ckpt_lib.verify(best) is None:
                ckpt_lib.load_checkpoint(best, model=model, state_io=self.state_io)

    # -- save ------------------------------------------------------------------------------
    def may_save(self, step: int, eval_due: bool) -> bool:
        """Whether a checkpoint can be written at ``step`` (before the evaluation decides)."""
        return step % self.save_every == 0 or step == self.max_steps or (self.save_best_only and eval_due)

    def due(self, step: int, improved: bool) -> bool:
        """Whether to write a checkpoint at ``step`` (also where early stopping ends the stage)."""
        return (step % self.save_every == 0 or step == self.max_steps or (self.save_best_only and improved)
                or self.should_stop)

    def check_finite(self, loss: torch.Tensor, step: int, grad_norm=None) -> None:
        """Raise when the training loss or the gradient norm of ``step`` is NaN or infinite (a
        non-finite gradient norm means the update just taken poisoned the weights, even while the
        loss, computed before it, still looks fine).

        Raises:
            TrainingError: naming the step and the last good checkpoint (which is kept).
        """
        if not torch.isfinite(loss):
            what = f"loss is {float(loss)}"
        elif grad_norm is not None and not math.isfinite(float(grad_norm)):
            what = f"the gradient norm is {float(grad_norm)}"
        else:
            return
        raise TrainingError(f"stage {self.name}: {what} at step {step}; the last good checkpoint is "
                            f"{self.last_good or 'none'} (lower the lr or set grad_clip)")

    def save(self, step: int, model: torch.nn.Module, optimizer, scheduler) -> None:
        """Write ``checkpoints/step-NNNNNN`` and prune old ones: the main process writes it (every
        rank waits); under FSDP every rank first writes its DCP shards into it (:mod:`llmlab.train.dcp`).

        Under ``distributed.async_checkpoint`` (FSDP) the shards are copied to CPU memory and
        written in the background while training goes on; the folder is finalised (its other
        files, MANIFEST.json, the rename into place, pruning) on rank 0 once every shard is on
        disk. One save is in flight at a time: the next save, :meth:`finish` and
        :meth:`restore_best` wait for it first.

        Raises:
            TrainingError: a trainable weight is NaN or infinite; nothing is written, so the last
                good checkpoint named in the message is finite. Or the previous asynchronous save
                failed (:meth:`finish`).
        """
        self.finish()
        self.accelerator.wait_for_everyone()
        bad = nonfinite_parameters(model, collective=self.state_io.collective)
        if bad:
            raise TrainingError(f"stage {self.name}: after step {step} {len(bad)} weight tensor(s) are not finite "
                                f"(first: {bad[0]}); not saved. The last good checkpoint is {self.last_good or 'none'} "
                                "(lower the lr or set grad_clip)")
        main = self.accelerator.is_main_process
        io = self.state_io
        tmp = model_state = optimizer_state = None
        if io.writes_shards:  # FSDP: every rank writes its DCP shards into rank 0's temporary folder
            tmp = self._shared_tmp(step)
            try:
                from llmlab.train import dcp

                if self.async_save:
                    upload = dcp.async_save(tmp, model, optimizer, self._save_group())
                    self._inflight = PendingSave(step, upload, self._finaliser(step, scheduler, tmp) if main else None)
                    return
                dcp.save(tmp, model, optimizer)
            except BaseException:
                if main:
                    ckpt_lib.remove_owned(tmp)
                raise
        elif main:
            model_state, optimizer_state = io.model_state(model), io.optimizer_state(model, optimizer)
        if main:
            protect = {self.best_step} if self.save_best_only and self.best_step else set()
            self.last_good = str(ckpt_lib.save_checkpoint(
                self.root, step, model_state=model_state, optimizer_state=optimizer_state, scheduler=scheduler,
                stage_state=self.stage.state_dict(), trainer_state=self.trainer_state(), keep_last=self.keep_last,
                protect=protect, tmp=tmp))
        self.accelerator.wait_for_everyone()

    def _finaliser(self, step: int, scheduler, tmp):
        """What rank 0 runs once the shards of an asynchronous save are on disk: write the rest
        of checkpoint ``step`` into ``tmp`` from the state captured now (scheduler, RNG, stage
        and trainer state: training moves them on meanwhile), checksum it and rename it into
        place. Returns the checkpoint's path."""
        import copy

        protect = {self.best_step} if self.save_best_only and self.best_step else set()
        frozen, rng = ckpt_lib.FrozenState(scheduler), ckpt_lib.rng_state()
        stage_state, trainer_state = copy.deepcopy(self.stage.state_dict()), self.trainer_state()

        def finalise() -> str:
            return str(ckpt_lib.save_checkpoint(
                self.root, step, model_state=None, optimizer_state=None, scheduler=frozen, stage_state=stage_state,
                trainer_state=trainer_state, keep_last=self.keep_last, protect=protect, tmp=tmp, rng=rng))

        return finalise

    def _save_group(self):
        """The gloo process group asynchronous saves run their collectives on (made on the first
        one; every rank saves at the same steps, so every rank makes it at the same point)."""
        if self._group is None:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")
        return self._group

    def finish(self) -> None:
        """Wait until the asynchronous save in flight (if any) is written and finalised. Every
        rank calls it (a collective when there are several): the loop at the end of training,
        :meth:`save` and :meth:`restore_best` before theirs.

        Raises:
            TrainingError: a rank failed to write its shards, or rank 0 to finalise the folder
                (on every rank, naming them); the previous checkpoint is intact.
        """
        pending, self._inflight = self._inflight, None
        if pending is None:
            return
        path, error = pending.wait()
        errors = [error]
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            errors = [None] * self.accelerator.num_processes
            dist.all_gather_object(errors, error)
        failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
        if failed:
            raise TrainingError(f"stage {self.name}: checkpoint step {pending.step} was not written "
                                f"({'; '.join(failed)}); the last good checkpoint is {self.last_good or 'none'}")
        if path is not None:
            self.last_good = path

    def _shared_tmp(self, step: int):
        """Rank 0 makes checkpoint ``step``'s temporary folder; every rank gets its path (or the
        error rank 0 met, raised on every rank so none waits in a collective).

        Raises:
            TrainingError: the folder could not be made (e.g. NotOwnedError's message).
        """
        made: list = [None, None]
        if self.accelerator.is_main_process:
            try:
                made[0] = str(ckpt_lib.begin_checkpoint(self.root, step))
            except (OSError, RuntimeError) as exc:
                made[1] = f"{type(exc).__name__}: {exc}"
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            made = broadcast_object_list(made, from_process=0)
        if made[1] is not None:
            raise TrainingError(f"stage {self.name}: cannot write checkpoint step {step}: {made[1]}")
        from pathlib import Path

        return Path(made[0])

    def trainer_state(self) -> dict:
        """What ``trainer_state.json`` holds besides the step."""
        io = self.state_io
        return {"fingerprint": self.fingerprint, "max_steps": self.max_steps, "optimizer": self.optimizer_name,
                "scheduler": self.scheduler_cfg, "best_eval": None if math.isinf(self.best_eval) else self.best_eval,
                "best_step": self.best_step, "bad_evals": self.bad_evals,
                "optimizer_format": DCP_FORMAT if io.writes_shards else io.optimizer_format, "batch": self.batch}


class PendingSave:
    """One asynchronous checkpoint in flight: ``upload`` (DCP's future for this rank's shards)
    and then, on rank 0, ``finalise`` (which writes, checksums and renames the folder), both off
    the training thread."""

    def __init__(self, step: int, upload, finalise):
        from concurrent.futures import Future

        self.step = step
        self._done: Future = Future()

        def then(fut) -> None:
            try:
                fut.result()
                self._done.set_result(finalise() if finalise is not None else None)
            except BaseException as exc:  # reported by wait() on the training thread
                self._done.set_exception(exc)

        upload.add_done_callback(then)

    def wait(self) -> tuple[str | None, str | None]:
        """Block until done. Returns (the checkpoint's path on rank 0 else None, None) or
        (None, what went wrong)."""
        try:
            return self._done.result(), None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"


def plateau_update(best: float, bad_evals: int, eval_loss: float, min_delta: float) -> tuple[bool, int]:
    """One evaluation of the early-stopping rule (Prechelt 1998, "Early stopping — but when?"; as
    Keras' ``EarlyStopping``): an ``eval_loss`` below ``best - min_delta`` is an improvement (and the
    new best); any other value adds one to the evaluations without improvement. A NaN never improves.

    Returns:
        (improved, evaluations without improvement after this one); the stage stops once the
        second reaches ``patience``.
    """
    if eval_loss < best - min_delta:
        return True, 0
    return False, bad_evals + 1


#: trainer_state.json's ``optimizer_format`` of a checkpoint holding DCP shards (llmlab.train.dcp):
#: any strategy and world size loads its optimizer state
DCP_FORMAT = "dcp"


def nonfinite_parameters(model: torch.nn.Module, collective: bool = False) -> list[str]:
    """Names of the trainable parameters holding a NaN or an infinity (one device sync in all).

    ``collective``: the parameters are FSDP shards (DTensors); each rank checks its own shard and
    the flags are all-reduced, so every rank gets the same answer (and takes the same branch).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return []

    def local(p):
        return p.to_local() if hasattr(p, "to_local") else p

    flags = torch.stack([torch.isfinite(local(p.detach())).all() for _, p in named])
    if collective:
        import torch.distributed as dist

        flags = flags.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    flags = flags.bool().cpu()
    return [n for (n, _), ok in zip(named, flags.tolist()) if not ok]
