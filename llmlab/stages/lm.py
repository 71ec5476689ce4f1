"""Stages trained with the causal language-modelling loss: pretrain and sft."""

from __future__ import annotations

import torch

from llmlab.stages.base import Stage


class _CausalLMStage(Stage):
    """Next-token cross-entropy on the labelled tokens (labels −100 are ignored).

    Pretrain batches are packed documents with position ids restarting at each document; SFT
    batches carry labels on assistant tokens only (see llmlab.data.pipeline).
    """

    def get_batch(self, index: int, model: torch.nn.Module) -> dict:
        return self.data.train_batch(index)

    def eval_batches(self) -> list[dict]:
        return list(self.data.eval_batches())

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
        out = model(**inputs, use_cache=False)
        return out.loss, {}

    def summary_metrics(self) -> dict:
        shares = getattr(self.data, "shares", None) or {}
        return {f"share/{k}": float(v) for k, v in shares.items()}


class PretrainStage(_CausalLMStage):
    """Causal LM pretraining on packed text."""

    type = "pretrain"


class SFTStage(_CausalLMStage):
    """Supervised fine-tuning on conversations, loss on assistant tokens only."""

    type = "sft"
