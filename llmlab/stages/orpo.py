"""ORPO: Odds Ratio Preference Optimization (Hong et al. 2024), reference-free.

Recipe keys (``stages.NAME``, type ``orpo``; defaults in the recipe schema): ``beta`` (the paper's
lambda, TRL's ``ORPOConfig.beta``).

The loss is, as TRL 1.16's ``ORPOTrainer`` computes it,
``NLL(chosen sequence) - beta * mean log sigma(log odds(y_w) - log odds(y_l))`` where the odds use
each completion's *average* per-token log-probability (:func:`llmlab.losses.orpo_loss`) and the NLL
is the token-mean cross-entropy over every real token of the chosen sequences, prompt included (as
TRL; the paper's ``L_SFT``). No reference model is loaded. Data and batches are the dpo stage's
(preference pairs); the forward is always the padded batch (the NLL needs the prompt tokens' log-probs).
"""

from __future__ import annotations

import torch

from llmlab.losses import IGNORE_INDEX, orpo_loss, token_logps
from llmlab.models.padfree import concat_pairs, model_logits
from llmlab.stage_params import ORPOParams
from llmlab.stages.base import Stage, StageContext
from llmlab.stages.dpo import pair_metrics


class ORPOStage(Stage):
    """ORPO on preference pairs (batch keys as :class:`llmlab.stages.dpo.DPOStage`).

    Metrics (TRL's names): ``rewards/chosen``, ``rewards/rejected`` (``beta`` times the mean
    per-token completion log-prob), ``rewards/accuracies`` (ties one half), ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected`` (mean per-token completion log-probs), ``nll_loss`` (the
    chosen sequences' NLL per token), ``log_odds_ratio`` (mean ``log sigma(log_odds)``),
    ``log_odds_chosen`` (mean log odds ratio), ``preference_loss`` (``-beta * log_odds_ratio``).
    ``loss`` is ``nll_loss + preference_loss``.
    """

    type = "orpo"

    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        p: ORPOParams = ctx.plan.params
        self.beta = float(p.beta)

    @torch.no_grad()
    def evaluate_heldout(self, model: torch.nn.Module, heldout) -> dict[str, float]:
        """The held-out ORPO numbers over all held-out pairs (:func:`llmlab.heldout.orpo_metrics`: the
        chosen sequences' NLL per token over all pairs plus the odds-ratio term averaged over pairs),
        keys prefixed ``eval_``, with ``eval_examples`` (pairs), ``eval_tokens`` (scored completion
        tokens, chosen and rejected), ``eval_truncated`` and ``eval_heldout_examples``."""
        from llmlab.heldout import eval_record, orpo_metrics, pair_logps, whole_logps

        bs = self.data.batch_size
        c, r, cut = pair_logps(model, heldout.examples, self.pad_token_id, bs)
        whole = whole_logps(model, [chosen[0] for chosen, _ in heldout.examples], self.pad_token_id, bs)
        m = orpo_metrics(c, r, whole, beta=self.beta)
        return eval_record(m, heldout, sum(n for _, n in c) + sum(n for _, n in r), cut)

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        device = self.ctx.device
        ids, att, labels = (t.to(device) for t in concat_pairs(batch, self.pad_token_id))
        B = batch["chosen_input_ids"].shape[0]
        whole = ids.masked_fill(att == 0, IGNORE_INDEX)  # every real token: the NLL's targets
        logps, mask = token_logps(model_logits(model, ids, att), whole)  # [2B, T-1]
        completion = (labels[:, 1:] != IGNORE_INDEX)
        avg_logps = (logps * completion).sum(-1) / completion.sum(-1).clamp(min=1)
        nll = -logps[:B].sum() / mask[:B].sum().clamp(min=1)
        losses, chosen_r, rejected_r, log_sig, log_odds = orpo_loss(avg_logps[:B], avg_logps[B:], self.beta)
        preference_loss = losses.mean()
        metrics = pair_metrics(chosen_r, rejected_r, avg_logps[:B], avg_logps[B:])
        metrics.update(nll_loss=nll.detach(), log_odds_ratio=log_sig.mean(), log_odds_chosen=log_odds.mean(),
                       preference_loss=preference_loss.detach())
        return nll + preference_loss, metrics
