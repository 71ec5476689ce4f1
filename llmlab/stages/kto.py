"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024).

Recipe keys (``stages.NAME``, type ``kto``; defaults in the recipe schema): ``beta``,
``desirable_weight``, ``undesirable_weight`` (the paper's lambda_D, lambda_U), ``reference_from``.

KTO learns from unpaired examples labelled desirable or undesirable. Its datasets are either all
``unpaired_preference`` (``prompt/completion/label`` rows, TRL's unpaired preference format; batches
``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` and ``desirable`` ``[B]`` bool) or all
``preference``: each pair of a batch becomes one desirable example (prompt + chosen) and one
undesirable one (prompt + rejected), so a batch of ``B`` pairs holds ``2B`` examples.

The reference point ``z_0`` (:func:`llmlab.losses.kto_kl`) is estimated per micro-batch, as TRL 1.16's
``KTOTrainer`` does, from mismatched pairs: the completions rotated by one row within the batch
(row ``j`` gets its own prompt with row ``j-1``'s completion, cyclically), ``mean(log pi - log ref)``
over them, detached and clamped at 0. Held-out, the mismatched pairs and ``z_0`` are taken over the
whole held-out set instead (:func:`llmlab.heldout.kto_metrics`), so ``eval_loss`` does not depend on
batching. The reference model is chosen as for dpo
(:class:`llmlab.stages.reference.ReferenceModel`).
"""

from __future__ import annotations

import torch

from llmlab.losses import IGNORE_INDEX, kto_kl, kto_loss
from llmlab.models.padfree import concat_pairs
from llmlab.stage_params import KTOParams
from llmlab.stages.base import Stage, StageContext
from llmlab.stages.dpo import pair_metrics, pair_sequence_logps, reference_sequence_logps
from llmlab.stages.reference import ReferenceModel


def mismatched_rows(ids: torch.Tensor, att: torch.Tensor, labels: torch.Tensor,
                    pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO's mismatched pairs: row ``j``'s prompt followed by row ``j-1``'s completion (cyclically).

    A row's prompt is every token before its first labelled one; its completion runs from there to
    its last real token, with its own labels.

    Args:
        ids, att, labels: ``[R, T]`` right-padded rows, labels ``-100`` outside the completion.
        pad_token_id: the pad id of the new rows.

    Returns:
        ``(input_ids, attention_mask, labels)``, each ``[R, T']``, right-padded.
    """
    rows, rows_labels = [], []
    starts = [int((lab != IGNORE_INDEX).nonzero()[0]) for lab in labels]
    ends = [int(a.sum()) for a in att]
    R = ids.shape[0]
    for j in range(R):
        k = (j - 1) % R
        rows.append(torch.cat([ids[j, :starts[j]], ids[k, starts[k]:ends[k]]]))
        rows_labels.append(torch.cat([torch.full((starts[j],), IGNORE_INDEX, dtype=labels.dtype,
                                                 device=labels.device), labels[k, starts[k]:ends[k]]]))
    width = max(len(r) for r in rows)
    out_ids = torch.full((R, width), pad_token_id, dtype=ids.dtype, device=ids.device)
    out_att = torch.zeros((R, width), dtype=att.dtype, device=att.device)
    out_lab = torch.full((R, width), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    for j, (r, lab) in enumerate(zip(rows, rows_labels)):
        out_ids[j, :len(r)], out_att[j, :len(r)], out_lab[j, :len(r)] = r, 1, lab
    return out_ids, out_att, out_lab


def unpaired_metrics(rewards: torch.Tensor, logps: torch.Tensor, desirable: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean reward and log-prob of the desirable (``*/chosen``) and undesirable (``*/rejected``)
    examples of a batch, and their margin, as TRL's KTOTrainer logs them (a side with no example
    logs nothing). Inputs ``[N]``."""
    out = {}
    for side, sel in (("chosen", desirable), ("rejected", ~desirable)):
        if sel.any():
            out[f"rewards/{side}"] = rewards[sel].mean()
            out[f"logps/{side}"] = logps[sel].mean()
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def kto_examples(heldout) -> list[tuple[list[int], list[bool], bool]]:
    """``(ids, flags, desirable)`` per KTO example of a :class:`llmlab.data.pipeline.HeldOut`: its
    unpaired rows, or its pairs as the ``N`` chosen completions (desirable) then the ``N`` rejected ones,
    the order a training batch of pairs has (:func:`llmlab.models.padfree.concat_pairs`)."""
    if heldout.kind == "unpaired":
        return [(list(ids), list(flags), bool(d)) for ids, flags, d in heldout.examples]
    return ([(list(c[0]), list(c[1]), True) for c, _ in heldout.examples]
            + [(list(r[0]), list(r[1]), False) for _, r in heldout.examples])


class KTOStage(Stage):
    """KTO on preference pairs split into desirable / undesirable examples (batch keys as
    :class:`llmlab.stages.dpo.DPOStage`).

    Metrics (TRL's names): ``rewards/chosen``, ``rewards/rejected`` (mean ``beta * log(pi/ref)`` of
    the desirable / undesirable examples), ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
    ``kl`` (the reference point ``z_0``), and on pairs ``rewards/accuracies``: the share of pairs
    whose chosen reward exceeds the rejected one (ties one half), the preference accuracy every
    pairwise stage reports. Unpaired batches have no pairs, hence no accuracy; a batch with no
    desirable (undesirable) example logs no ``*/chosen`` (``*/rejected``) metric and no margin.
    ``loss`` is the mean per-example KTO loss.
    """

    type = "kto"

    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        p: KTOParams = ctx.plan.params
        self.beta = float(p.beta)
        self.desirable_weight = float(p.desirable_weight)
        self.undesirable_weight = float(p.undesirable_weight)
        self.reference = ReferenceModel(ctx, p.reference_from)

    def build_model(self) -> torch.nn.Module:
        policy = super().build_model()
        self.reference.capture(policy)
        return policy

    def setup(self, model: torch.nn.Module) -> None:
        self.reference.setup(model, self.ctx.device)

    @torch.no_grad()
    def evaluate_heldout(self, model: torch.nn.Module, heldout) -> dict[str, float]:
        """The held-out KTO numbers (:func:`llmlab.heldout.kto_metrics`: the reference point over the
        mismatched examples of the whole held-out set, the loss averaged over all examples; on pairs
        the chosen completions desirable, the rejected undesirable), keys prefixed ``eval_``, with
        ``eval_examples`` (pairs, or unpaired rows), ``eval_tokens`` (scored completion tokens),
        ``eval_truncated`` (rows, or pairs, with a sequence cut) and ``eval_heldout_examples``. The reference's
        log-probabilities are computed once per held-out set (the reference is frozen)."""
        from llmlab.heldout import cut_count, eval_record, kto_logps, kto_metrics

        examples = kto_examples(heldout)
        bs = self.data.batch_size
        logps, kl_logps, tokens, cut = kto_logps(model, examples, self.pad_token_id, bs)
        cached = getattr(self, "_ref_heldout", None)
        if cached is None or cached[0] is not heldout:
            with self.reference.context(model):
                cached = (heldout, kto_logps(self.reference.forward_model(model), examples, self.pad_token_id, bs))
            self._ref_heldout = cached
        ref_logps, ref_kl_logps = cached[1][0], cached[1][1]
        m = kto_metrics(logps, ref_logps, kl_logps, ref_kl_logps, [ex[2] for ex in examples], beta=self.beta,
                        desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
                        paired=heldout.kind == "preference")
        return eval_record(m, heldout, sum(tokens), cut_count(cut, heldout.kind == "preference"), "examples")

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        device = self.ctx.device
        if "desirable" in batch:  # unpaired rows
            ids, att, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            desirable = batch["desirable"].to(device)
        else:  # pairs: chosen rows desirable, rejected rows undesirable
            ids, att, labels = (t.to(device) for t in concat_pairs(batch, self.pad_token_id))
            desirable = torch.arange(ids.shape[0], device=device) < ids.shape[0] // 2
        kl_ids, kl_att, kl_labels = mismatched_rows(ids, att, labels, self.pad_token_id)
        logps, _ = pair_sequence_logps(model, ids, att, labels)
        with torch.no_grad():
            kl_logps, _ = pair_sequence_logps(model, kl_ids, kl_att, kl_labels)
        ref_logps = reference_sequence_logps(self.reference, model, ids, att, labels)
        ref_kl_logps = reference_sequence_logps(self.reference, model, kl_ids, kl_att, kl_labels)
        kl = kto_kl(kl_logps, ref_kl_logps)
        losses, rewards = kto_loss(logps, ref_logps, desirable, kl, self.beta,
                                   self.desirable_weight, self.undesirable_weight)
        if "desirable" in batch:
            metrics = unpaired_metrics(rewards, logps.detach(), desirable)
        else:
            B = ids.shape[0] // 2
            metrics = pair_metrics(rewards[:B], rewards[B:], logps[:B], logps[B:])
        metrics["kl"] = kl
        return losses.mean(), metrics

    def tokens_in_batch(self, batch: dict) -> int:
        """The examples' tokens and the mismatched pairs' (about as many again)."""
        return 2 * super().tokens_in_batch(batch)
