"""Reward modelling with the pairwise Bradley-Terry loss (Ouyang et al. 2022, eq. 1).

The model is a sequence classifier with one output (``num_labels = 1``): the scalar reward is read at
the last non-padding token of each sequence, as ``AutoModelForSequenceClassification`` does, so the
stage's ``final/`` loads with ``AutoModelForSequenceClassification.from_pretrained`` and serves
``reward: {from: STAGE}`` in grpo / ppo stages (see :mod:`llmlab.rl.rewards`).

Recipe keys: only the common stage keys.
"""

from __future__ import annotations

import torch

from llmlab.losses import bradley_terry_loss, preference_accuracy
from llmlab.models.padfree import concat_pairs, reward_scores
from llmlab.stages.base import Stage

__all__ = ["RewardStage", "reward_scores"]


class RewardStage(Stage):
    """Bradley-Terry reward model on preference pairs.

    Batch keys as the dpo stage (``chosen_*`` / ``rejected_*``, ``[B, T]``). Chosen and rejected go
    through the model in one forward pass.

    Metrics: ``accuracy`` (fraction of pairs where r(chosen) > r(rejected), a tie one half),
    ``margin`` (mean r(chosen) - r(rejected)), ``reward_mean``. Held-out (:meth:`evaluate_heldout`):
    the same per pair over all held-out pairs, ``eval_loss`` the Bradley-Terry loss averaged over
    pairs, plus ``eval_chosen``, ``eval_rejected`` (mean scores).
    """

    type = "reward"

    def __init__(self, ctx):
        super().__init__(ctx)

    def build_model(self) -> torch.nn.Module:
        from llmlab.models.build import load_reward_model

        path = self.ctx.init_path
        if path is None:
            path = getattr(self.ctx.model_spec, "from_pretrained", None)  # a PretrainedSpec's, else None
        if path is None:
            raise ValueError(
                f"stages.{self.ctx.name}: a reward stage starts from a trained language model; give it "
                "`from: STAGE` (an earlier pretrain/sft stage) or use model.from_pretrained")
        tok = self.ctx.tokenizer
        pad = tok.pad_token_id if tok is not None else None
        model = load_reward_model(path, allow_code=self.ctx.allow_code, pad_token_id=pad)
        self._ensure_pad(model)
        return model

    def _ensure_pad(self, model) -> None:
        # The classifier pools at the last non-pad token: it must know the pad id.
        cfg = getattr(model, "config", None)
        tok = self.ctx.tokenizer
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None and tok is not None \
                and tok.pad_token_id is not None:
            cfg.pad_token_id = tok.pad_token_id

    def setup(self, model: torch.nn.Module) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._ensure_pad(base)

    @torch.no_grad()
    def evaluate_heldout(self, model: torch.nn.Module, heldout) -> dict[str, float]:
        """The held-out reward-model numbers over all held-out pairs (:func:`llmlab.heldout.reward_metrics`:
        Bradley-Terry loss per pair and accuracy over pairs, a tie one half; each sequence scored on its
        own, cut from the left to the model's context), keys prefixed ``eval_``, with ``eval_examples``
        (pairs), ``eval_tokens`` (tokens of the chosen and rejected sequences scored), ``eval_truncated``
        (pairs with a cut sequence) and ``eval_heldout_examples``. The same numbers as ``llmlab eval``'s
        ``loss``, ``reward_accuracy`` and ``reward_margin`` on those pairs."""
        from llmlab.heldout import eval_record, length_limit, reward_metrics, sequence_rewards

        seqs = [ids for pair in heldout.examples for ids, _ in pair]
        scores, _ = sequence_rewards(model, seqs, self.data.batch_size)
        limit = length_limit(model)
        m = reward_metrics(scores[0::2], scores[1::2])
        return eval_record(m, heldout, sum(min(len(s), limit) for s in seqs),
                           sum(len(a) > limit or len(b) > limit for a, b in zip(seqs[0::2], seqs[1::2])))

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        tok = self.ctx.tokenizer
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        ids, att, _ = (t.to(self.ctx.device) for t in concat_pairs(batch, pad))
        B = batch["chosen_input_ids"].shape[0]
        scores = reward_scores(model, ids, att)
        chosen, rejected = scores[:B], scores[B:]
        loss = bradley_terry_loss(chosen, rejected)
        metrics = {
            "accuracy": preference_accuracy(chosen, rejected).detach(),
            "margin": (chosen - rejected).mean().detach(),
            "reward_mean": scores.mean().detach(),
        }
        return loss, metrics
