"""The training loop's evaluator: the stage's fixed held-out batches, every ``eval_every`` steps."""

from __future__ import annotations

import torch

from llmlab.stages.base import Stage
from llmlab.config import TrainingConfig
from llmlab.models.wrappers import unwrap
from llmlab.train.tensors import to_device


class Evaluator:
    """Runs ``stage.evaluate`` on the bare model: on rank 0 alone (no DDP collectives), or on every
    rank when the model is FSDP-sharded (each forward all-gathers parameters).

    Key read: ``eval_every``; the last step is always evaluated.
    """

    def __init__(self, stage: Stage, tc: TrainingConfig, accelerator, sharded: bool = False):
        self.stage = stage
        self.accelerator = accelerator
        self.sharded = sharded
        self.max_steps = tc.max_steps
        self.eval_every = int(tc.eval_every)
        self.batches = list(stage.eval_batches())

    def due(self, step: int) -> bool:
        """Whether ``step`` is an evaluation step (never when the stage has no eval batches)."""
        return bool(self.batches) and (step % self.eval_every == 0 or step == self.max_steps)

    def log(self, model: torch.nn.Module, step: int, metrics) -> None:
        """Evaluate ``model`` at ``step`` and log it on the main process (``metrics``: the loop's
        :class:`~llmlab.train.metrics.MetricsLogger`)."""
        if self.accelerator.is_main_process or self.sharded:
            out = self.run(model)
            if self.accelerator.is_main_process:
                metrics.log_eval(step, out)

    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """The stage's eval metrics (``eval_loss``, ...) of ``model``; leaves it in train mode."""
        bare = unwrap(model)
        bare.eval()
        with self.accelerator.autocast():
            out = self.stage.evaluate(bare, [to_device(b, self.accelerator.device) for b in self.batches])
        bare.train()
        return out
