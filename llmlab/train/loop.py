"""The one training loop every stage type runs in.

The loop owns device placement and mixed precision (accelerate), gradient accumulation and
clipping, optimizer and schedule, evaluation, logging (metrics.jsonl, progress bar, report_to
trackers), checkpoints and exact resume. A :class:`~llmlab.stages.base.Stage` supplies the model,
the batches and the loss.

Resume is exact because (1) a micro-batch is a pure function of its global index, (2) checkpoints
hold weights, optimizer, scheduler, every RNG state and the stage's own state, and (3) the step
count is part of the checkpoint. On CPU a resumed run reaches bitwise the same weights as one that
never stopped (tested in tests/test_resume.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from llmlab.config import TrainingConfig
from llmlab.data.prefetch import BatchPrefetcher, auto_num_workers, step_indices
from llmlab.models.wrappers import unwrap
from llmlab.stages.base import Stage
from llmlab.train.checkpointer import Checkpointer
from llmlab.train.errors import TrainingError, is_cpu_out_of_memory, out_of_memory
from llmlab.train.evaluator import Evaluator
from llmlab.train.flops import stage_flops_per_token
from llmlab.train.fsdp import clip_grad_norm_, gather_full_model, state_io
from llmlab.train.metrics import MetricsLogger
from llmlab.train.optim import distributed_hutchinson, needs_hessian
from llmlab.train.samples import Sampler
from llmlab.train.setup import (
    keep_freed_memory, maybe_compile, maybe_shard, setup_model, setup_optimizer, stage_model_arch,
)
from llmlab.train.tensors import scalar, to_device
from llmlab.train.timelimit import TimeLimit

__all__ = ["StageResult", "TrainingError", "stage_model_arch", "train"]


@dataclass
class StageResult:
    """What a finished stage reports: for the summary table and stage.json."""

    steps: int
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    first_eval_loss: float | None
    wall_time_s: float
    tokens: int
    resumed_from: int | None = None
    final_metrics: dict = field(default_factory=dict)
    #: where early stopping ended the stage: {"stopped_at", "best_step", "best_eval_loss", ...}; None
    #: when it ran to max_steps
    early_stopping: dict | None = None
    #: "max_time" when the stage stopped short of max_steps on its time budget (resumable), else None
    stopped: str | None = None
    #: the run's model FLOPs: {"flops_per_token", "tflops", "mfu", "peak_tflops"} ({} when unknown)
    flops: dict = field(default_factory=dict)


def train(stage: Stage, *, fingerprint: str, accelerator=None, reset_optimizer: bool = False,
          progress=None) -> tuple[torch.nn.Module, StageResult]:
    """Train ``stage`` to its ``max_steps`` (or until ``early_stopping`` ends it, with the best
    evaluation's weights), resuming from its newest intact checkpoint; with ``max_time``, stop at the
    first step boundary past it with a checkpoint (``result.stopped``).

    The loop only calls components: :mod:`llmlab.train.setup` (model, LoRA, optimizer, compile),
    :class:`~llmlab.train.checkpointer.Checkpointer` (resume, save, best, non-finite check),
    :class:`~llmlab.train.evaluator.Evaluator`, :class:`~llmlab.train.metrics.MetricsLogger` and
    :class:`StepRunner` (one optimizer step). Under ``distributed.strategy: fsdp`` with several
    processes the model is sharded (:mod:`llmlab.train.fsdp`), every rank evaluates (a sharded
    forward is a collective) and the returned model is the gathered whole on rank 0.

    Args:
        stage: the stage to train (its ``ctx.stage_dir`` is the stage's run directory).
        fingerprint: the stage's fingerprint, stored in each checkpoint.
        accelerator: an ``accelerate.Accelerator`` (one is made when None).
        reset_optimizer: on resume, load only the weights (fresh optimizer, schedule fast-forwarded).
        progress: an optional ``rich.progress.Progress`` to draw a bar in.

    Returns:
        (the trained, unwrapped model — still PEFT-wrapped when the stage uses LoRA, the result).

    Raises:
        TrainingError: a non-finite loss (naming the step; the last good checkpoint is kept) or
            running out of memory (naming the knobs to turn).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    ctx = stage.ctx
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or Accelerator(cpu=ctx.device.type == "cpu")
    set_seed(ctx.seed)
    run = _setup_run(stage, accelerator, fingerprint, reset_optimizer, progress)
    step, stopped = run.start_step, None
    if run.start_step == 0:
        if run.evaluator.due(0):
            run.evaluator.log(run.model, 0, run.metrics)
        if run.sampler.due(0):
            run.sampler.log(run.model, 0, run.metrics)
    run.model.train()
    try:
        step, stopped = _run_steps(run, step)
    except RuntimeError as e:  # CUDA's OutOfMemoryError, or the CPU allocator's "... can't allocate memory ..."
        if isinstance(e, torch.OutOfMemoryError) or is_cpu_out_of_memory(e):
            raise out_of_memory(ctx.name, step + 1) from e
        raise
    finally:
        run.runner.close()
        run.metrics.close()
    run.checkpointer.finish()  # an asynchronous save still in flight is written and finalised
    model = unwrap(run.model)
    if stopped is None:  # a stopped stage writes no final/: its weights are only its checkpoint
        run.checkpointer.restore_best(model, step)
        if run.sharded:
            model = gather_full_model(model, run.skeleton, accelerator.is_main_process)
    m = run.metrics
    return model, StageResult(
        steps=step, first_loss=m.first_loss, last_loss=m.last_loss, eval_loss=m.eval_loss,
        first_eval_loss=m.first_eval_loss, wall_time_s=m.elapsed_s(), tokens=m.tokens,
        resumed_from=run.checkpointer.resumed_from, final_metrics=stage.summary_metrics(),
        early_stopping=run.checkpointer.early_stopping_record(), stopped=stopped,
        flops=m.flops_summary() if accelerator.is_main_process else {})


@dataclass
class _Run:
    """The components of one stage's training (:func:`_setup_run`)."""

    tc: TrainingConfig
    accelerator: Any
    model: torch.nn.Module  # prepared (DDP-wrapped / compiled) for the steps
    sharded: bool
    skeleton: Any
    optimizer: Any
    scheduler: Any
    checkpointer: Checkpointer
    start_step: int
    runner: StepRunner
    evaluator: Evaluator
    metrics: MetricsLogger
    sampler: Sampler
    time_limit: TimeLimit


def _setup_run(stage: Stage, accelerator, fingerprint: str, reset_optimizer: bool, progress) -> _Run:
    """Model (LoRA, sharding, compile), optimizer and schedule, checkpointer (resumed), step runner,
    evaluator, metrics, sampler and time limit of ``stage``, from its typed plan."""
    settings, tc = stage.ctx.settings, stage.ctx.plan.training
    model = setup_model(stage, accelerator)
    sharded, skeleton = maybe_shard(model, settings.distributed, accelerator)
    optimizer, scheduler = setup_optimizer(model, tc, accelerator.device, fsdp=settings.distributed.strategy == "fsdp")
    checkpointer = Checkpointer(stage, tc, fingerprint=fingerprint, accelerator=accelerator,
                                state_io=state_io(sharded, settings.distributed))
    start_step = checkpointer.resume(model, optimizer, scheduler, reset_optimizer=reset_optimizer)
    if sharded:  # FSDP2 does its own gradient reduction: no DDP wrapper
        prepared, optimizer = model, accelerator.prepare(optimizer)
    else:
        prepared, optimizer = accelerator.prepare(model, optimizer)
    prepared = maybe_compile(prepared, bool(settings.compile))
    keep_freed_memory(accelerator.device)
    return _Run(
        tc=tc, accelerator=accelerator, model=prepared, sharded=sharded, skeleton=skeleton, optimizer=optimizer,
        scheduler=scheduler, checkpointer=checkpointer, start_step=start_step,
        runner=StepRunner(stage, tc, accelerator, prepared, optimizer, scheduler, start_step=start_step,
                          sharded=sharded),
        evaluator=Evaluator(stage, tc, accelerator, sharded=sharded),
        metrics=MetricsLogger(stage, tc, accelerator=accelerator, start_step=start_step, progress=progress,
                              flops_per_token=stage_flops_per_token(stage, model)),
        sampler=Sampler(stage, tc, accelerator), time_limit=TimeLimit(tc.max_time, accelerator))


def _run_steps(run: _Run, step: int) -> tuple[int, str | None]:
    """Optimizer steps from ``step`` to ``max_steps`` (or until early stopping or ``max_time``), with
    logging, evaluation, samples and checkpoints as they fall due; returns (the last step, ``"max_time"``
    when the time limit stopped it, else None)."""
    max_steps, checkpointer, evaluator, metrics = run.tc.max_steps, run.checkpointer, run.evaluator, run.metrics
    while step < max_steps and not checkpointer.should_stop:
        out = run.runner.step(step)
        step += 1
        metrics.count_tokens(out.tokens)
        stop = step < max_steps and run.time_limit.reached()  # max_time: log, checkpoint and stop (resumable)
        log_now = metrics.due(step) or stop
        if log_now:
            out = run.runner.reduced(out)  # the global mean, as one process with the same global batch
        if run.runner.check_every_step or log_now or checkpointer.may_save(step, evaluator.due(step)):
            checkpointer.check_finite(out.loss, step, out.grad_norm)
        if log_now:
            metrics.log_train(step, scalar(out.loss), run.scheduler.get_last_lr()[0],
                              None if out.grad_norm is None else scalar(out.grad_norm),
                              {k: scalar(v) for k, v in out.metrics.items()})
        else:
            metrics.tick(step)
        improved = False
        if evaluator.due(step):
            evaluator.log(run.model, step, metrics)
            improved = checkpointer.observe_eval(step, metrics.eval_loss if run.accelerator.is_main_process else None)
        if run.sampler.due(step, last=checkpointer.should_stop):
            run.sampler.log(run.model, step, metrics)
        if checkpointer.due(step, improved) or stop:
            checkpointer.save(step, unwrap(run.model), run.optimizer, run.scheduler)
        if stop and not checkpointer.should_stop:  # early stopping ending here wins: the stage is done
            return step, "max_time"
    return step, None


@dataclass
class StepOutput:
    """One optimizer step: its mean loss and metrics over the micro-batches, tokens, gradient norm."""

    loss: torch.Tensor
    metrics: dict
    tokens: int
    grad_norm: torch.Tensor | float | None


class StepRunner:
    """One optimizer step: ``gradient_accumulation_steps`` micro-batches, clipping, optimizer and schedule.

    Keys read: ``gradient_accumulation_steps``, ``grad_clip``, ``optimizer.hessian_update_every``
    (Sophia: the backward pass builds a graph every that many steps).
    Micro-batch ``micro`` of step ``step`` on rank ``rank`` of ``world`` has global index
    ``(step * gradient_accumulation_steps + micro) * world + rank``.
    """

    def __init__(self, stage: Stage, tc: TrainingConfig, accelerator, model, optimizer, scheduler,
                 start_step: int = 0, sharded: bool = False):
        self.stage, self.accelerator, self.sharded = stage, accelerator, sharded
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.gas = int(tc.gradient_accumulation_steps)
        self.grad_clip = tc.grad_clip
        self.hessian = needs_hessian(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
        self.hessian_every = int(tc.optimizer.hessian_update_every or 1)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.device = accelerator.device
        # on CPU checking the loss costs no device sync, so it is checked every step
        self.check_every_step = self.device.type == "cpu"
        self.batches = _prefetcher(stage, tc, accelerator, start_step,
                                   lambda index: stage.get_batch(index, unwrap(self.model)))

    def close(self) -> None:
        """Stop the batch-building workers, if any."""
        self.batches.close()

    def step(self, step: int) -> StepOutput:
        """Run step ``step`` (0-based) and return its local (this process's) loss and metrics."""
        acc, gas = self.accelerator, self.gas
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict = {}
        tokens = 0
        create_graph = self.hessian and step % self.hessian_every == 0
        # Sophia's Hessian step under DDP: no DDP gradient hooks (they fail on graph-carrying
        # gradients); distributed_hutchinson averages gradients and estimates itself
        manual_sync = create_graph and self.world > 1
        for micro in range(gas):
            index = (step * gas + micro) * self.world + self.rank
            batch = to_device(self.batches.get(index), self.device)
            tokens += self.stage.tokens_in_batch(batch)
            sync_ctx = acc.no_sync(self.model) if micro < gas - 1 or manual_sync else contextlib.nullcontext()
            if self.sharded:  # FSDP2: reduce-scatter the gradients after the last micro-batch only
                self.model.set_requires_gradient_sync(micro == gas - 1)
            with sync_ctx, acc.autocast():
                loss, m = self.stage.compute_loss(self.model, batch)
                if create_graph:
                    (loss / gas).backward(create_graph=True)
                else:
                    acc.backward(loss / gas)
            loss_sum += loss.detach() / gas
            for k, v in m.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v) / gas
        hessian = distributed_hutchinson(self.optimizer.optimizer) if manual_sync else None
        grad_norm = self._clip() if self.grad_clip else None
        if hessian is not None:
            self.optimizer.optimizer.step(hessian=hessian)
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss_sum, metric_sums, tokens, grad_norm)

    def _clip(self) -> torch.Tensor:
        """Clip the global gradient norm to ``grad_clip``; returns the norm before clipping."""
        if self.sharded:
            return clip_grad_norm_(self.model.parameters(), float(self.grad_clip))
        return self.accelerator.clip_grad_norm_(self.model.parameters(), float(self.grad_clip))

    def reduced(self, out: StepOutput) -> StepOutput:
        """``out`` with loss and metrics averaged over the processes (unchanged on one process)."""
        if self.world == 1:
            return out
        acc = self.accelerator

        def mean(v):
            return acc.reduce(v if isinstance(v, torch.Tensor) else torch.tensor(v, device=self.device), reduction="mean")

        return StepOutput(mean(out.loss), {k: mean(v) for k, v in out.metrics.items()}, out.tokens, out.grad_norm)


def _prefetcher(stage: Stage, tc: TrainingConfig, accelerator, start_step: int, fallback) -> BatchPrefetcher:
    """The stage's micro-batches from ``start_step`` on, built ahead by the recipe's
    ``dataloader_*`` workers (none on a CPU by default; see :mod:`llmlab.data.prefetch`)."""
    dl = stage.ctx.settings.dataloader
    world, rank = accelerator.num_processes, accelerator.process_index
    workers = dl.num_workers if dl.num_workers is not None else auto_num_workers(accelerator.device, world)
    batch_fn = stage.batch_function() if workers else None
    indices = step_indices(start_step, tc.max_steps, tc.gradient_accumulation_steps, world, rank) if batch_fn else []
    return BatchPrefetcher(batch_fn, indices, fallback, num_workers=workers, pin_memory=dl.pin_memory,
                           prefetch_factor=dl.prefetch_factor, device=accelerator.device)
