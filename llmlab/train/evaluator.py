"""The training loop's evaluator: the stage's held-out numbers every ``eval_every`` steps.

Stages with a held-out set (pretrain, sft, dpo, orpo, kto, reward: :meth:`~llmlab.stages.base.Stage.heldout`)
are scored as :mod:`llmlab.heldout` defines it — per token (per pair for the pair stages) over the same examples, cut from
the left to the model's context, fp32 log-probabilities, the forward in the weights' dtype (outside
the stage's autocast and accelerate's mixed-precision wrapper) — so the last
``eval_loss`` equals ``llmlab eval`` on the same rows and the saved weights. The others (grpo, ppo,
and any stage whose data has no held-out set) average their ``compute_loss`` metrics over fixed eval batches under the stage's precision.
"""

from __future__ import annotations

import logging

import torch

from llmlab.stages.base import Stage
from llmlab.config import TrainingConfig
from llmlab.models.wrappers import unwrap, without_mixed_precision
from llmlab.train.tensors import to_device

log = logging.getLogger(__name__)


class Evaluator:
    """Runs the stage's evaluation on the bare model: on rank 0 alone (no DDP collectives), or on
    every rank when the model is FSDP-sharded (each forward all-gathers parameters).

    Key read: ``eval_every``; the last step is always evaluated.
    """

    def __init__(self, stage: Stage, tc: TrainingConfig, accelerator, sharded: bool = False):
        self.stage = stage
        self.accelerator = accelerator
        self.sharded = sharded
        self.max_steps = tc.max_steps
        self.eval_every = int(tc.eval_every)
        self.heldout = stage.heldout()
        self.batches = [] if self.heldout is not None else list(stage.eval_batches())
        self._said = False

    def due(self, step: int) -> bool:
        """Whether ``step`` is an evaluation step (never when the stage has no held-out data)."""
        return (self.heldout is not None or bool(self.batches)) and (
            step % self.eval_every == 0 or step == self.max_steps)

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
        try:
            if self.heldout is not None:
                with without_mixed_precision(bare):
                    out = self.stage.evaluate_heldout(bare, self.heldout)
                self._say_coverage(out)
            else:
                with self.accelerator.autocast():
                    out = self.stage.evaluate(bare, [to_device(b, self.accelerator.device) for b in self.batches])
        finally:
            bare.train()
        return out

    def _say_coverage(self, out: dict) -> None:
        """Log once what the held-out numbers cover (examples, tokens, how many were cut)."""
        if self._said or not self.accelerator.is_main_process:
            return
        self._said = True
        n, total = out.get("eval_examples"), out.get("eval_heldout_examples")
        part = "all" if n == total else f"{n} (evenly spaced; eval_steps × batch_size) of"
        log.info("stage %s: eval_loss covers %s %s held-out examples, %s scored tokens; %s cut from the "
                 "left to the model's context", self.stage.ctx.name, part, total, out.get("eval_tokens"),
                 out.get("eval_truncated"))
