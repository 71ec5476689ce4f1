"""Padding-free (packed) rows for transformers' Mamba2 without the mamba_ssm kernels.

A packed row holds several sequences end to end, position ids restarting at 0 at each one
(:func:`llmlab.models.padfree.pack_rows`). For a state-space model "kept apart" means two things:
the causal depthwise conv1d must not read the last tokens of the previous sequence, and the SSM
state must start from zero at every sequence start. mamba_ssm's kernels do both when given
``seq_idx`` (``[B, L]``, the index of the sequence each position belongs to); transformers' pure
PyTorch path (``Mamba2Mixer`` without kernels) ignores it and its kernel wrapper refuses it.

This module supplies that path in plain PyTorch (CPU, or a GPU without the kernels):

* :func:`packed_causal_conv1d`: the same ``F.conv1d`` as transformers, on a copy of the row with
  ``K - 1`` zeros inserted before every sequence, so no window spans two sequences.
* :func:`packed_chunk_scan`: the chunked SSD algorithm (Dao & Gu 2024, "Transformers are SSMs",
  section 6, the state-space duality; transformers' ``mamba2_chunk_scan``) with mamba_ssm's
  ``seq_idx`` semantics: every decay between two positions of different sequences is exactly 0
  (masked before the ``exp``, never by ``-inf`` arithmetic), both inside a chunk and across chunks.
* :class:`PackedMamba2Mixer`: a subclass of transformers' ``Mamba2Mixer`` with no state of its own
  (same parameters, same ``state_dict`` keys) whose forward takes ``seq_idx``; without it, or with
  the kernels installed on a GPU, it runs transformers' own forward unchanged.
* :func:`enable_packed_mamba2`: swaps the mixers of a built or loaded ``Mamba2ForCausalLM`` in
  place and adds two forward pre-hooks that turn the ``position_ids`` a caller passes into
  ``seq_idx`` for the mixers (``Mamba2ForCausalLM.forward`` does not pass extra keywords on to its
  backbone). The model still saves as, and loads into, a plain ``Mamba2ForCausalLM``.

The result is a model that satisfies :func:`llmlab.models.padfree.packs_documents` by its probe,
so every stage that packs batches (sft, dpo, ...) packs Mamba2 batches too.
"""

from __future__ import annotations

import functools
import importlib.util
import threading

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.models.mamba2.modeling_mamba2 import Mamba2ForCausalLM, Mamba2Mixer, Mamba2Model


def sequence_index(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The sequence each position of packed rows belongs to (mamba_ssm's ``seq_idx``).

    A sequence starts wherever the position id is 0 (the convention of :func:`pack_rows`, TRL's
    ``DataCollatorWithFlattening`` and flash-attention's varlen path).

    Args:
        position_ids: ``[B, L]`` (or ``[L]``) integer position ids.
    Returns:
        ``[B, L]`` int64, non-decreasing along each row, or None when no row restarts after its first
        position (one sequence a row: nothing to keep apart).
    """
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    if pos.shape[-1] < 2 or not bool((pos[:, 1:] == 0).any()):
        return None
    return torch.cumsum((pos == 0).long(), dim=-1)


def packed_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         seq_idx: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """Causal depthwise conv1d that restarts at every sequence of packed rows.

    Each sequence is moved ``K - 1`` slots further right per sequence before it, leaving zeros in
    between, so the usual causal conv (left zero padding of ``K - 1``) never reads across a
    sequence start; the outputs are gathered back. Same ``F.conv1d`` call as transformers'
    ``causal_conv1d_fn``, so under autocast it runs in the same precision.

    Args:
        x: ``[B, C, L]`` channels first. weight: ``[C, K]``. bias: ``[C]`` or None.
        seq_idx: ``[B, L]`` from :func:`sequence_index`. activation: an ``ACT2FN`` name or None.
    Returns:
        ``[B, C, L]`` in ``x``'s dtype.
    """
    b, channels, length = x.shape
    k = weight.shape[-1]
    first = torch.ones_like(seq_idx, dtype=torch.bool)
    first[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    where = torch.arange(length, device=x.device) + (k - 1) * torch.cumsum(first.long(), dim=-1)  # [B, L]
    width = int(where.max()) + 1
    index = where[:, None, :].expand(b, channels, length)
    spread = x.new_zeros(b, channels, width, dtype=weight.dtype).scatter(2, index, x.to(weight.dtype))
    out = F.conv1d(spread, weight[:, None, :], bias, padding=k - 1, groups=channels)[..., :width]
    out = out.gather(2, index)
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(x.dtype)


def segment_sums(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Stable segment sums ``S[..., i, j] = x[..., j+1] + ... + x[..., i]`` for ``i >= j`` where ``keep``,
    ``-inf`` elsewhere (so ``exp(S)`` is the decay from ``j`` to ``i``, 0 where masked).

    Built from a cumulative sum of masked copies, never a difference of two prefix sums, so no
    ``-inf - (-inf)`` and no cancellation (transformers' ``segment_sum`` does the same, without the
    sequence mask).

    Args:
        x: ``[..., T]``. keep: bool, broadcastable to ``[..., T, T]`` (rows i, columns j); the lower
            triangle is applied here.
    Returns:
        ``[..., T, T]`` in ``x``'s dtype.
    """
    t = x.shape[-1]
    strict = torch.ones(t, t, dtype=torch.bool, device=x.device).tril(-1)
    sums = torch.cumsum(x[..., :, None].expand(*x.shape, t).masked_fill(~strict, 0), dim=-2)
    lower = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    return sums.masked_fill(~(lower & keep), float("-inf"))


def _chunks(x: torch.Tensor, pad: int, chunk: int) -> torch.Tensor:
    """``[B, L, ...]`` zero-padded at the end by ``pad`` and split into ``[B, L // chunk, chunk, ...]``."""
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.reshape(x.shape[0], -1, chunk, *x.shape[2:])


def packed_chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor, seq_idx: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The SSD chunked scan (Dao & Gu 2024, section 6) over packed rows, each sequence from a zero state.

    ``y_t = sum_{s <= t, same sequence} (C_t . B_s) exp(sum_{s < k <= t} A dt_k) dt_s x_s + D x_t``, per
    head. Inside a chunk the decay matrix is masked to the sequence's own positions; a chunk's final
    state keeps only its last sequence's positions; a state is carried into a later chunk only while
    the sequence at the chunk ends is the same (mamba_ssm's ``seq_idx``). In fp32 like transformers'
    ``mamba2_chunk_scan`` (its einsums follow autocast).

    Args:
        x: ``[B, L, H, P]``. dt: ``[B, L, H]``, already discretised (bias, softplus, clamp). A: ``[H]``
            (negative). B, C: ``[B, L, G, N]`` with G dividing H. D: ``[H]``. seq_idx: ``[B, L]``.
        chunk_size: positions per chunk.
    Returns:
        ``[B, L, H, P]`` float32.
    """
    batch, length, heads, _ = x.shape
    pad = (-length) % chunk_size
    x, dt = x.float(), dt.float()
    B = B.float().repeat_interleave(heads // B.shape[2], dim=2)
    C = C.float().repeat_interleave(heads // C.shape[2], dim=2)
    skip = D.float()[:, None] * x
    seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], 1).reshape(batch, -1, chunk_size)  # [b, c, l]
    xdt, Adt, B, C = (_chunks(t, pad, chunk_size) for t in (x * dt[..., None], A.float() * dt, B, C))
    Adt = Adt.permute(0, 3, 1, 2)  # [b, h, c, l]
    # 1. inside each chunk: decays between positions of one sequence, 0 across sequences
    decay = torch.exp(segment_sums(Adt, (seq[..., :, None] == seq[..., None, :])[:, None]))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bclsh", C, B) * decay.permute(0, 2, 3, 4, 1)
    y = torch.einsum("bclsh,bcshp->bclhp", scores, xdt)
    # 2. each chunk's final state, from its last sequence's positions only (the last row of `decay`)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay[..., -1, :], xdt)
    # 3. states carried across chunks while the sequence at the chunk ends stays the same
    ends = seq[..., -1]  # [b, c]
    carry = torch.exp(segment_sums(Adt.sum(-1), (ends[:, :, None] == ends[:, None, :])[:, None]))  # [b, h, c, z]
    states = torch.einsum("bhcz,bzhpn->bchpn", carry, states)  # the state at the end of chunk c
    # 4. the state entering chunk c (end of chunk c - 1) read out by the positions of that same sequence
    entering = F.pad(states[:, :-1], (0, 0, 0, 0, 0, 0, 1, 0))
    same = (seq == F.pad(ends[:, :-1], (1, 0), value=-1)[..., None])[:, None]  # [b, 1, c, l]
    out_decay = torch.exp(torch.cumsum(Adt, -1).masked_fill(~same, float("-inf")))  # [b, h, c, l]
    y = y + torch.einsum("bclhn,bchpn->bclhp", C, entering) * out_decay.permute(0, 2, 3, 1)[..., None]
    return y.reshape(batch, -1, heads, x.shape[-1])[:, :length] + skip


def kernels_keep_sequences_apart(device: torch.device) -> bool:
    """True where transformers' Mamba2Mixer runs the mamba_ssm and causal_conv1d kernels, which take
    ``seq_idx`` themselves: a CUDA device with both packages installed."""
    return device.type == "cuda" and _kernels_installed()


@functools.cache
def _kernels_installed() -> bool:
    """mamba_ssm and causal_conv1d are importable (looked up once: every mixer's forward asks)."""
    return all(importlib.util.find_spec(p) is not None for p in ("mamba_ssm", "causal_conv1d"))


class PackedMamba2Mixer(Mamba2Mixer):
    """transformers' ``Mamba2Mixer`` that also takes packed rows (``seq_idx``); no parameters or
    buffers of its own, so a model with these mixers has the plain model's ``state_dict``.

    ``forward(hidden_states [B, L, D], cache=None, attention_mask=None, seq_idx=None)``: without
    ``seq_idx`` it is transformers' forward (kernels, cache and generation included). With it, each
    sequence of a row is computed as if alone: by the kernels where :func:`kernels_keep_sequences_apart`,
    else by :func:`packed_causal_conv1d` and :func:`packed_chunk_scan`. Returns ``[B, L, D]``.

    Raises:
        ValueError: ``seq_idx`` together with a cache (generation continues one sequence, never a pack).
    """

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None, **kwargs):
        if seq_idx is None:
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        if cache is not None:
            raise ValueError("Mamba2: packed rows (position ids restarting at 0) cannot use a cache; pass use_cache=False")
        if kernels_keep_sequences_apart(hidden_states.device):
            return super().forward(hidden_states, attention_mask=attention_mask, seq_idx=seq_idx.int(), **kwargs)
        return self._packed_forward(hidden_states, attention_mask, seq_idx)

    def _packed_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                        seq_idx: torch.Tensor) -> torch.Tensor:
        """transformers' pure-PyTorch forward (no cache) with the conv and the scan kept per sequence."""
        batch, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        if attention_mask is not None:
            hidden_states = (hidden_states * attention_mask[:, :, None]).to(dtype)
        gate, xBC, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        xBC = packed_causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                   seq_idx, self.activation).transpose(1, 2)
        if attention_mask is not None:
            xBC = (xBC * attention_mask[:, :, None]).to(xBC.dtype)
        groups = self.n_groups * self.ssm_state_size
        x, B, C = torch.split(xBC, [self.intermediate_size, groups, groups], dim=-1)
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype))
        dt = torch.clamp(dt, min=self.time_step_limit[0], max=self.time_step_limit[1])
        y = packed_chunk_scan(x.view(batch, length, self.num_heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
                              B.view(batch, length, self.n_groups, -1), C.view(batch, length, self.n_groups, -1),
                              self.D, seq_idx, self.chunk_size)
        y = self.norm(y.reshape(batch, length, -1), gate)
        return self.out_proj(y.to(dtype))


# position ids a Mamba2ForCausalLM was called with, for its backbone's pre-hook (per thread and backbone)
_PENDING = threading.local()


def _pending() -> dict:
    if not hasattr(_PENDING, "by_backbone"):
        _PENDING.by_backbone = {}
    return _PENDING.by_backbone


def _hand_position_ids(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Pre-hook of the causal LM: keep ``position_ids`` for its backbone's call (the LM drops them)."""
    _pending()[id(model.backbone)] = kwargs.get("position_ids")


def _forget_position_ids(model: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    """Forward hook of the causal LM (always called, errors included): drop what was kept."""
    _pending().pop(id(model.backbone), None)


def _pass_seq_idx(backbone: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Pre-hook of the backbone: ``position_ids`` (its own, or the causal LM's) -> ``seq_idx`` for the mixers."""
    pos = kwargs.pop("position_ids", None)
    pending = _pending().pop(id(backbone), None)
    pos = pending if pos is None else pos
    if pos is not None and kwargs.get("seq_idx") is None:
        seq_idx = sequence_index(pos)
        if seq_idx is not None:
            kwargs["seq_idx"] = seq_idx
    return args, kwargs


def enable_packed_mamba2(model: torch.nn.Module) -> torch.nn.Module:
    """Let a transformers ``Mamba2ForCausalLM`` (or a model holding one) take packed rows, in place.

    Every ``Mamba2Mixer`` becomes a :class:`PackedMamba2Mixer` (a class swap: same parameter objects,
    same ``state_dict``, so ``save_pretrained`` writes a plain ``Mamba2ForCausalLM``); every
    ``Mamba2ForCausalLM`` / ``Mamba2Model`` gets pre-hooks that turn ``position_ids`` restarting at 0
    into the mixers' ``seq_idx`` (:func:`sequence_index`). A forward without position ids, or with one
    sequence a row, is transformers' own. Idempotent; other models are returned untouched. Nothing of
    transformers is patched globally.

    Returns:
        ``model``.
    """
    for module in model.modules():
        if type(module) is Mamba2Mixer:
            module.__class__ = PackedMamba2Mixer
        if getattr(module, "_llmlab_packs_rows", False):
            continue
        if isinstance(module, Mamba2ForCausalLM):
            module.register_forward_pre_hook(_hand_position_ids, with_kwargs=True)
            module.register_forward_hook(_forget_position_ids, with_kwargs=True, always_call=True)
            module._llmlab_packs_rows = True
        elif isinstance(module, Mamba2Model):
            module.register_forward_pre_hook(_pass_seq_idx, with_kwargs=True)
            module._llmlab_packs_rows = True
    return model


__all__ = ["PackedMamba2Mixer", "enable_packed_mamba2", "kernels_keep_sequences_apart", "packed_causal_conv1d",
           "packed_chunk_scan", "segment_sums", "sequence_index"]
