"""Typed, frozen views of recipe sections that several packages read (the model, LoRA, filters,
the tokenizer), and the one way a section becomes one (:func:`from_section`). Pure Python; imports only
:mod:`llmlab.schemafile`, so llmlab.models and llmlab.data may use it without reaching the recipe
package.

No field has a default of its own: values come from a section that
:func:`llmlab.schemafile.fill_defaults` filled from the schema (a resolved recipe, or
:func:`typed_section` for a bare one); a field is None only where the schema's default is null or
there is none (tests/test_runplan.py checks each class against its schema section).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from llmlab.schemafile import schema_filled


def _key(f: dataclasses.Field) -> str:
    """The recipe key a field holds (its name, unless ``metadata["key"]`` renames it)."""
    return f.metadata.get("key", f.name)


def _frozen(value):
    """Lists as tuples (a frozen dataclass's fields should not change under it)."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return copy.deepcopy(value)


def from_section(cls, section: dict | None, **given):
    """An instance of dataclass ``cls`` from a resolved recipe section: each field takes the value
    of its key (:func:`_key`); ``given`` fields are passed as they are. A key the section lacks
    takes the field's default, which is None (the schema's default is null) or there is none.
    Fields marked ``metadata={"derived": True}`` hold no recipe key (a layout, a group of keys, the
    raw section) and are passed in ``given``.

    Raises:
        KeyError: a field without a default whose key the section lacks (the recipe was not
            resolved, or the schema and the class disagree).
    """
    section = section or {}
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given or not f.init:
            continue
        key = _key(f)
        if key in section:
            kw[f.name] = _frozen(section[key])
        elif f.default is dataclasses.MISSING:
            raise KeyError(f"{cls.__name__}: the resolved section has no {key!r}: {sorted(section)}")
    return cls(**kw, **given)


def typed_section(cls, section: dict | None, **given):
    """:func:`from_section` of ``section`` filled with the schema's defaults at ``cls.SCHEMA``
    (keys given as None take their default): for code that is also handed a bare section."""
    bare = {k: v for k, v in (section or {}).items() if v is not None}
    return from_section(cls, schema_filled(cls.SCHEMA, bare), **given)


@dataclass(frozen=True)
class TransformerSpec:
    """``model:`` with ``arch: transformer`` (``$defs/model_transformer``): llmlab's decoder-only
    Transformer with choosable components (:mod:`llmlab.models.modeling_llmlab`)."""

    SCHEMA: ClassVar[str] = "#/$defs/model_transformer"
    ELSEWHERE: ClassVar[tuple[str, ...]] = ("from_pretrained",)  # not allowed with arch

    arch: str
    """``transformer``."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass (less memory, ~30 % more compute)."""
    d_model: int
    """Hidden size."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Query heads."""
    max_seq_len: int
    """Longest sequence (positions) the model handles."""
    positional_encoding: str
    """sinusoidal | rope | alibi | yarn | none ..."""
    rope_theta: float
    """RoPE base frequency θ."""
    norm_type: str
    """layernorm | rmsnorm."""
    norm_eps: float
    """ε of the norms."""
    attention_bias: bool
    """Biases in the q/k/v/o projections."""
    mlp_bias: bool
    """Biases in the feed-forward projections."""
    activation: str
    """relu | gelu | leaky_relu | silu | swiglu ..."""
    dropout: float
    """Dropout probability (residual and attention)."""
    tie_embeddings: bool
    """Share the input embedding and the LM head."""
    init_std: float
    """Standard deviation of the normal weight init."""
    experts_per_token: int
    """Mixture of experts: experts each token is routed to."""
    router_aux_loss_coef: float
    """Mixture of experts: weight of the load-balancing loss."""
    n_kv_heads: int | None = None
    """Key/value heads (resolution fills n_heads; 1 = MQA; between: GQA). None only in a bare section."""
    d_ff: int | None = None
    """Feed-forward inner size (resolution fills 64·⌈8·d_model/3/64⌉ for swiglu, else 4·d_model;
    :func:`llmlab.models.params.default_d_ff`). None only in a bare section."""
    attention_type: str | None = None
    """mha | mqa | gqa (resolution fills it from n_heads / n_kv_heads). None only in a bare section."""
    rope_scaling: dict | None = None
    """RoPE scaling (yarn) parameters."""
    sliding_window: int | None = None
    """Attention window in tokens (None: full causal attention)."""
    n_experts: int | None = None
    """Mixture of experts: experts per layer (None: a dense feed-forward)."""


@dataclass(frozen=True)
class Mamba2Spec:
    """``model:`` with ``arch: mamba2`` (``$defs/model_mamba2``): transformers' Mamba2ForCausalLM
    (Dao & Gu 2024)."""

    SCHEMA: ClassVar[str] = "#/$defs/model_mamba2"
    ELSEWHERE: ClassVar[tuple[str, ...]] = ("from_pretrained",)

    arch: str
    """``mamba2``."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass."""
    d_model: int
    """Hidden size."""
    n_layers: int
    """Mamba2 blocks."""
    state_size: int
    """SSM state size N."""
    head_dim: int
    """Head dimension P."""
    expand: int
    """Inner size = expand · d_model."""
    conv_kernel: int
    """Width of the causal convolution."""
    n_groups: int
    """Groups of the B/C projections."""
    chunk_size: int
    """Chunk length of the SSD scan."""
    tie_embeddings: bool
    """Share the input embedding and the LM head."""
    max_seq_len: int
    """Longest sequence the stages use."""


@dataclass(frozen=True)
class PretrainedSpec:
    """``model:`` with ``from_pretrained`` (``$defs/model_pretrained``): an existing checkpoint."""

    SCHEMA: ClassVar[str] = "#/$defs/model_pretrained"
    ELSEWHERE: ClassVar[tuple[str, ...]] = ("arch",)  # not allowed with from_pretrained

    from_pretrained: str
    """A local directory (absolute), hub id or GGUF file."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass."""
    dtype: str
    """Weights' dtype when loading (auto: the checkpoint's)."""
    trust_remote_code: bool
    """Run the checkpoint's own modelling code (needs ``--allow-code``)."""
    revision: str | None = None
    """Hub revision."""


ModelSpec = Union[TransformerSpec, Mamba2Spec, PretrainedSpec]


def model_spec(section: dict) -> ModelSpec:
    """The typed ``model:`` section of a resolved recipe."""
    arch = section.get("arch")
    cls = {"transformer": TransformerSpec, "mamba2": Mamba2Spec}.get(arch, PretrainedSpec)
    return from_section(cls, section)


@dataclass(frozen=True)
class TokenizerTrainSpec:
    """``tokenizer.train``: a byte-level BPE tokenizer trained on the recipe's datasets."""

    SCHEMA: ClassVar[str] = "#/properties/tokenizer/properties/train"

    datasets: tuple[str, ...]
    """Datasets of this recipe whose text trains it."""
    vocab_size: int
    """Vocabulary size to reach (BPE may stop short of it)."""
    min_frequency: int
    """Minimum pair frequency of a merge."""
    max_documents: int | None = None
    """Documents read per dataset at most (None: all)."""


@dataclass(frozen=True)
class TokenizerSpec:
    """The ``tokenizer:`` section: exactly one of ``from_pretrained`` and ``train`` is set."""

    SCHEMA: ClassVar[str] = "#/properties/tokenizer"

    chat_template: str
    """The chat template: ``auto``, a named one (llmlab.chat_templates), ``none`` or Jinja."""
    special_tokens: tuple[str, ...]
    """Extra special tokens added to the vocabulary."""
    from_pretrained: str | None = None
    """A local directory (absolute), hub id or GGUF file."""
    revision: str | None = None
    """Hub revision of ``from_pretrained``."""
    train: TokenizerTrainSpec | None = None
    """Train one on the recipe's data."""


def tokenizer_spec(section: dict) -> TokenizerSpec:
    """The typed ``tokenizer:`` section (a bare one too: absent keys take the schema's defaults)."""
    train = section.get("train")
    return typed_section(TokenizerSpec, section, train=typed_section(TokenizerTrainSpec, train) if train else None)


@dataclass(frozen=True)
class FilterSpec:
    """A dataset's ``filters:`` (applied after normalisation, before the eval split)."""

    SCHEMA: ClassVar[str] = "#/$defs/dataset/properties/filters"

    dedup: str
    """none | exact | minhash."""
    minhash_threshold: float
    """Jaccard similarity above which minhash dedup drops a row."""
    min_length: int | None = None
    """Drop rows shorter than this many characters."""
    max_length: int | None = None
    """Drop rows longer than this many characters."""


@dataclass(frozen=True)
class LoraSpec:
    """A stage's ``lora:`` (``$defs/lora``): train low-rank adapters (Hu et al. 2021) with peft."""

    SCHEMA: ClassVar[str] = "#/$defs/lora"

    preset: str
    """Which modules get adapters (minimal, attention_only, ffn_only, all, custom)."""
    r: int
    """Rank."""
    alpha: float
    """Scale numerator: the update is (alpha / r)·BA."""
    dropout: float
    """Dropout on the adapter's input."""
    merge: bool
    """Merge the adapter into the weights when the stage ends (False: hand the adapter on)."""
    use_dora: bool
    """DoRA (Liu et al. 2024): a trainable magnitude per output feature (peft's ``use_dora``)."""
    use_rslora: bool
    """rsLoRA (Kalajdzievski 2023): scale alpha/sqrt(r) instead of alpha/r (peft's ``use_rslora``)."""
    target_modules: tuple[str, ...] | None = None
    """Module names (preset custom)."""
    quantize: str | None = None
    """Quantise the frozen base (QLoRA)."""



__all__ = ["FilterSpec", "LoraSpec", "Mamba2Spec", "ModelSpec", "PretrainedSpec", "TransformerSpec", "from_section",
           "model_spec", "typed_section"]
