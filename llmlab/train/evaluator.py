"""The training loop's evaluator: the stage's fixed held-out batches, every ``eval_every`` steps."""

from __future__ import annotations

import torch

from llmlab.stages.base import Stage
from llmlab.models.wrappers import unwrap
from llmlab.train.tensors import to_device


class Evaluator:
    """Runs ``stage.evaluate`` on the bare model (no DDP collectives, so rank 0 can run it alone).

    Stage key read: ``eval_every`` [100]; the last step is always evaluated.
    """

    def __init__(self, stage: Stage, accelerator, max_steps: int):
        self.stage = stage
        self.accelerator = accelerator
        self.max_steps = max_steps
        self.eval_every = int(stage.config.get("eval_every", 100))
        self.batches = list(stage.eval_batches())

    def due(self, step: int) -> bool:
        """Whether ``step`` is an evaluation step (never when the stage has no eval batches)."""
        return bool(self.batches) and (step % self.eval_every == 0 or step == self.max_steps)

    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """The stage's eval metrics (``eval_loss``, ...) of ``model``; leaves it in train mode."""
        bare = unwrap(model)
        bare.eval()
        with self.accelerator.autocast():
            out = self.stage.evaluate(bare, [to_device(b, self.accelerator.device) for b in self.batches])
        bare.train()
        return out
