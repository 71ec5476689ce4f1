"""The frozen reference model of the preference and RL stages (dpo, kto, grpo, ppo).

The reference is, in this order of precedence:

1. ``reference_from: STAGE``: that stage's ``final/`` weights, frozen;
2. when the policy is a PEFT model (the stage trains LoRA): the same model with its adapters disabled
   (``with model.disable_adapter():``), so no second copy of the weights is kept;
3. otherwise a frozen copy of the policy's starting weights, taken in the stage's ``build_model``
   (before the loop applies LoRA or loads a checkpoint, so a resumed run gets the same reference).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from llmlab.layout import StageLayout
from llmlab.models.padfree import model_logits
from llmlab.models.wrappers import freeze, is_peft_model, unwrap
from llmlab.stages.base import StageContext


def load_reference(ctx: StageContext, stage_name: str) -> torch.nn.Module:
    """The frozen causal LM saved by stage ``stage_name`` (its ``final/``)."""
    from llmlab.models.build import load_causal_lm

    if stage_name not in ctx.stage_paths:
        raise ValueError(f"stages.{ctx.name}.reference_from: no stage named {stage_name!r}")
    path = StageLayout(ctx.stage_paths[stage_name]).final
    if not path.exists():
        raise FileNotFoundError(f"stages.{ctx.name}.reference_from: {path} does not exist "
                                f"(stage {stage_name!r} has not finished)")
    return freeze(load_causal_lm(path, allow_code=ctx.allow_code))


class ReferenceModel:
    """Reference log-probs for preference / RL stages (see the module docstring for the choice)."""

    def __init__(self, ctx: StageContext, reference_from: str | None):
        self.ctx = ctx
        self.reference_from = reference_from
        self.model: torch.nn.Module | None = None
        self.use_disabled_adapter = False

    def capture(self, policy: torch.nn.Module) -> None:
        """Called from build_model with the freshly built policy."""
        if self.reference_from:
            self.model = load_reference(self.ctx, self.reference_from)
        elif self.ctx.init_adapter is not None:
            # continuing an unmerged adapter: the reference is base + that adapter as the stage starts
            self.model = freeze(copy.deepcopy(policy).merge_and_unload())
        elif self.ctx.own_lora is not None or is_peft_model(policy):
            self.model = None  # LoRA: the base with adapters disabled is the reference (no copy)
        else:
            self.model = freeze(copy.deepcopy(policy))

    def setup(self, policy: torch.nn.Module, device) -> None:
        """Called from Stage.setup with the final policy (LoRA applied, on the device)."""
        if self.model is None and not self.reference_from and not is_peft_model(policy):
            # build_model was bypassed (tests, a loop that builds the model itself), or a LoRA
            # config that was not applied: copy the starting weights now
            self.model = freeze(copy.deepcopy(policy))
        if not self.reference_from and self.ctx.init_adapter is None and is_peft_model(policy):
            self.model = None  # the base with adapters disabled is the reference: free the copy
            self.use_disabled_adapter = True
        elif self.model is None and self.reference_from:
            self.model = load_reference(self.ctx, self.reference_from)
        if self.model is not None:
            self.model.to(device)

    def context(self, policy):
        if self.use_disabled_adapter:
            return unwrap(policy).disable_adapter()
        return contextlib.nullcontext()

    def forward_model(self, policy):
        return unwrap(policy) if self.use_disabled_adapter else self.model

    @torch.no_grad()
    def logits(self, policy, input_ids, attention_mask) -> torch.Tensor:
        model = self.forward_model(policy)
        with self.context(policy):
            return model_logits(model, input_ids, attention_mask)
