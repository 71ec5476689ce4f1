"""Direct Preference Optimization (Rafailov et al. 2023) and IPO (Azar et al. 2023).

Recipe keys (``stages.NAME``, type ``dpo``): ``beta`` [0.1], ``loss_type`` sigmoid|ipo [sigmoid],
``label_smoothing`` [0.0], ``reference_from`` [null].

The reference model is, in this order of precedence:

1. ``reference_from: STAGE``: that stage's ``final/`` weights, frozen;
2. when the policy is a PEFT model (the stage trains LoRA): the same model with its adapters disabled
   (``with model.disable_adapter():``), so no second copy of the weights is kept;
3. otherwise a frozen copy of the policy's starting weights, taken in :meth:`build_model` (before the
   loop applies LoRA or loads a checkpoint, so a resumed run gets the same reference).

Reference log-probabilities are computed for each batch under ``torch.no_grad()``. Chosen and
rejected sequences go through the policy in one forward pass (concatenated along the batch).
"""

from __future__ import annotations

import copy
import contextlib

import torch

from llmlab.losses import dpo_loss, token_logps
from llmlab.stages.base import Stage, StageContext
from llmlab.stages.padfree import pack_rows, packs_documents

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def model_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of a causal LM (HF-style output object or tuple)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out[0]


def padfree_sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens of each row of a right-padded batch, computed
    padding-free: the real tokens of all R rows are laid end to end in one ``[1, N]`` row with
    position ids restarting per sequence (the model must satisfy :func:`packs_documents`).

    Shapes: input_ids, attention_mask, labels ``[R, T]`` → (seq_logps ``[R]``, labelled tokens ``[R]``).
    Equals ``token_logps(model(ids, mask).logits, labels)`` summed per row (tested), with no compute
    spent on padding.
    """
    packed = pack_rows(input_ids, attention_mask, labels)
    seq, lens = packed.seq, packed.lengths
    out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    logits = (out.logits if hasattr(out, "logits") else out[0])[0]  # [N, V]
    target = torch.full_like(seq, -100)
    target[:-1] = packed.labels[0, 1:]  # −100 where the next token starts another row
    mask = target != -100
    lp = torch.gather(logits.float().log_softmax(-1), 1, target.clamp(min=0)[:, None])[:, 0] * mask
    zeros = torch.zeros(len(lens), dtype=lp.dtype, device=seq.device)
    return zeros.index_add(0, seq, lp), torch.zeros_like(lens).index_add(0, seq, mask.long())


def concat_pairs(batch: dict, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack chosen over rejected, right-padding both to the same length.

    Returns:
        ``(input_ids, attention_mask, labels)`` each ``[2B, T]``: rows ``0..B-1`` chosen, ``B..2B-1``
        rejected.
    """
    T = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

    ids = torch.cat([pad(batch["chosen_input_ids"], pad_token_id), pad(batch["rejected_input_ids"], pad_token_id)])
    att = torch.cat([pad(batch["chosen_attention_mask"], 0), pad(batch["rejected_attention_mask"], 0)])
    lab = torch.cat([pad(batch["chosen_labels"], -100), pad(batch["rejected_labels"], -100)])
    return ids, att, lab


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / torch.compile wrapper (PEFT's disable_adapter lives there)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_reference(ctx: StageContext, stage_name: str) -> torch.nn.Module:
    """The frozen causal LM saved by stage ``stage_name`` (its ``final/``)."""
    from llmlab.models.build import load_causal_lm

    if stage_name not in ctx.stage_paths:
        raise ValueError(f"stages.{ctx.name}.reference_from: no stage named {stage_name!r}")
    path = ctx.stage_paths[stage_name] / "final"
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
        elif self.ctx.config.get("lora") or is_peft_model(policy):
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


class DPOStage(Stage):
    """DPO / IPO on preference pairs.

    Batch keys (from :func:`llmlab.data.pipeline.build_stage_data`): ``chosen_input_ids``,
    ``chosen_attention_mask``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_attention_mask``,
    ``rejected_labels`` — ``[B, T]``, right-padded, labels only on the completion.

    Metrics: ``rewards/chosen``, ``rewards/rejected`` (mean implicit reward ``beta * log(pi/ref)``),
    ``rewards/accuracies`` (fraction of pairs with chosen reward > rejected reward),
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (mean summed completion log-probs).
    """

    type = "dpo"

    def __init__(self, ctx: StageContext):
        super().__init__(ctx)
        cfg = self.config
        self.beta = float(cfg.get("beta", 0.1))
        self.loss_type = cfg.get("loss_type", "sigmoid")
        self.label_smoothing = float(cfg.get("label_smoothing", 0.0))
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
        loss = losses.mean()
        metrics = {
            "rewards/chosen": chosen_r.mean().detach(),
            "rewards/rejected": rejected_r.mean().detach(),
            "rewards/accuracies": (chosen_r > rejected_r).float().mean().detach(),
            "rewards/margins": (chosen_r - rejected_r).mean().detach(),
            "logps/chosen": seq_logps[:B].detach().mean(),
            "logps/rejected": seq_logps[B:].detach().mean(),
        }
        return loss, metrics
