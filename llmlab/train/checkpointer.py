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

log = logging.getLogger("llmlab")


class Checkpointer:
    """Saves and restores one stage's checkpoints under ``<stage_dir>/checkpoints``.

    Keys read: ``save_every``, ``keep_last``, ``save_best_only``, ``reset_optimizer``, ``optimizer.name``;
    the stage's ``scheduler`` section as given is stored in each checkpoint (a changed schedule is
    fast-forwarded rather than loaded).

    Attributes:
        best_eval, best_step: the lowest ``eval_loss`` seen (on the main process) and its step.
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
        self.save_best_only = bool(tc.save_best_only)
        self.optimizer_name = tc.optimizer.name
        self.scheduler_cfg = stage.config.get("scheduler")
        self.reset_optimizer = bool(tc.reset_optimizer)
        self.best_eval, self.best_step = math.inf, None
        self.last_good: str | None = None
        self.resumed_from: int | None = None

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
        if saved_format != self.state_io.optimizer_format and not weights_only:
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
        self.stage.load_state_dict(state["stage_state"])
        self.resumed_from, self.last_good = start_step, str(ckpt)
        log.info("stage %s: resuming from %s (step %d)", self.name, ckpt, start_step)
        return start_step

    # -- best ------------------------------------------------------------------------------
    def observe_eval(self, step: int, eval_loss: float | None) -> bool:
        """Record an evaluation at ``step`` (``eval_loss`` is None off the main process).

        Returns:
            whether it is a new best; the same answer on every rank (broadcast from rank 0).
        """
        improved = False
        if self.accelerator.is_main_process and eval_loss is not None and eval_loss < self.best_eval:
            self.best_eval, self.best_step, improved = eval_loss, step, True
        if self.accelerator.num_processes > 1:  # every rank must take the same save decision
            from accelerate.utils import broadcast_object_list

            improved = broadcast_object_list([improved], from_process=0)[0]
        return improved

    def restore_best(self, model: torch.nn.Module) -> None:
        """Under ``save_best_only``, load the best checkpoint's weights unless the last step was best."""
        if self.save_best_only and self.best_step is not None and self.best_step != self.max_steps:
            best = self.layout.checkpoint(self.best_step)
            if best.is_dir() and ckpt_lib.verify(best) is None:
                ckpt_lib.load_checkpoint(best, model=model, state_io=self.state_io)

    # -- save ------------------------------------------------------------------------------
    def may_save(self, step: int, eval_due: bool) -> bool:
        """Whether a checkpoint can be written at ``step`` (before the evaluation decides)."""
        return step % self.save_every == 0 or step == self.max_steps or (self.save_best_only and eval_due)

    def due(self, step: int, improved: bool) -> bool:
        """Whether to write a checkpoint at ``step``."""
        return step % self.save_every == 0 or step == self.max_steps or (self.save_best_only and improved)

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
        """Write ``checkpoints/step-NNNNNN`` (main process; every rank waits) and prune old ones.

        Raises:
            TrainingError: a trainable weight is NaN or infinite; nothing is written, so the last
                good checkpoint named in the message is finite.
        """
        self.accelerator.wait_for_everyone()
        bad = nonfinite_parameters(model, collective=self.state_io.collective)
        if bad:
            raise TrainingError(f"stage {self.name}: after step {step} {len(bad)} weight tensor(s) are not finite "
                                f"(first: {bad[0]}); not saved. The last good checkpoint is {self.last_good or 'none'} "
                                "(lower the lr or set grad_clip)")
        main = self.accelerator.is_main_process
        io = self.state_io  # under FSDP every rank joins the gather; rank 0 gets the full state
        model_state = io.model_state(model) if main or io.collective else None
        optimizer_state = io.optimizer_state(model, optimizer) if main or io.collective else None
        if main:
            protect = {self.best_step} if self.save_best_only and self.best_step else set()
            self.last_good = str(ckpt_lib.save_checkpoint(
                self.root, step, model_state=model_state, optimizer_state=optimizer_state, scheduler=scheduler,
                stage_state=self.stage.state_dict(), trainer_state=self.trainer_state(), keep_last=self.keep_last,
                protect=protect))
        self.accelerator.wait_for_everyone()

    def trainer_state(self) -> dict:
        """What ``trainer_state.json`` holds besides the step."""
        return {"fingerprint": self.fingerprint, "max_steps": self.max_steps, "optimizer": self.optimizer_name,
                "scheduler": self.scheduler_cfg, "best_eval": None if math.isinf(self.best_eval) else self.best_eval,
                "best_step": self.best_step, "optimizer_format": self.state_io.optimizer_format}


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
