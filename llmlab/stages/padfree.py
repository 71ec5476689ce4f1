"""Padding-free batches: right-padded rows laid end to end in one row, for models that keep
attention inside each sequence when position ids restart (llmlab's Transformer).

The same idea as TRL's ``padding_free`` / ``DataCollatorWithFlattening`` and Axolotl's multipack
(position ids restart at each sequence); ours works on CPU too, because llmlab's attention turns
the restarts into a block-diagonal mask on every path.
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
    packed position ids; Mamba2, whose state flows across the row, does not.
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
