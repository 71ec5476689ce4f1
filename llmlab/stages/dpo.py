"""Direct Preference Optimization (Rafailov et al. 2023), IPO (Azar et al. 2023), APO
(D'Oosterlinck et al. 2024: ``apo_zero``, ``apo_down``), and the reference-free SimPO (Meng et al.
2024) and CPO (Xu et al. 2024).

Recipe keys (``stages.NAME``, type ``dpo``; defaults in the recipe schema): ``beta``, ``loss_type``
sigmoid|ipo|apo_zero|apo_down|simpo|cpo, ``label_smoothing``, ``rpo_alpha``, ``simpo_gamma``, ``cpo_alpha``,
``reference_from``.

``loss_type: simpo`` and ``cpo`` load no reference model (:func:`llmlab.losses.cpo_loss`, TRL 1.16's
``CPOTrainer`` with ``loss_type`` simpo / sigmoid): SimPO compares the *average* per-token log-probs
of chosen and rejected with margin ``simpo_gamma``; CPO compares the summed log-probs and adds
``cpo_alpha`` times the chosen replies' NLL (the same term as ``rpo_alpha``, which SimPO may use).

``rpo_alpha`` (RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's
``DPOConfig.rpo_alpha``, in TRL 1.x ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, alpha]``)
adds ``alpha`` times the negative log-likelihood of the chosen completions, averaged over all chosen
completion tokens of the micro-batch, to the preference loss. It keeps the policy's likelihood of
good replies from falling while DPO pushes the rejected ones down (0, the default, is plain DPO).

The reference model is, in this order of precedence:

1. ``reference_from: STAGE``: that stage's ``final/`` weights, frozen;
2. when the policy is a PEFT model (the stage trains LoRA): the same model with its adapters disabled
   (``with model.disable_adapter():``), so no second copy of the weights is kept;
3. otherwise a frozen copy of the policy's starting weights, taken in :meth:`build_model` (before the
   loop applies LoRA or loads a checkpoint, so a resumed run gets the same reference).

The reference model (:class:`llmlab.stages.reference.ReferenceModel`) is shared with grpo and ppo.
Reference log-probabilities are computed for each batch under ``torch.no_grad()``. Chosen and
rejected sequences go through the policy in one forward pass (concatenated along the batch).
"""

from __future__ import annotations

import torch

from llmlab.losses import cpo_loss, dpo_loss, preference_accuracy, token_logps
from llmlab.models.padfree import concat_pairs, model_logits, packs_documents, padfree_sequence_logps
from llmlab.stage_params import DPOParams
from llmlab.stage_specs import REFERENCE_DPO_LOSSES, REFERENCE_FREE_DPO_LOSSES, UNSMOOTHED_DPO_LOSSES
from llmlab.stages.base import Stage, StageContext
from llmlab.stages.reference import ReferenceModel

__all__ = ["DPOStage", "concat_pairs", "model_logits", "padfree_sequence_logps", "pair_sequence_logps",
           "reference_sequence_logps", "pair_metrics", "REFERENCE_FREE_LOSSES"]

#: loss types of the dpo stage that load no reference model
REFERENCE_FREE_LOSSES = REFERENCE_FREE_DPO_LOSSES

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "preference_loss", "nll_loss")


class DPOStage(Stage):
    """DPO / IPO / SimPO / CPO on preference pairs.

    Batch keys (from :func:`llmlab.data.pipeline.build_stage_data`): ``chosen_input_ids``,
    ``chosen_attention_mask``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_attention_mask``,
    ``rejected_labels`` — ``[B, T]``, right-padded, labels only on the completion.

    Metrics: ``rewards/chosen``, ``rewards/rejected`` (mean implicit reward ``beta * log(pi/ref)``;
    simpo / cpo: ``beta * log pi``, per token for simpo, as TRL),
    ``rewards/accuracies`` (fraction of pairs with chosen reward > rejected reward, a tie one half),
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (mean summed completion log-probs;
    simpo: mean per-token log-probs),
    ``preference_loss`` (the DPO / IPO / SimPO / CPO loss alone), ``nll_loss`` (the chosen completions' negative
    log-likelihood per token, nats: the RPO term before its weight ``rpo_alpha``; logged whatever the
    weight). ``loss`` is ``preference_loss + rpo_alpha * nll_loss`` (cpo: ``cpo_alpha``).
    """

    type = "dpo"

    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        p: DPOParams = ctx.plan.params
        self.beta = float(p.beta)
        self.loss_type = p.loss_type
        self.label_smoothing = float(p.label_smoothing)
        self.rpo_alpha = float(p.rpo_alpha)
        self.simpo_gamma = float(p.simpo_gamma)
        self.cpo_alpha = float(p.cpo_alpha)
        if self.loss_type not in REFERENCE_DPO_LOSSES + REFERENCE_FREE_LOSSES:
            raise ValueError(f"stages.{ctx.name}.loss_type: {self.loss_type!r} is not one of "
                             f"{', '.join(REFERENCE_DPO_LOSSES + REFERENCE_FREE_LOSSES)}")
        if self.loss_type in UNSMOOTHED_DPO_LOSSES and self.label_smoothing:
            raise ValueError(f"stages.{ctx.name}.label_smoothing does not apply to loss_type {self.loss_type}")
        if self.loss_type == "cpo" and self.rpo_alpha:
            raise ValueError(f"stages.{ctx.name}.rpo_alpha: loss_type cpo weighs its NLL term with cpo_alpha")
        if self.loss_type in REFERENCE_FREE_LOSSES and p.reference_from:
            raise ValueError(f"stages.{ctx.name}.reference_from: loss_type {self.loss_type} uses no reference model")
        #: weight of the chosen replies' NLL term: CPO's cpo_alpha, else RPO's rpo_alpha
        self.nll_weight = self.cpo_alpha if self.loss_type == "cpo" else self.rpo_alpha
        self.reference = (None if self.loss_type in REFERENCE_FREE_LOSSES
                          else ReferenceModel(ctx, p.reference_from))

    # -- model -----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        policy = super().build_model()
        if self.reference is not None:
            self.reference.capture(policy)
        return policy

    def setup(self, model: torch.nn.Module) -> None:
        if self.reference is not None:
            self.reference.setup(model, self.ctx.device)

    @torch.no_grad()
    def evaluate_heldout(self, model: torch.nn.Module, heldout) -> dict[str, float]:
        """The held-out preference numbers over all held-out pairs (:func:`llmlab.heldout.preference_metrics`:
        the loss per pair averaged over pairs, accuracy over pairs), keys prefixed ``eval_``, with
        ``eval_examples`` (pairs), ``eval_tokens`` (scored completion tokens, chosen and rejected),
        ``eval_truncated`` and ``eval_heldout_examples``. The reference's log-probabilities are
        computed once per held-out set (the reference is frozen)."""
        from llmlab.heldout import eval_record, pair_logps, preference_metrics

        bs = self.data.batch_size
        c, r, cut = pair_logps(model, heldout.examples, self.pad_token_id, bs)
        ref_c = ref_r = None
        if self.reference is not None:  # simpo / cpo: reference-free
            cached = getattr(self, "_ref_heldout", None)
            if cached is None or cached[0] is not heldout:
                with self.reference.context(model):
                    cached = (heldout, pair_logps(self.reference.forward_model(model), heldout.examples,
                                                  self.pad_token_id, bs))
                self._ref_heldout = cached
            rc, rr, _ = cached[1]
            ref_c, ref_r = [s for s, _ in rc], [s for s, _ in rr]
        m = preference_metrics([s for s, _ in c], [s for s, _ in r], ref_c, ref_r,
                               [n for _, n in c], [n for _, n in r], beta=self.beta, loss_type=self.loss_type,
                               label_smoothing=self.label_smoothing, rpo_alpha=self.rpo_alpha,
                               simpo_gamma=self.simpo_gamma, cpo_alpha=self.cpo_alpha)
        return eval_record(m, heldout, sum(n for _, n in c) + sum(n for _, n in r), cut)

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        device = self.ctx.device
        ids, att, labels = (t.to(device) for t in concat_pairs(batch, self.pad_token_id))
        B = batch["chosen_input_ids"].shape[0]
        seq_logps, lengths = pair_sequence_logps(model, ids, att, labels)
        if self.reference is None:  # simpo / cpo: reference-free
            # SimPO's length normalisation: average log-prob per completion token
            logps = seq_logps / lengths.clamp(min=1) if self.loss_type == "simpo" else seq_logps
            losses, chosen_r, rejected_r = cpo_loss(
                logps[:B], logps[B:], beta=self.beta, loss_type=self.loss_type, simpo_gamma=self.simpo_gamma,
                label_smoothing=self.label_smoothing)
        else:
            logps = seq_logps
            ref_seq = reference_sequence_logps(self.reference, model, ids, att, labels)
            losses, chosen_r, rejected_r = dpo_loss(
                seq_logps[:B], seq_logps[B:], ref_seq[:B], ref_seq[B:], beta=self.beta,
                loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
        # RPO's / CPO's NLL term: chosen-token NLL averaged over the micro-batch's chosen tokens (TRL's "sft" loss)
        nll = -seq_logps[:B].sum() / lengths[:B].sum().clamp(min=1)
        preference_loss = losses.mean()
        loss = preference_loss + self.nll_weight * nll if self.nll_weight else preference_loss
        metrics = pair_metrics(chosen_r, rejected_r, logps[:B], logps[B:])
        metrics.update(preference_loss=preference_loss.detach(), nll_loss=nll.detach())
        return loss, metrics


def pair_sequence_logps(model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs ``[R]`` (with grad) and completion token counts ``[R]`` of the
    right-padded rows ``[R, T]``. Models that keep attention inside each document get a padding-free
    forward (~1.5x faster DPO on CPU, benchmarks/dpo_throughput.py); others take the padded batch."""
    if packs_documents(model):
        return padfree_sequence_logps(model, ids, att, labels)
    logps, mask = token_logps(model_logits(model, ids, att), labels)
    return logps.sum(-1), mask.sum(-1)


@torch.no_grad()
def reference_sequence_logps(reference: ReferenceModel, policy: torch.nn.Module, ids: torch.Tensor,
                             att: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed completion log-probs ``[R]`` of the rows under the frozen reference (no grad)."""
    ref_model = reference.forward_model(policy)
    if packs_documents(ref_model):
        with reference.context(policy):
            return padfree_sequence_logps(ref_model, ids, att, labels)[0]
    ref_tok, _ = token_logps(reference.logits(policy, ids, att), labels)
    return ref_tok.sum(-1)


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                 rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The preference metrics every pairwise stage (dpo, orpo, kto on pairs) logs, TRL's names:
    mean chosen / rejected reward, accuracy (ties count one half:
    :func:`llmlab.losses.preference_accuracy`), mean margin, mean chosen / rejected log-prob. Inputs ``[B]``."""
    return {
        "rewards/chosen": chosen_rewards.mean().detach(),
        "rewards/rejected": rejected_rewards.mean().detach(),
        "rewards/accuracies": preference_accuracy(chosen_rewards, rejected_rewards).detach(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().detach(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
