"""Direct Preference Optimization (Rafailov et al. 2023) and IPO (Azar et al. 2023).

Recipe keys (``stages.NAME``, type ``dpo``; defaults in the recipe schema): ``beta``, ``loss_type``
sigmoid|ipo, ``label_smoothing``, ``rpo_alpha``, ``reference_from``.

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

from llmlab.losses import dpo_loss, token_logps
from llmlab.models.padfree import concat_pairs, model_logits, packs_documents, padfree_sequence_logps
from llmlab.recipe.schema import stage_defaults
from llmlab.stages.base import Stage, StageContext
from llmlab.stages.reference import ReferenceModel

__all__ = ["DPOStage", "concat_pairs", "model_logits", "padfree_sequence_logps"]

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "preference_loss", "nll_loss")


class DPOStage(Stage):
    """DPO / IPO on preference pairs.

    Batch keys (from :func:`llmlab.data.pipeline.build_stage_data`): ``chosen_input_ids``,
    ``chosen_attention_mask``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_attention_mask``,
    ``rejected_labels`` — ``[B, T]``, right-padded, labels only on the completion.

    Metrics: ``rewards/chosen``, ``rewards/rejected`` (mean implicit reward ``beta * log(pi/ref)``),
    ``rewards/accuracies`` (fraction of pairs with chosen reward > rejected reward),
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (mean summed completion log-probs),
    ``preference_loss`` (the DPO / IPO loss alone), ``nll_loss`` (the chosen completions' negative
    log-likelihood per token, nats: the RPO term before its weight ``rpo_alpha``; logged whatever the
    weight). ``loss`` is ``preference_loss + rpo_alpha * nll_loss``.
    """

    type = "dpo"

    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        cfg = {**stage_defaults(self.type), **self.config}
        self.beta = float(cfg["beta"])
        self.loss_type = cfg["loss_type"]
        self.label_smoothing = float(cfg["label_smoothing"])
        self.rpo_alpha = float(cfg["rpo_alpha"])
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"stages.{ctx.name}.loss_type: {self.loss_type!r} is not one of sigmoid, ipo")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError(f"stages.{ctx.name}.label_smoothing applies to loss_type sigmoid only")
        self.reference = ReferenceModel(ctx, cfg.get("reference_from"))

    # -- model -----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        policy = super().build_model()
        self.reference.capture(policy)
        return policy

    def setup(self, model: torch.nn.Module) -> None:
        self.reference.setup(model, self.ctx.device)

    # -- data ------------------------------------------------------------------------------
    def get_batch(self, index: int, model: torch.nn.Module) -> dict:
        return self.data.train_batch(index)

    def eval_batches(self) -> list[dict]:
        return self.data.eval_batches()

    def heldout(self):
        return self.data.heldout()

    @torch.no_grad()
    def evaluate_heldout(self, model: torch.nn.Module, heldout) -> dict[str, float]:
        """The held-out preference numbers over all held-out pairs (:func:`llmlab.heldout.preference_metrics`:
        the loss per pair averaged over pairs, accuracy over pairs), keys prefixed ``eval_``, with
        ``eval_examples`` (pairs), ``eval_tokens`` (scored completion tokens, chosen and rejected),
        ``eval_truncated`` and ``eval_heldout_examples``. The reference's log-probabilities are
        computed once per held-out set (the reference is frozen)."""
        from llmlab.heldout import pair_logps, preference_metrics

        bs = self.data.batch_size
        c, r, cut = pair_logps(model, heldout.examples, self.pad_token_id, bs)
        cached = getattr(self, "_ref_heldout", None)
        if cached is None or cached[0] is not heldout:
            with self.reference.context(model):
                cached = (heldout, pair_logps(self.reference.forward_model(model), heldout.examples,
                                              self.pad_token_id, bs))
            self._ref_heldout = cached
        rc, rr, _ = cached[1]
        m = preference_metrics([s for s, _ in c], [s for s, _ in r], [s for s, _ in rc], [s for s, _ in rr],
                               [n for _, n in c], [n for _, n in r], beta=self.beta, loss_type=self.loss_type,
                               label_smoothing=self.label_smoothing, rpo_alpha=self.rpo_alpha)
        out = {f"eval_{k}": v for k, v in m.items() if k != "pairs"}
        out.update(eval_examples=len(heldout.examples), eval_tokens=sum(n for _, n in c) + sum(n for _, n in r),
                   eval_truncated=cut, eval_heldout_examples=heldout.total)
        return out

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        device = self.ctx.device
        ids, att, labels = (t.to(device) for t in concat_pairs(batch, self.pad_token_id))
        B = batch["chosen_input_ids"].shape[0]

        # models that keep attention inside each document get padding-free forwards: ~1.5x faster
        # DPO on CPU (benchmarks/dpo_throughput.py); others take the padded batch
        if packs_documents(model):
            seq_logps, lengths = padfree_sequence_logps(model, ids, att, labels)
        else:
            logps, mask = token_logps(model_logits(model, ids, att), labels)
            seq_logps, lengths = logps.sum(-1), mask.sum(-1)
        with torch.no_grad():
            ref_model = self.reference.forward_model(model)
            if packs_documents(ref_model):
                with self.reference.context(model):
                    ref_seq, _ = padfree_sequence_logps(ref_model, ids, att, labels)
            else:
                ref_tok, _ = token_logps(self.reference.logits(model, ids, att), labels)
                ref_seq = ref_tok.sum(-1)

        losses, chosen_r, rejected_r = dpo_loss(
            seq_logps[:B], seq_logps[B:], ref_seq[:B], ref_seq[B:], beta=self.beta,
            loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
        # RPO's NLL term: chosen-token NLL averaged over the micro-batch's chosen tokens (TRL's "sft" loss)
        nll = -seq_logps[:B].sum() / lengths[:B].sum().clamp(min=1)
        preference_loss = losses.mean()
        loss = preference_loss + self.rpo_alpha * nll if self.rpo_alpha else preference_loss
        metrics = {
            "rewards/chosen": chosen_r.mean().detach(),
            "rewards/rejected": rejected_r.mean().detach(),
            "rewards/accuracies": (chosen_r > rejected_r).float().mean().detach(),
            "rewards/margins": (chosen_r - rejected_r).mean().detach(),
            "logps/chosen": seq_logps[:B].detach().mean(),
            "logps/rejected": seq_logps[B:].detach().mean(),
            "preference_loss": preference_loss.detach(),
            "nll_loss": nll.detach(),
        }
        return loss, metrics
