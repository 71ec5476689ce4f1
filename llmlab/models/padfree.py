"""Padding-free batches: right-padded rows laid end to end in one row, for models that keep
attention inside each sequence when position ids restart (llmlab's Transformer, transformers'
decoders, and the Mamba2 llmlab builds: :mod:`llmlab.models.mamba2_packed`).

The same idea as TRL's ``padding_free`` / ``DataCollatorWithFlattening`` and Axolotl's multipack
(position ids restart at each sequence); ours works on CPU too, because llmlab's attention turns
the restarts into a block-diagonal mask on every path.

Shared by the sft, dpo, reward, grpo and ppo stages and by the RL reward sources: :func:`pack_rows`,
:func:`packs_documents`, :func:`padfree_sequence_logps`, :func:`concat_pairs` (chosen over
rejected), :func:`model_logits` and :func:`reward_scores`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


def packs_documents(model) -> bool:
    """True for causal LMs whose attention stays inside each sequence when position ids restart,
    so several sequences can share one row.

    llmlab's Transformer always does (its attention builds a block-diagonal mask from the
    restarts). Any other model is probed once (result cached per model object): two short
    sequences laid end to end with restarting position ids must give the second one the logits it
    gets alone, in fp32 (models held in another dtype are not probed and keep padded batches).
    transformers' own decoders (Llama, Mistral, Qwen2, ...) pass, as their mask builder detects
    packed position ids. A plain ``Mamba2ForCausalLM``, whose conv and SSM state flow across the
    row, does not; the Mamba2 llmlab builds or loads passes (its mixers reset at every restart:
    :func:`llmlab.models.mamba2_packed.enable_packed_mamba2`).
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "llmlab":
        return True
    if config is None or not isinstance(model, torch.nn.Module):
        return False
    if model not in _PROBED:
        _PROBED[model] = _probe_packing(model)
    return _PROBED[model]


_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _probe_packing(model: torch.nn.Module) -> bool:
    """Second of two packed sequences vs the same sequence alone: equal logits (fp32, eval mode)."""
    try:
        param = next(model.parameters())
        emb = model.get_input_embeddings()
    except (StopIteration, AttributeError, NotImplementedError):
        return False
    if param.dtype != torch.float32 or emb is None:
        return False
    vocab = int(emb.num_embeddings)
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab, (1, 7), generator=g).to(param.device)
    second = torch.randint(0, vocab, (1, 5), generator=g).to(param.device)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None].to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(param.device.type, enabled=False):
            packed = model(input_ids=torch.cat([first, second], 1), position_ids=pos, use_cache=False)
            alone = model(input_ids=second, use_cache=False)
        packed = (packed.logits if hasattr(packed, "logits") else packed[0])[0, 7:]
        alone = (alone.logits if hasattr(alone, "logits") else alone[0])[0]
        if packed.shape != alone.shape:
            return False
        scale = max(1.0, float(alone.abs().max()))
        return bool((packed - alone).abs().max() <= 1e-5 * scale)
    except Exception:  # noqa: BLE001 - a model that cannot take position ids keeps padded batches
        return False
    finally:
        model.train(was_training)


@dataclass
class PackedRows:
    """R right-padded rows flattened into one.

    Attributes:
        input_ids: ``[1, L]``, the N real tokens of all rows in order, then L − N padding tokens
            (``bucket``; L = N without).
        position_ids: ``[1, L]``, 0 at the start of each row's tokens (and of the padding).
        labels: ``[1, L]`` or None: the rows' labels, with −100 on the first token of every row
            (so the token before it, the last of the previous row, is never trained to predict
            it; with the model's one-step label shift the loss equals the padded batch's), −100
            on the padding.
        seq: ``[N]``, the row each real token came from.
        lengths: ``[R]``, real tokens per row.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    seq: torch.Tensor
    lengths: torch.Tensor


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor,
              labels: torch.Tensor | None = None, bucket: bool = True) -> PackedRows:
    """Flatten a right-padded batch (``[R, T]`` each; attention_mask 1 on real tokens) into one row.

    With ``bucket`` the row is padded from its N real tokens to ``bucket_width(N)`` by one more
    sequence (position ids from 0, labels −100, token id 0) that attention keeps apart and the loss
    ignores: the same loss and the same logits on the real tokens, in a few row lengths instead of
    a new one at nearly every step (:func:`bucket_width`). ``seq`` and ``lengths`` describe the
    real tokens only; the padding is the row's tail, ``input_ids[0, N:]``.

    Raises:
        ValueError: a row is not right-padded (a 0 in the mask before a 1).
    """
    keep = attention_mask.bool()
    if keep.shape[1] > 1 and bool((keep[:, 1:] & ~keep[:, :-1]).any()):
        raise ValueError("padding-free packing needs right-padded rows")
    lengths = keep.sum(1)
    device = input_ids.device
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(seq.numel(), device=device) - starts[seq]
    flat_ids = input_ids[keep]
    flat_labels = None
    if labels is not None:
        flat_labels = labels[keep].clone()
        flat_labels[pos == 0] = -100
    extra = bucket_width(seq.numel()) - seq.numel() if bucket else 0
    if extra:
        flat_ids = torch.cat([flat_ids, flat_ids.new_zeros(extra)])
        pos = torch.cat([pos, torch.arange(extra, device=device)])
        if flat_labels is not None:
            flat_labels = torch.cat([flat_labels, flat_labels.new_full((extra,), -100)])
    return PackedRows(flat_ids[None], pos[None], None if flat_labels is None else flat_labels[None], seq, lengths)


def bucket_width(longest: int, cap: int | None = None) -> int:
    """The width a padded batch whose longest row holds ``longest`` tokens is padded to: the next
    multiple of 16 up to 128, then of a quarter of the power of two below (128, 160, 192, 224,
    256, 320, ...: 4 widths per doubling), at most ``cap`` (the stage's seq_len) and never below
    ``longest``.

    Used for the width of padded batches (sft, preference) and the length of padding-free rows
    (:func:`pack_rows`). A batch then carries at most 25 % padding beyond its longest row (16
    tokens below 64), and a stage sees about 8 + 4 * log2(length / 128) distinct shapes instead of
    one per length. On a CPU under bf16 autocast every new shape keeps tens of MB of oneDNN kernels
    and buffers that are never given back (the quick-start's padding-free SFT stage grew
    0.7 -> 2.6 GB over 150 steps, a new row length at nearly every step), and widths that are not
    multiples of 16 take slower bf16 kernels (``benchmarks/batch_shapes.py``); ``compile: true``
    recompiles per shape as well.
    """
    step = max(16, 1 << max(longest.bit_length() - 3, 0))  # a quarter of 2^floor(log2 longest)
    width = -(-max(longest, 1) // step) * step
    if cap is not None:
        width = min(width, int(cap))
    return max(width, longest)


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
    n = seq.numel()
    out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    logits = (out.logits if hasattr(out, "logits") else out[0])[0, :n]  # [N, V]: the bucket's padding cut
    target = torch.full_like(seq, -100)
    target[:-1] = packed.labels[0, 1:n]  # −100 where the next token starts another row
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


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar rewards ``[B]`` of a ``num_labels = 1`` sequence classifier for right-padded ``[B, T]``.

    llmlab's Transformer scores the rows padding-free (their real tokens in one row, position ids
    restarting per row, each scored at its last token); same scores as the padded batch (tested).
    """
    out = None
    # pool_positions (one score per packed sequence) is llmlab's own sequence-classifier API
    if getattr(getattr(model, "config", None), "model_type", None) == "llmlab":
        packed = pack_rows(input_ids, attention_mask)
        if bool((packed.lengths > 0).all()):
            out = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                        pool_positions=torch.cumsum(packed.lengths, 0) - 1)
    if out is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.squeeze(-1).float()
