"""The training loop's metrics: ``metrics.jsonl``, the progress bar and ``logging.report_to``
trackers (accelerate's TensorBoard / Weights & Biases trackers), plus the counts a
:class:`~llmlab.train.loop.StageResult` reports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llmlab.config import TrainingConfig
from llmlab.layout import RunLayout, StageLayout
from llmlab.metricsfile import read_records
from llmlab.stages.base import Stage


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``; on resume drops lines past the step."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_step > 0 and path.exists():
            keep = [rec for rec in read_records(path) if rec.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(rec) + "\n" for rec in keep))
        elif path.exists():
            path.unlink()
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        if self.enabled:
            self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._f.close()


def open_trackers(report_to: list[str], run_dir: Path, stage_name: str, config: dict, project: str | None) -> list:
    """Started accelerate trackers for ``logging.report_to`` (``tensorboard``: ``<run_dir>/tensorboard/<stage>``;
    ``wandb``: project ``project`` or ``llmlab``, run ``stage_name``, the stage config as its config).

    One tracker set per stage, so they are built here rather than through ``Accelerator(log_with=...)``,
    which the run shares across its stages.
    """
    trackers = []
    if "tensorboard" in report_to:
        from accelerate.tracking import TensorBoardTracker

        trackers.append(TensorBoardTracker(stage_name, str(RunLayout(run_dir).tensorboard(stage_name).parent)))
    if "wandb" in report_to:
        from accelerate.tracking import WandBTracker

        trackers.append(WandBTracker(project or "llmlab", name=stage_name, config=config, reinit=True))
    for t in trackers:
        t.start()
    return trackers


class MetricsLogger:
    """Logs a stage's training and eval records on the main process and counts tokens and time.

    Keys read: ``log_every`` (the stage's, else ``logging.log_every``), ``logging.report_to``,
    ``logging.wandb_project``. A training record is written at step ``start_step + 1``, every
    ``log_every`` steps and at the last step. Given the model's ``flops_per_token``
    (:func:`llmlab.train.flops.stage_flops_per_token`), each record also holds ``flops_per_token``,
    ``tflops`` and ``mfu`` (:meth:`flops`; the device's peak is looked up or measured once when the
    logger is made) and the progress bar shows MFU.
    """

    def __init__(self, stage: Stage, tc: TrainingConfig, *, accelerator, start_step: int, progress=None,
                 flops_per_token: int | None = None):
        ctx, max_steps = stage.ctx, tc.max_steps
        self.is_main = accelerator.is_main_process
        self.world = accelerator.num_processes
        self.start_step, self.max_steps = start_step, max_steps
        self.writer = MetricsWriter(StageLayout(ctx.stage_dir).metrics, start_step, enabled=self.is_main)
        log_spec = ctx.settings.logging
        self.trackers = open_trackers(list(log_spec.report_to), ctx.settings.output_dir, ctx.name, ctx.plan.config,
                                      log_spec.wandb_project) if self.is_main else []
        self.log_every = int(tc.log_every)
        self.progress, self.task = progress, None
        if progress is not None and self.is_main:
            self.task = progress.add_task(ctx.name, total=max_steps, completed=start_step, loss=float("nan"), tps=0.0,
                                          mfu="MFU -")
        self.flops_per_token = flops_per_token
        self.peak_flops = self._peak(accelerator) if flops_per_token and self.is_main else None
        self.first_loss = self.last_loss = self.eval_loss = self.first_eval_loss = None
        self.tokens = 0
        self.t0 = self._window_t = time.perf_counter()
        self._window_tokens = 0

    def due(self, step: int) -> bool:
        """Whether ``step`` (just finished) writes a training record."""
        return step % self.log_every == 0 or step == self.max_steps or step == self.start_step + 1

    def count_tokens(self, local_tokens: int) -> None:
        """Add one step's tokens (of this process; every process is assumed to see as many)."""
        self.tokens += local_tokens * self.world
        self._window_tokens += local_tokens * self.world

    def log_train(self, step: int, loss: float, lr: float, grad_norm: float | None, extra: dict[str, float]) -> None:
        """Write the training record of ``step``; tokens/s is over the steps since the last record."""
        now = time.perf_counter()
        tps = self._window_tokens / max(now - self._window_t, 1e-9)
        self._window_tokens, self._window_t = 0, now
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        self._emit({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens,
                    "tokens_per_s": tps, "elapsed_s": now - self.t0, **self.flops(tps), **extra}, step, track=True)
        if self.task is not None:
            mfu = self.flops(tps).get("mfu")
            self.progress.update(self.task, completed=step, loss=loss, tps=tps,
                                 mfu="MFU -" if mfu is None else f"MFU {mfu:5.1%}")

    def _peak(self, accelerator) -> float:
        """Peak FLOP/s of all processes together (:func:`llmlab.train.flops.peak_flops` of one device,
        in the precision the matrix multiplies run in, times the processes)."""
        from llmlab.train.flops import peak_flops

        precision = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[str(accelerator.mixed_precision)]
        return peak_flops(accelerator.device, precision) * self.world

    def flops(self, tokens_per_s: float) -> dict:
        """``{"flops_per_token", "tflops", "mfu"}`` at ``tokens_per_s`` (tokens of all processes):
        the model's training FLOPs per token, the model TFLOP/s achieved, and MFU = achieved FLOP/s /
        the processes' peak FLOP/s (Chowdhery et al. 2022, appendix B); {} when the model's FLOPs are
        not known (``from_pretrained``)."""
        if not self.flops_per_token or not self.peak_flops:
            return {}
        achieved = tokens_per_s * self.flops_per_token
        return {"flops_per_token": self.flops_per_token, "tflops": achieved / 1e12, "mfu": achieved / self.peak_flops}

    def flops_summary(self) -> dict:
        """The whole run's :meth:`flops` (tokens over wall time, evaluations and checkpoints included)
        plus ``peak_tflops``, for stage.json; {} without a FLOP count."""
        out = self.flops(self.tokens / max(self.elapsed_s(), 1e-9))
        return {**out, "peak_tflops": self.peak_flops / 1e12} if out else {}

    def tick(self, step: int) -> None:
        """Advance the progress bar on a step without a record."""
        if self.task is not None:
            self.progress.update(self.task, completed=step)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Write an eval record (the one before the first step goes to metrics.jsonl only)."""
        if step == 0:
            self.first_eval_loss = metrics.get("eval_loss")
        else:
            self.eval_loss = metrics.get("eval_loss")
        self._emit({"step": step, **metrics}, step, track=step > 0)

    def _emit(self, record: dict, step: int, track: bool) -> None:
        self.writer.write(record)
        if track:
            numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            for t in self.trackers:
                t.log(numbers, step=step)

    def elapsed_s(self) -> float:
        """Seconds since the logger was made (just before the first evaluation)."""
        return time.perf_counter() - self.t0

    def close(self) -> None:
        self.writer.close()
        for t in self.trackers:
            t.finish()
