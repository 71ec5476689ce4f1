"""The llmlab Transformer: a decoder-only language model with choosable components.

Self-contained: imports only torch, transformers and ``.configuration_llmlab`` (``save_pretrained``
copies both files next to the weights, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` works on a machine without llmlab).

Module names follow Llama (``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``,
``model.layers.N.mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``,
``model.norm``, ``lm_head``), so PEFT target names and checkpoints line up, and a model with
rope + rmsnorm + swiglu is a Llama checkpoint after a config rewrite (see ``llmlab.models.export``).

Shapes below: B batch, T query length, S key length (cache + new tokens), D d_model, H query heads,
H_kv key/value heads, Dh head dim, V vocab, E experts, k experts per token.

References: Vaswani et al. 2017 (Transformer, sinusoidal positions); Su et al. 2021 (RoPE);
Press et al. 2022 (ALiBi); Peng et al. 2023 (YaRN); Zhang & Sennrich 2019 (RMSNorm);
Shazeer 2020 (SwiGLU); Ainslie et al. 2023 (GQA); Shazeer 2019 (MQA); Beltagy et al. 2020 /
Jiang et al. 2023 (sliding-window attention); Jiang et al. 2024 (Mixtral sparse MoE);
Fedus et al. 2021 (Switch Transformer load-balancing loss); Radford et al. 2019 (scaled init).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init

from .configuration_llmlab import LlmlabConfig

try:  # pragma: no cover - only on machines with flash-attn
    from flash_attn import flash_attn_func as _flash_attn_func
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except Exception:  # ImportError, or a broken CUDA build
    _flash_attn_func = _flash_attn_varlen_func = None

#: devices whose tensors flash-attn's kernels take (tests add "cpu" with a reference kernel)
FLASH_DEVICES = ("cuda",)

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

#: The name under which this transformers version carries the KV cache, both as the model's
#: forward keyword that ``generate`` passes and as the field of the model outputs: ``cache`` from
#: transformers 5.2x on, ``past_key_values`` before. The forwards below accept either name.
CACHE_FIELD = "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def _cache_arg(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache passed under either name (``cache`` or the older ``past_key_values``).

    Raises:
        ValueError: two different caches were passed.
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as cache= or as past_key_values=, not both")
    return cache if cache is not None else past_key_values


def _with_cache(output_cls, cache: Cache | None, **fields):
    """``output_cls(**fields)`` with the KV cache stored under this version's field name."""
    return output_cls(**fields, **{CACHE_FIELD: cache})

#: the auto_map written into config.json by save_pretrained (files copied next to the weights)
AUTO_MAP = {
    "AutoConfig": "configuration_llmlab.LlmlabConfig",
    "AutoModel": "modeling_llmlab.LlmlabModel",
    "AutoModelForCausalLM": "modeling_llmlab.LlmlabForCausalLM",
    "AutoModelForSequenceClassification": "modeling_llmlab.LlmlabForSequenceClassification",
}


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
@dataclass
class LlmlabModelOutputWithPast(BaseModelOutputWithPast):
    """:class:`BaseModelOutputWithPast` plus ``aux_loss``: the mean over layers of the MoE
    load-balancing loss (scalar), ``None`` for a dense model."""

    aux_loss: torch.FloatTensor | None = None


@dataclass
class LlmlabCausalLMOutputWithPast(CausalLMOutputWithPast):
    """:class:`CausalLMOutputWithPast` plus ``aux_loss`` (MoE load-balancing loss, unweighted;
    ``loss`` already includes ``router_aux_loss_coef * aux_loss``)."""

    aux_loss: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------
# component registries: a component is one registered entry here plus its value in the recipe
# schema's enum (schemas/recipe.schema.json, $defs/model_transformer) and in the configuration's
# name tuple (configuration_llmlab.py validates a config without torch); tests/models/
# test_components.py checks that the three agree
# ---------------------------------------------------------------------------------------------
#: norm_type -> a module class taking ``(dim, eps=...)``; shapes [..., D] -> [..., D]
NORMS: dict[str, type] = {}
#: activation -> elementwise function (for a gated activation: the gate's; see ``config.is_gated``)
ACTIVATION_FUNCTIONS: dict = {}
#: positional_encoding -> a :class:`PositionalEncoding` subclass
POSITION_ENCODINGS: dict[str, type] = {}


def register_norm(name: str):
    """Class decorator: ``norm_type: name`` builds this class ``(d_model, eps=norm_eps)``."""

    def deco(cls):
        NORMS[name] = cls
        return cls

    return deco


def register_activation(name: str, fn) -> None:
    """``activation: name`` applies ``fn`` (elementwise) in the feed-forward block."""
    ACTIVATION_FUNCTIONS[name] = fn


def register_position_encoding(name: str):
    """Class decorator: ``positional_encoding: name`` uses this :class:`PositionalEncoding`."""

    def deco(cls):
        POSITION_ENCODINGS[name] = cls
        return cls

    return deco


def component(registry: dict, kind: str, name: str):
    """``registry[name]``.

    Raises:
        ValueError: no component ``name`` (the message lists the registered ones).
    """
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"{kind} must be one of {sorted(registry)}, got {name!r}") from None


# ---------------------------------------------------------------------------------------------
# norms and positions
# ---------------------------------------------------------------------------------------------
@register_norm("rmsnorm")
class LlmlabRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): ``w * x / sqrt(mean(x^2) + eps)``, computed in fp32.

    Shapes: x [..., D] -> [..., D]. Numerically identical to Llama's RMSNorm.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same formula in one fused kernel (aten::_fused_rms_norm) instead of five passes
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


@register_norm("layernorm")
class LlmlabLayerNorm(nn.LayerNorm):
    """LayerNorm (Ba et al. 2016) with a bias: ``w * (x - mean) / sqrt(var + eps) + b``.

    Shapes: x [..., D] -> [..., D] (torch's ``nn.LayerNorm``; the same state-dict names)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)


def make_norm(config: LlmlabConfig) -> nn.Module:
    """The block norm named by ``config.norm_type`` (:data:`NORMS`)."""
    return component(NORMS, "norm_type", config.norm_type)(config.d_model, eps=config.norm_eps)


class PositionalEncoding:
    """How token positions enter the model. A subclass says which of the three ways it uses:
    added to the embeddings (:meth:`embed`), a rotation of q and k (``rotary``: the model builds
    :class:`LlmlabRotaryEmbedding`, which reads ``rope_theta`` / ``rope_scaling``), or linear
    attention biases (``alibi``: per-head slopes reach the attention mask)."""

    rotary: bool = False
    alibi: bool = False

    def embed(self, hidden: torch.Tensor, position_ids: torch.Tensor, config: LlmlabConfig) -> torch.Tensor:
        """``hidden`` [B, T, D] with the positions ``position_ids`` [B, T] added (default: as it is)."""
        return hidden


@register_position_encoding("sinusoidal")
class SinusoidalPositions(PositionalEncoding):
    """Fixed sinusoids added to the embeddings (Vaswani et al. 2017)."""

    def embed(self, hidden, position_ids, config):
        return hidden + sinusoidal_embedding(position_ids, config.d_model, hidden.dtype)


@register_position_encoding("rope")
class RotaryPositions(PositionalEncoding):
    """RoPE (Su et al. 2021)."""

    rotary = True


@register_position_encoding("yarn")
class YarnPositions(RotaryPositions):
    """RoPE with YaRN context extension (Peng et al. 2023; :func:`rope_inv_freq`)."""


@register_position_encoding("alibi")
class AlibiPositions(PositionalEncoding):
    """ALiBi linear attention biases (Press et al. 2022)."""

    alibi = True


def rope_inv_freq(config: LlmlabConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of RoPE and the cos/sin scale.

    ``rope``: theta^(-2i/Dh) (Su et al. 2021), scale 1.
    ``yarn``: "NTK-by-parts" interpolation of Peng et al. 2023 ("YaRN: Efficient Context Window
    Extension of LLMs", eqs. 17-23 with alpha=1, beta=32): dimensions that rotate more than beta
    times over the original context keep their frequency, those rotating less than alpha times are
    divided by the factor s, a linear ramp in between; cos/sin are scaled by 0.1 ln(s) + 1.
    The correction range is floored/ceiled like the reference implementation and transformers.

    Returns:
        (inv_freq [Dh/2] fp32 on ``device`` (default: torch's current default device), attention scale float)
    """
    dim = config.head_dim
    base = config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    if config.positional_encoding != "yarn":
        return 1.0 / pos_freqs, 1.0
    factor = float(config.yarn_factor)
    original = float(config.yarn_original_max_seq_len)
    beta_fast, beta_slow = 32.0, 1.0

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, scale


class LlmlabRotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE / YaRN for given position ids (Llama's half-split layout).

    Shapes: position_ids [B, T] -> (cos, sin), each [B, T, Dh] in ``dtype``.
    """

    def __init__(self, config: LlmlabConfig):
        super().__init__()
        # computed on first use, not stored as a buffer: nothing to save, and nothing left
        # uninitialised when transformers builds the model on the meta device before loading
        self.config = config
        self._inv_freq: torch.Tensor | None = None
        self.scale = 1.0

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # traced: computed in the graph (a few ops on [Dh/2]) rather than cached on the module,
            # whose mutation would break the graph
            inv_freq, scale = rope_inv_freq(self.config, position_ids.device)
        else:
            if self._inv_freq is None or self._inv_freq.device != position_ids.device:
                self._inv_freq, self.scale = rope_inv_freq(self.config, position_ids.device)
            inv_freq, scale = self._inv_freq, self.scale
        freqs = position_ids[..., None].to(torch.float32) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] along the last dim (the RoPE rotation in half-split layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, Dh] by the angles of cos/sin [B, T, Dh] (Su et al. 2021)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def sinusoidal_embedding(position_ids: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal position embedding of Vaswani et al. 2017:
    PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(p / 10000^(2i/D)).

    Shapes: position_ids [B, T] -> [B, T, D].
    """
    half = dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, half, dtype=torch.float32, device=position_ids.device) * 2 / dim))
    ang = position_ids[..., None].to(torch.float32) * inv
    pe = torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-2)
    if dim % 2:
        pe = F.pad(pe, (0, 1))
    return pe.to(dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n) ...
    for n a power of two; otherwise the slopes of the nearest lower power of two followed by every
    other slope of the next power of two (the paper's reference recipe). Returns [H] fp32."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, S, Dh] -> [B, H_kv * n_rep, S, Dh], each K/V head repeated for its query group."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


# ---------------------------------------------------------------------------------------------
# attention masks
# ---------------------------------------------------------------------------------------------
class AttentionMaskSpec:
    """What every layer's attention may see, built once per forward and shared by the layers.

    Rules (indices are positions in the token sequence, cache included; not position ids):
      * causal: query i sees key j <= i;
      * sliding window w: also j > i - w (i.e. keys i-w+1 .. i);
      * padding: keys with ``attention_mask == 0`` are never seen;
      * packing: with explicit ``position_ids`` and no cache, a restart of the position ids
        (p[t] != p[t-1] + 1) starts a new document and queries only see keys of their document;
      * ALiBi: adds ``-slope_h * (i - j)`` to the scores.

    Key layouts: with no cache or a dynamic cache the keys a layer attends to are a contiguous
    suffix of the sequence (a DynamicCache keeps everything, a sliding-window cache layer the last
    w-1 tokens), so a key block of length S covers positions ``total - S .. total - 1``
    ("suffix"). A static cache (``cache_implementation="static"``, for torch.compile) returns its
    whole pre-allocated buffer: S slots holding positions ``0 .. S-1``, the ones at or after
    ``total`` still empty ("prefix"; causality hides them).

    Args:
        attention_mask: [B, past + T] (1 = token, 0 = padding) or None.
        past_len: number of tokens already in the cache.
        q_len: T.
        doc_ids: [B, T] document index per token (packing) or None.
        sliding_window: w or None.
        slopes: ALiBi slopes [H] or None.
    """

    def __init__(self, attention_mask, past_len, q_len, doc_ids, sliding_window, slopes, device):
        self.attention_mask = attention_mask
        self.past_len = past_len
        self.q_len = q_len
        self.total = past_len + q_len
        self.doc_ids = doc_ids
        self.sliding_window = sliding_window
        self.slopes = slopes
        self.device = device
        self._cache: dict = {}

    def varlen_seqlens(self) -> tuple[torch.Tensor, int]:
        """The documents of the packed batch laid end to end, as ``flash_attn_varlen_func`` takes
        them: ``cu_seqlens`` (int32 [N + 1], the offsets of the N documents in the flattened
        [B * T] tokens; a row boundary always ends a document) and ``max_seqlen`` (the longest
        document's length). Built once per forward and shared by the layers; needs ``doc_ids``
        (packing) and no padding mask or cache. Costs one device-to-host copy (the number of
        documents and the longest one), as transformers' own varlen path does.
        """
        key = ("varlen",)
        if key not in self._cache:
            b, t = self.doc_ids.shape
            # documents numbered apart across rows, so a row boundary always starts a new one
            flat = (self.doc_ids + torch.arange(b, device=self.doc_ids.device)[:, None] * (t + 1)).reshape(-1)
            starts = torch.ones_like(flat, dtype=torch.bool)
            starts[1:] = flat[1:] != flat[:-1]
            offsets = torch.nonzero(starts).flatten()
            cu = F.pad(offsets, (0, 1), value=b * t).to(torch.int32)
            self._cache[key] = (cu, int(torch.diff(cu).max()))
        return self._cache[key]

    @property
    def is_plain(self) -> bool:
        """No padding and no packing: causal (+ window, + alibi) only; flash-attn can do it."""
        return self.attention_mask is None and self.doc_ids is None

    def _indices(self, kv_len: int, prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
        q_idx = torch.arange(self.past_len, self.total, device=self.device)[:, None]
        start = 0 if prefix else self.total - kv_len
        k_idx = torch.arange(start, start + kv_len, device=self.device)[None, :]
        return q_idx, k_idx

    def allowed(self, kv_len: int, prefix: bool = False) -> torch.Tensor:
        """Boolean [B or 1, 1, T, S]: True where query t may attend key s."""
        key = ("allowed", kv_len, prefix)
        if key in self._cache:
            return self._cache[key]
        q_idx, k_idx = self._indices(kv_len, prefix)
        allowed = k_idx <= q_idx
        if self.sliding_window is not None:
            allowed = allowed & (k_idx > q_idx - self.sliding_window)
        allowed = allowed[None, None]  # [1, 1, T, S]
        if self.attention_mask is not None:
            if prefix:  # slots past the sequence are empty (and already hidden by causality)
                pad = F.pad(self.attention_mask, (0, max(kv_len - self.total, 0)))[:, :kv_len].bool()
            else:
                pad = self.attention_mask[:, self.total - kv_len:].bool()  # [B, S]
            allowed = allowed & pad[:, None, None, :]
        if self.doc_ids is not None:  # only without past tokens: keys 0 .. T-1 (+ empty static slots)
            key_docs = F.pad(self.doc_ids, (0, max(kv_len - self.q_len, 0)), value=-1)[:, :kv_len]
            same = self.doc_ids[:, :, None] == key_docs[:, None, :]
            allowed = allowed & same[:, None]
        # rows that see nothing (queries at padding positions) would give NaN; let them see
        # everything instead: their outputs are ignored and never reach a real token
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        self._cache[key] = allowed
        return allowed

    def alibi_bias(self, kv_len: int, dtype: torch.dtype, prefix: bool = False) -> torch.Tensor:
        """ALiBi bias [1, H, T, S]: -slope_h * (i - j)."""
        q_idx, k_idx = self._indices(kv_len, prefix)
        dist = (q_idx - k_idx).to(torch.float32)
        return (-self.slopes.to(self.device)[:, None, None] * dist[None]).unsqueeze(0).to(dtype)

    def sdpa_mask(self, kv_len: int, dtype: torch.dtype, prefix: bool = False) -> torch.Tensor | None:
        """The ``attn_mask`` for scaled_dot_product_attention: bool [B|1, 1, T, S], or an additive
        float mask [B|1, H, T, S] with ALiBi; ``None`` when plain causal attention over all keys
        with T == S (then ``is_causal=True`` is used) — see :meth:`use_is_causal`."""
        key = ("sdpa", kv_len, dtype, prefix)
        if key in self._cache:
            return self._cache[key]
        allowed = self.allowed(kv_len, prefix)
        if self.slopes is None:
            mask = allowed
        else:
            bias = self.alibi_bias(kv_len, torch.float32, prefix)
            mask = bias.masked_fill(~allowed, float("-inf")).to(dtype)
        self._cache[key] = mask
        return mask

    def use_is_causal(self, kv_len: int) -> bool:
        """True when plain causal attention over all keys is exactly what is needed."""
        return (
            self.is_plain
            and self.slopes is None
            and kv_len == self.q_len
            and (self.sliding_window is None or self.sliding_window >= kv_len)
        )

    def sees_everything(self, kv_len: int) -> bool:
        """True when every query sees every key (one new token, no padding, window not binding)."""
        return (
            self.is_plain
            and self.slopes is None
            and self.q_len == 1
            and (self.sliding_window is None or self.sliding_window >= kv_len)
        )


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------
class LlmlabAttention(nn.Module):
    """Multi-head self-attention with mha / mqa / gqa key-value heads, RoPE/YaRN, ALiBi, a sliding
    window, a KV cache, and three backends (flash-attn, torch SDPA, eager).

    Shapes: hidden [B, T, D] -> [B, T, D]. q_proj: D -> H*Dh; k_proj, v_proj: D -> H_kv*Dh;
    o_proj: H*Dh -> D.
    """

    def __init__(self, config: LlmlabConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.dropout
        d, hd = config.d_model, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=config.attention_bias)
        self.o_proj._llmlab_residual = True

    def forward(
        self,
        hidden: torch.Tensor,
        mask: AttentionMaskSpec,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        b, t, _ = hidden.shape
        q = self.q_proj(hidden).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        prefix = False
        if past_key_values is not None:
            layers = getattr(past_key_values, "layers", None)
            layer = layers[self.layer_idx] if layers is not None and self.layer_idx < len(layers) else None
            if getattr(layer, "is_compileable", False):
                if getattr(layer, "is_sliding", False):
                    raise NotImplementedError(
                        "a static sliding-window cache is not supported; use the default dynamic cache"
                    )
                prefix = True
            k, v = past_key_values.update(k, v, self.layer_idx)
        kv_len = k.shape[-2]
        p = self.dropout if self.training else 0.0

        backend = self._backend(q, mask, prefix)
        if backend == "flash":
            out = self._flash(q, k, v, mask, p)
        elif backend == "flash_varlen":
            out = self._flash_varlen(q, k, v, mask, p)
        elif backend == "eager":
            out = self._eager(q, k, v, mask, kv_len, p, prefix)
        else:
            # GQA/MQA: SDPA shares each K/V head across its query group without materialising copies
            gqa = {"enable_gqa": True} if self.n_rep > 1 else {}
            if not prefix and mask.use_is_causal(kv_len):
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.scaling, **gqa)
            elif not prefix and mask.sees_everything(kv_len):
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scaling, **gqa)
            else:
                attn_mask = mask.sdpa_mask(kv_len, q.dtype, prefix)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=self.scaling,
                                                     **gqa)
            out = out.transpose(1, 2)
        out = out.reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out)

    def _backend(self, q: torch.Tensor, mask: AttentionMaskSpec, prefix: bool) -> str:
        """``flash`` (plain causal), ``flash_varlen`` (packed documents, no padding), ``sdpa`` or
        ``eager``: the config's ``attn_backend``, where ``auto`` takes flash-attn when it is
        installed and the tensors suit it (CUDA, fp16/bf16)."""
        choice = self.config.attn_backend
        kernel_ok = q.device.type in FLASH_DEVICES and q.dtype in (torch.float16, torch.bfloat16) and not prefix
        if (kernel_ok and _flash_attn_varlen_func is not None and choice in ("auto", "flash")
                and mask.doc_ids is not None and mask.attention_mask is None):
            return "flash_varlen"
        flash_ok = kernel_ok and _flash_attn_func is not None and mask.is_plain
        if choice == "flash":
            if not flash_ok:
                raise RuntimeError(
                    "attn_backend 'flash' needs flash-attn installed, a CUDA tensor in fp16/bf16, no "
                    "padding mask (packed documents go through flash_attn_varlen_func), and a dynamic cache"
                )
            return "flash"
        if choice == "auto":
            return "flash" if flash_ok else "sdpa"
        return choice

    def _flash(self, q, k, v, mask: AttentionMaskSpec, p: float) -> torch.Tensor:  # pragma: no cover - GPU
        # flash-attn wants [B, T, heads, Dh]; it handles H_kv < H, bottom-right aligned causality
        # (right for a cache), the window (w-1 keys to the left) and ALiBi slopes natively.
        window = (mask.sliding_window - 1, 0) if mask.sliding_window is not None else (-1, -1)
        slopes = mask.slopes.to(q.device, torch.float32) if mask.slopes is not None else None
        return _flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p,
            softmax_scale=self.scaling, causal=True, window_size=window, alibi_slopes=slopes,
        )

    def _flash_varlen(self, q, k, v, mask: AttentionMaskSpec, p: float) -> torch.Tensor:
        """Packed documents through ``flash_attn_varlen_func``: q [B, H, T, Dh], k and v
        [B, H_kv, T, Dh] -> [B, T, H, Dh], attention inside each document of
        :meth:`AttentionMaskSpec.varlen_seqlens` (causal, window and ALiBi as in :meth:`_flash`)."""
        b, h, t, d = q.shape
        cu, max_len = mask.varlen_seqlens()
        window = (mask.sliding_window - 1, 0) if mask.sliding_window is not None else (-1, -1)
        slopes = mask.slopes.to(q.device, torch.float32) if mask.slopes is not None else None

        def flat(x):  # [B, heads, T, Dh] -> [B * T, heads, Dh]
            return x.transpose(1, 2).reshape(b * t, x.shape[1], d)

        out = _flash_attn_varlen_func(
            flat(q), flat(k), flat(v), cu, cu, max_len, max_len, dropout_p=p, softmax_scale=self.scaling,
            causal=True, window_size=window, alibi_slopes=slopes,
        )
        return out.reshape(b, t, h, d)

    def _eager(self, q, k, v, mask: AttentionMaskSpec, kv_len: int, p: float, prefix: bool = False) -> torch.Tensor:
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.float32) * self.scaling  # [B, H, T, S]
        if mask.slopes is not None:
            scores = scores + mask.alibi_bias(kv_len, torch.float32, prefix)
        scores = scores.masked_fill(~mask.allowed(kv_len, prefix), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        probs = F.dropout(probs, p=p, training=self.training)
        return torch.matmul(probs, v).transpose(1, 2)


register_activation("relu", F.relu)
register_activation("gelu", F.gelu)
register_activation("leaky_relu", F.leaky_relu)  # negative slope 0.01
register_activation("silu", F.silu)
register_activation("swiglu", F.silu)  # the gate's activation (config.is_gated)


class LlmlabMLP(nn.Module):
    """Feed-forward block. swiglu (Shazeer 2020): down(silu(gate(x)) * up(x)); otherwise
    down(act(up(x))).

    Shapes: x [..., D] -> [..., D]; gate_proj, up_proj: D -> F; down_proj: F -> D.
    """

    def __init__(self, config: LlmlabConfig):
        super().__init__()
        d, f, bias = config.d_model, config.d_ff, config.mlp_bias
        self.gated = config.is_gated
        if self.gated:
            self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.down_proj._llmlab_residual = True
        self.act = component(ACTIVATION_FUNCTIONS, "activation", config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class LlmlabSparseMoE(nn.Module):
    """Sparse mixture-of-experts feed-forward (Mixtral, Jiang et al. 2024): a linear router picks
    the top-k of E experts per token; their outputs are mixed with the softmax router
    probabilities renormalised over the chosen k.

    Load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4, generalised to top-k):
    ``aux = E * sum_e f_e * P_e`` with f_e the fraction of (token, slot) assignments that go to
    expert e and P_e the mean router probability of expert e, over non-padding tokens. It is 1 when
    routing is uniform.

    Shapes: x [B, T, D] -> ([B, T, D], aux scalar). router: D -> E; experts.N: :class:`LlmlabMLP`.
    """

    def __init__(self, config: LlmlabConfig):
        super().__init__()
        self.n_experts = config.n_experts
        self.top_k = config.experts_per_token
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList([LlmlabMLP(config) for _ in range(config.n_experts)])

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        logits = self.router(flat)  # [N, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [N, k]
        top_p = (top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            y = expert(flat[rows]) * top_p[rows, slot, None]
            out.index_add_(0, rows, y)
        # load-balancing loss over real tokens
        one_hot = F.one_hot(top_i, self.n_experts).to(torch.float32).sum(dim=1)  # [N, E]
        if token_mask is not None:
            w = token_mask.reshape(-1).to(torch.float32)[:, None]
            n = w.sum().clamp(min=1.0)
            f = (one_hot * w).sum(0) / (n * self.top_k)
            pm = (probs * w).sum(0) / n
        else:
            f = one_hot.mean(0) / self.top_k
            pm = probs.mean(0)
        aux = self.n_experts * (f * pm).sum()
        return out.view(b, t, d), aux


class LlmlabDecoderLayer(nn.Module):
    """Pre-norm block: h = x + drop(attn(norm1(x))); y = h + drop(ffn(norm2(h))).

    Shapes: [B, T, D] -> ([B, T, D], aux scalar or None).
    """

    def __init__(self, config: LlmlabConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlmlabAttention(config, layer_idx)
        self.mlp = LlmlabSparseMoE(config) if config.is_moe else LlmlabMLP(config)
        self.input_layernorm = make_norm(config)
        self.post_attention_layernorm = make_norm(config)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.is_moe = config.is_moe

    def forward(self, hidden, mask, rope, past_key_values, token_mask):
        h = hidden + self.resid_dropout(self.self_attn(self.input_layernorm(hidden), mask, rope, past_key_values))
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            y, aux = self.mlp(x, token_mask)
        else:
            y, aux = self.mlp(x), None
        return h + self.resid_dropout(y), aux


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
class LlmlabPreTrainedModel(PreTrainedModel):
    """Base class: config class, weight init, and save_pretrained with the modeling code."""

    config_class = LlmlabConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlmlabDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, init_std) for linear and embedding weights, zeros for biases, ones for norm
        weights; residual output projections (o_proj, down_proj) use init_std / sqrt(2 * n_layers)
        (GPT-2, Radford et al. 2019) so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            s = std / math.sqrt(2 * self.config.n_layers) if getattr(module, "_llmlab_residual", False) else std
            _init.normal_(module.weight, mean=0.0, std=s)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (LlmlabRMSNorm, nn.LayerNorm)):
            if module.weight is not None:
                _init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                _init.zeros_(module.bias)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save config.json (with an ``auto_map``), the weights (safetensors) and copies of
        ``configuration_llmlab.py`` / ``modeling_llmlab.py``, so that
        ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without llmlab."""
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            here = os.path.dirname(os.path.abspath(__file__))
            for name in ("configuration_llmlab.py", "modeling_llmlab.py"):
                src = os.path.join(here, name)
                dst = os.path.join(str(save_directory), name)
                if os.path.abspath(src) != os.path.abspath(dst):
                    shutil.copyfile(src, dst)
        return result


class LlmlabModel(LlmlabPreTrainedModel):
    """The decoder stack without a head.

    forward(input_ids [B, T] | inputs_embeds [B, T, D], attention_mask [B, past+T],
    position_ids [B, T], cache Cache (also accepted as ``past_key_values``), cache_position [T])
    -> :class:`LlmlabModelOutputWithPast` with last_hidden_state [B, T, D] and the cache under
    :data:`CACHE_FIELD`.

    KV-cache contract (the one transformers' Llama follows): the number of tokens already cached
    is ``cache_position[0]`` when ``generate`` passes it, else ``cache.get_seq_length()``; the
    model never assumes how ``generate`` builds or names its cache.

    Position ids: given ones are used as they are; where they do not step by one (packed
    pretraining restarts them per document) a new document starts and attention stays inside each
    document (without a cache). Otherwise they come from the padding mask (cumsum - 1, like
    ``generate``), or count on from the cache length.
    """

    def __init__(self, config: LlmlabConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([LlmlabDecoderLayer(config, i) for i in range(config.n_layers)])
        self.norm = make_norm(config)
        self.positions = component(POSITION_ENCODINGS, "positional_encoding", config.positional_encoding)()
        if self.positions.rotary:
            self.rotary_emb = LlmlabRotaryEmbedding(config)
        self._alibi_slopes: torch.Tensor | None = None  # computed on first use (see LlmlabRotaryEmbedding)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def _slopes(self, device: torch.device) -> torch.Tensor:
        if self._alibi_slopes is None or self._alibi_slopes.device != device:
            with torch.device(device):
                self._alibi_slopes = alibi_slopes(self.config.n_heads).to(device)
        return self._alibi_slopes

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ):
        past_key_values = _cache_arg(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, t, _ = inputs_embeds.shape
        device = inputs_embeds.device
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if past_key_values is None:
            past_len = 0
        elif cache_position is not None and cache_position.numel() > 0:
            past_len = int(cache_position.reshape(-1)[0])  # the slot of the first new token
        else:
            past_len = int(past_key_values.get_seq_length())

        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask must be 2-D [batch, past + seq] (1 = token, 0 = padding)")
            if attention_mask.shape[1] != past_len + t:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} tokens, expected past ({past_len}) + new ({t})"
                )
            if bool(attention_mask.all()):
                attention_mask = None

        explicit_positions = position_ids is not None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            else:
                position_ids = torch.arange(past_len, past_len + t, device=device)[None].expand(b, t)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(b, t)

        doc_ids = None
        if explicit_positions and past_len == 0 and t > 1:
            # a restart of the position ids starts a new document. Built without asking the device
            # whether any restart exists (no host sync): a row without one is a single document,
            # whose mask is the causal mask
            step = torch.diff(position_ids, dim=-1) != 1
            doc_ids = F.pad(step.long().cumsum(-1), (1, 0))

        mask = AttentionMaskSpec(
            attention_mask=attention_mask,
            past_len=past_len,
            q_len=t,
            doc_ids=doc_ids,
            sliding_window=self.config.sliding_window,
            slopes=self._slopes(device) if self.positions.alibi else None,
            device=device,
        )
        token_mask = attention_mask[:, past_len:] if attention_mask is not None else None

        hidden = inputs_embeds
        hidden = self.positions.embed(hidden, position_ids, self.config)
        rope = self.rotary_emb(position_ids, hidden.dtype) if hasattr(self, "rotary_emb") else None
        hidden = self.embed_dropout(hidden)

        all_hidden = [] if output_hidden_states else None
        aux_total = None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden)
            if self.gradient_checkpointing and self.training:
                hidden, aux = self._gradient_checkpointing_func(
                    layer.__call__, hidden, mask, rope, past_key_values, token_mask
                )
            else:
                hidden, aux = layer(hidden, mask, rope, past_key_values, token_mask)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        if aux_total is not None:
            aux_total = aux_total / len(self.layers)

        return _with_cache(
            LlmlabModelOutputWithPast,
            past_key_values if use_cache else None,
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            aux_loss=aux_total,
        )


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean (or summed / ``denominator``) cross entropy of logits [N, V] (any float dtype, computed
    in fp32) against targets [N] (-100 = ignored), equal to ``F.cross_entropy`` but in row chunks
    that stay in the CPU's cache: the forward keeps only each row's log-sum-exp [N] (no [N, V]
    log-softmax, no fp32 copy of bf16 logits), the backward writes softmax - one-hot straight into
    the gradient. On this CPU, fwd + bwd of [2048, 4096]: 40-50 ms instead of 70-75 ms
    (benchmarks/vs_litgpt.py, docs/performance.md).
    """

    CHUNK = 64  # rows per chunk: 64 x V fp32 values (1 MiB at V = 4096) fit in L2

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, denominator) -> torch.Tensor:
        valid = targets != -100
        safe = targets.clamp(min=0)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], ChunkedCrossEntropy.CHUNK):
            lse[s:s + ChunkedCrossEntropy.CHUNK] = torch.logsumexp(logits[s:s + ChunkedCrossEntropy.CHUNK].float(), -1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        denom = valid.sum() if denominator is None else torch.as_tensor(denominator, device=logits.device)
        loss = torch.where(valid, lse - picked, 0.0).sum() / denom
        ctx.save_for_backward(logits, lse, safe, valid, denom)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, lse, safe, valid, denom = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = valid.float() * (grad_out.float() / denom)
        c = ChunkedCrossEntropy.CHUNK
        for s in range(0, logits.shape[0], c):
            g = (logits[s:s + c].float() - lse[s:s + c, None]).exp_()
            g.scatter_add_(1, safe[s:s + c, None], torch.full((g.shape[0], 1), -1.0, device=g.device))
            grad[s:s + c] = g.mul_(scale[s:s + c, None])
        return grad, None, None


@torch.compiler.disable
def _chunked_cross_entropy(flat: torch.Tensor, targets: torch.Tensor, denominator) -> torch.Tensor:
    """:class:`ChunkedCrossEntropy` of logits [N, V] and targets [N], run eagerly under torch.compile."""
    return ChunkedCrossEntropy.apply(flat, targets, denominator)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                   chunked: bool = True) -> torch.Tensor:
    """Next-token cross entropy: logits[:, t] predicts labels[:, t + 1]; labels == -100 ignored.

    Shapes: logits [B, T, V], labels [B, T] -> scalar (mean over counted tokens, or sum /
    ``num_items_in_batch`` when given, for exact gradient accumulation). On a CPU through
    :class:`ChunkedCrossEntropy` (the same value, less memory traffic) unless ``chunked`` is False
    (its backward has no second derivative: Sophia's Hessian needs one); elsewhere
    ``F.cross_entropy``. Under torch.compile the chunked loss runs eagerly after the compiled
    graph (one graph break at the loss): it is faster than the graph's fused log-softmax on a CPU.
    """
    # shift the labels, not the logits: no [B, T-1, V] copy of the largest activation
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1).to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1])
    if chunked and flat.device.type == "cpu" and flat.requires_grad and torch.is_grad_enabled():
        return _chunked_cross_entropy(flat, shift_labels, num_items_in_batch)
    flat_logits = flat.float()
    if num_items_in_batch is not None:
        loss = F.cross_entropy(flat_logits, shift_labels, ignore_index=-100, reduction="sum")
        return loss / num_items_in_batch
    return F.cross_entropy(flat_logits, shift_labels, ignore_index=-100)


if _TRANSFORMERS_MAJOR >= 5:
    _TIED = {"lm_head.weight": "model.embed_tokens.weight"}
else:  # pragma: no cover
    _TIED = ["lm_head.weight"]


class LlmlabForCausalLM(LlmlabPreTrainedModel, GenerationMixin):
    """Causal language model: :class:`LlmlabModel` + ``lm_head`` (D -> V, tied to the embedding
    when ``config.tie_word_embeddings``).

    forward(input_ids [B, T], attention_mask [B, past+T], position_ids [B, T], cache (or
    past_key_values), cache_position [T],
    inputs_embeds [B, T, D], labels [B, T] (-100 = ignore), use_cache, return_dict,
    logits_to_keep) -> :class:`LlmlabCausalLMOutputWithPast` (a CausalLMOutputWithPast) with
    logits [B, T, V] and loss = shifted cross entropy + router_aux_loss_coef * aux_loss (MoE).
    """

    _tied_weights_keys = _TIED

    def __init__(self, config: LlmlabConfig):
        super().__init__(config)
        self.model = LlmlabModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """``generate`` with a static cache asks models for a 4-D mask; ours builds its masks itself
        from the 2-D padding mask, so that is passed through unchanged."""
        return attention_mask

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch=None,
        cache: Cache | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ):
        if labels is not None and use_cache is None:
            use_cache = False  # a loss computation needs no cache
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_cache_arg(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None:
            # eager attention is what Sophia's double backward switches to (llmlab.train.setup)
            loss = causal_lm_loss(logits, labels, num_items_in_batch, chunked=self.config.attn_backend != "eager")
            if out.aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * out.aux_loss.to(loss.device)

        result = _with_cache(
            LlmlabCausalLMOutputWithPast,
            getattr(out, CACHE_FIELD),
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            aux_loss=out.aux_loss,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return result if return_dict else result.to_tuple()


class LlmlabForSequenceClassification(LlmlabPreTrainedModel):
    """Sequence scorer (reward model when ``num_labels == 1``): :class:`LlmlabModel` + ``score``
    (D -> num_labels) read at the last real token of each row — the last position with
    ``attention_mask == 1`` when a mask is given, else the last token that is not ``pad_token_id``.

    forward(input_ids [B, T], attention_mask [B, T], ..., labels [B] | [B, num_labels]) ->
    SequenceClassifierOutputWithPast with logits [B, num_labels]; loss: MSE for num_labels == 1,
    cross entropy otherwise.

    Padding-free batches: with several sequences in one row (``position_ids`` restarting at each,
    so attention stays inside each sequence), ``pool_positions`` [R] gives the flat index into the
    B·T positions of each sequence's last token; logits are then [R, num_labels].
    """

    def __init__(self, config: LlmlabConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlmlabModel(config)
        self.score = nn.Linear(config.d_model, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        pool_positions: torch.LongTensor | None = None,
        cache: Cache | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_cache_arg(cache, past_key_values),
            cache_position=cache_position,
            inputs_embeds=inputs_embeds,
            use_cache=False if use_cache is None else use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state  # [B, T, D]
        b, t = hidden.shape[:2]
        if pool_positions is not None:
            pooled = hidden.reshape(b * t, -1)[pool_positions.to(hidden.device)]
        else:
            idx = torch.arange(t, device=hidden.device)
            if attention_mask is not None:
                real = attention_mask[:, -t:].to(hidden.device).bool()
            elif input_ids is not None and self.config.pad_token_id is not None:
                real = (input_ids != self.config.pad_token_id).to(hidden.device)
            else:
                real = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
            last = torch.where(real, idx, torch.full_like(idx, -1)).max(dim=-1).values.clamp(min=0)
            pooled = hidden[torch.arange(b, device=hidden.device), last]
        logits = self.score(pooled)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
            else:
                loss = F.cross_entropy(logits.float(), labels.view(-1))
        result = _with_cache(
            SequenceClassifierOutputWithPast, getattr(out, CACHE_FIELD),
            loss=loss, logits=logits, hidden_states=out.hidden_states,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return result if return_dict else result.to_tuple()


def register_auto_classes() -> None:
    """Register LlmlabConfig / models with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoConfig.register("llmlab", LlmlabConfig, exist_ok=True)
    AutoModel.register(LlmlabConfig, LlmlabModel, exist_ok=True)
    AutoModelForCausalLM.register(LlmlabConfig, LlmlabForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(LlmlabConfig, LlmlabForSequenceClassification, exist_ok=True)


# Imported as part of llmlab (not as remote code copied next to a checkpoint): register.
if __name__.startswith("llmlab."):
    register_auto_classes()


__all__ = [
    "LlmlabForCausalLM",
    "LlmlabForSequenceClassification",
    "LlmlabModel",
    "LlmlabPreTrainedModel",
    "register_auto_classes",
]
