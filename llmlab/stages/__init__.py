"""Stage types. Each is looked up lazily so importing llmlab.stages stays cheap."""

from __future__ import annotations

import importlib

STAGE_TYPES = {
    "pretrain": "llmlab.stages.lm:PretrainStage",
    "sft": "llmlab.stages.lm:SFTStage",
    "reward": "llmlab.stages.reward:RewardStage",
    "dpo": "llmlab.stages.dpo:DPOStage",
    "grpo": "llmlab.stages.grpo:GRPOStage",
    "ppo": "llmlab.stages.ppo:PPOStage",
}


def stage_class(stage_type: str):
    """Return the Stage subclass for ``stage_type``.

    Raises:
        KeyError: when the type is unknown.
    """
    module, _, cls = STAGE_TYPES[stage_type].partition(":")
    return getattr(importlib.import_module(module), cls)
