"""Stages trained with the causal language-modelling loss: pretrain and sft."""

from __future__ import annotations

import math

import torch

from llmlab.stages.base import Stage
from llmlab.models.padfree import pack_rows, packs_documents


class _CausalLMStage(Stage):
    """Next-token cross-entropy on the labelled tokens (labels −100 are ignored).

    Pretrain batches are packed documents with position ids restarting at each document; SFT
    batches carry labels on assistant tokens only (see llmlab.data.pipeline) and are trained
    padding-free on llmlab's Transformer.
    """

    @torch.no_grad()
    def evaluate_heldout(self, model: torch.nn.Module, heldout) -> dict[str, float]:
        """Held-out loss per scored token over the held-out documents (pretrain) or conversations'
        assistant tokens (sft): :func:`llmlab.heldout.lm_heldout`."""
        from llmlab.heldout import lm_heldout

        return lm_heldout(model, heldout, self.ctx.tokenizer, self.pad_token_id, self.data.batch_size)

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """Mean next-token cross-entropy over the batch's labelled tokens (scalar).

        Right-padded batches (SFT) go padding-free when the model keeps attention inside each
        sequence (:func:`llmlab.models.padfree.packs_documents`): the rows' real tokens end to end
        in one row, position ids restarting per row; same loss as the padded batch (tested), no
        compute on padding.
        """
        if "attention_mask" in batch and "position_ids" not in batch and packs_documents(model):
            packed = pack_rows(batch["input_ids"], batch["attention_mask"], batch["labels"])
            out = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                        labels=packed.labels, use_cache=False)
            return out.loss, {}
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
    """Supervised fine-tuning on conversations, loss on assistant tokens only; with
    ``neftune_alpha`` NEFTune noise on the input embeddings while training (:func:`add_neftune`)."""

    type = "sft"

    def setup(self, model: torch.nn.Module) -> None:
        alpha = self.plan.params.neftune_alpha
        if alpha:
            add_neftune(model, float(alpha))


def add_neftune(model: torch.nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning", alg. 1):
    while the embedding module is in training mode, its output ``[B, L, d]`` gets uniform noise in
    ``[-alpha / sqrt(L d), alpha / sqrt(L d)]`` (as transformers' ``neftune_post_forward_hook``, the
    one TRL uses; ``L`` is the fed row's length, the packed row under padding-free batches). Drawn
    from torch's default generator on the embeddings' device, so a resumed run (RNG state restored)
    draws the same noise. Evaluation and generation see no noise.

    Returns:
        the hook's handle (``.remove()`` turns it off).
    """
    def hook(module, inputs, output):
        if not module.training:
            return output
        bound = alpha / math.sqrt(output.shape[1] * output.shape[2])
        return output + torch.zeros_like(output).uniform_(-bound, bound)

    return model.get_input_embeddings().register_forward_hook(hook)
