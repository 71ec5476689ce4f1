"""Padding-free batches: right-padded rows laid end to end in one row, for models that keep
attention inside each sequence when position ids restart (llmlab's Transformer).

The same idea as TRL's ``padding_free`` / ``DataCollatorWithFlattening`` and Axolotl's multipack
(position ids restart at each sequence); ours works on CPU too, because llmlab's attention turns
the restarts into a block-diagonal mask on every path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def packs_documents(model) -> bool:
    """True for models whose attention stays inside each document when position ids restart
    (llmlab's Transformer, also under PEFT), so several sequences can share one row."""
    return getattr(getattr(model, "config", None), "model_type", None) == "llmlab"


@dataclass
class PackedRows:
    """R right-padded rows flattened into one.

    Attributes:
        input_ids: ``[1, N]``, the N real tokens of all rows in order.
        position_ids: ``[1, N]``, 0 at the start of each row's tokens.
        labels: ``[1, N]`` or None: the rows' labels, with −100 on the first token of every row
            (so the token before it, the last of the previous row, is never trained to predict
            it; with the model's one-step label shift the loss equals the padded batch's).
        seq: ``[N]``, the row each token came from.
        lengths: ``[R]``, real tokens per row.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    seq: torch.Tensor
    lengths: torch.Tensor


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor,
              labels: torch.Tensor | None = None) -> PackedRows:
    """Flatten a right-padded batch (``[R, T]`` each; attention_mask 1 on real tokens) into one row.

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
    flat_labels = None
    if labels is not None:
        flat_labels = labels[keep].clone()
        flat_labels[pos == 0] = -100
        flat_labels = flat_labels[None]
    return PackedRows(input_ids[keep][None], pos[None], flat_labels, seq, lengths)
