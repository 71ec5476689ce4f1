"""Configuration of the llmlab Transformer (``model_type = "llmlab"``).

Self-contained: imports only ``transformers`` (this file is copied next to the weights by
``save_pretrained`` so that ``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` works on a
machine without llmlab installed).

Field names are the recipe's ``model:`` keys (``d_model``, ``n_layers``, ``n_heads`` ...). The
standard Hugging Face names (``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``,
``num_key_value_heads``, ``intermediate_size``, ``max_position_embeddings`` ...) are aliases through
:attr:`LlmlabConfig.attribute_map`, so generation utilities and PEFT read them as usual.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

POSITIONAL_ENCODINGS = ("sinusoidal", "rope", "alibi", "yarn")
NORM_TYPES = ("layernorm", "rmsnorm")
ATTENTION_TYPES = ("mha", "mqa", "gqa")
ACTIVATIONS = ("relu", "gelu", "leaky_relu", "silu", "swiglu")
ATTENTION_BACKENDS = ("auto", "sdpa", "eager", "flash")


def default_d_ff(d_model: int, activation: str) -> int:
    """The recipe's default feed-forward width.

    swiglu: 8/3 * d_model rounded up to a multiple of 64 (keeps the parameter count of a 4x FFN,
    Shazeer 2020, "GLU Variants Improve Transformer"); any other activation: 4 * d_model.
    """
    if activation == "swiglu":
        return int(math.ceil(8 * d_model / 3 / 64) * 64)
    return 4 * d_model


class LlmlabConfig(PretrainedConfig):
    r"""Every knob of the llmlab Transformer.

    Args:
        vocab_size: number of token ids V.
        d_model: residual stream width D.
        n_layers: number of decoder blocks L.
        n_heads: query heads H (head_dim = D / H).
        n_kv_heads: key/value heads H_kv (``None`` -> H for mha, 1 for mqa). H % H_kv == 0.
        d_ff: feed-forward width F (``None`` -> :func:`default_d_ff`).
        max_seq_len: longest sequence the model is meant for (size of nothing; RoPE/sinusoidal are
            computed on the fly, so longer inputs still run).
        positional_encoding: ``sinusoidal`` (added to the embeddings, Vaswani et al. 2017), ``rope``
            (Su et al. 2021), ``alibi`` (Press et al. 2022, no position embedding, a per-head linear
            distance bias) or ``yarn`` (RoPE with YaRN frequency scaling, Peng et al. 2023).
        rope_theta: RoPE base.
        rope_scaling: for yarn, ``{"factor": s, "original_max_seq_len": L0}`` (stored as
            ``yarn_factor`` / ``yarn_original_max_seq_len``; HF reserves the name ``rope_scaling``).
        norm_type: ``rmsnorm`` (Zhang & Sennrich 2019) or ``layernorm`` (with bias); pre-norm blocks.
        norm_eps: epsilon of the norms.
        attention_type: ``mha`` | ``mqa`` | ``gqa`` (``None`` -> gqa if H_kv < H else mha).
        sliding_window: w: token t attends to tokens t-w+1 .. t (``None``: unlimited).
        attention_bias: biases on q/k/v/o projections.
        mlp_bias: biases on the feed-forward projections.
        activation: relu | gelu | leaky_relu | silu (plain FFN: up -> act -> down) or swiglu
            (gated FFN: down(silu(gate(x)) * up(x))).
        dropout: dropout on embeddings, attention probabilities and both residual branches.
        tie_word_embeddings: share the input embedding with the output projection (recipe key
            ``tie_embeddings``, accepted as an alias).
        init_std: std of the normal initialisation; residual output projections (o_proj, down_proj)
            use init_std / sqrt(2 L) (GPT-2, Radford et al. 2019).
        n_experts: number of experts E of a Mixtral-style sparse MoE feed-forward (``None``: dense).
        experts_per_token: k experts per token (top-k routing).
        router_aux_loss_coef: weight of the load-balancing loss (Switch Transformer, Fedus et al.
            2021) added to the LM loss.
        attn_backend: ``auto`` (flash-attn on CUDA in fp16/bf16 when installed and no padding mask,
            else SDPA), ``sdpa``, ``eager`` (explicit softmax; the reference) or ``flash``.
    """

    model_type = "llmlab"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_seq_len",
        "initializer_range": "init_std",
        "num_local_experts": "n_experts",
        "num_experts_per_tok": "experts_per_token",
    }

    def __init__(
        self,
        vocab_size: int = 32000,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        d_ff: int | None = None,
        max_seq_len: int = 512,
        positional_encoding: str = "rope",
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        yarn_factor: float | None = None,
        yarn_original_max_seq_len: int | None = None,
        norm_type: str = "rmsnorm",
        norm_eps: float = 1e-5,
        attention_type: str | None = None,
        sliding_window: int | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        activation: str = "swiglu",
        dropout: float = 0.0,
        tie_word_embeddings: bool | None = None,
        tie_embeddings: bool | None = None,
        init_std: float = 0.02,
        n_experts: int | None = None,
        experts_per_token: int = 2,
        router_aux_loss_coef: float = 0.01,
        attn_backend: str = "auto",
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        head_dim: int | None = None,
        **kwargs,
    ):
        _check_choices(positional_encoding, norm_type, activation, attn_backend)
        attention_type, n_kv_heads = _resolve_heads(attention_type, d_model, n_heads, n_kv_heads, head_dim)
        if sliding_window is not None and int(sliding_window) < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        yarn_factor, yarn_original_max_seq_len = _resolve_yarn(
            positional_encoding, rope_scaling, yarn_factor, yarn_original_max_seq_len, max_seq_len)
        _check_experts(n_experts, experts_per_token)
        if tie_word_embeddings is None:
            tie_word_embeddings = True if tie_embeddings is None else bool(tie_embeddings)

        self.vocab_size = int(vocab_size)
        self.d_model = int(d_model)
        self.n_layers = int(n_layers)
        self.n_heads = int(n_heads)
        self.n_kv_heads = int(n_kv_heads)
        self.head_dim = self.d_model // self.n_heads
        self.d_ff = int(d_ff) if d_ff is not None else default_d_ff(self.d_model, activation)
        self.max_seq_len = int(max_seq_len)
        self.positional_encoding = positional_encoding
        self.rope_theta = float(rope_theta)
        self.yarn_factor = float(yarn_factor) if yarn_factor is not None else None
        self.yarn_original_max_seq_len = int(yarn_original_max_seq_len) if yarn_original_max_seq_len is not None else None
        self.norm_type = norm_type
        self.norm_eps = float(norm_eps)
        self.attention_type = attention_type
        self.sliding_window = int(sliding_window) if sliding_window is not None else None
        self.attention_bias = bool(attention_bias)
        self.mlp_bias = bool(mlp_bias)
        self.activation = activation
        self.dropout = float(dropout)
        self.init_std = float(init_std)
        self.n_experts = int(n_experts) if n_experts is not None else None
        self.experts_per_token = int(experts_per_token)
        self.router_aux_loss_coef = float(router_aux_loss_coef)
        self.attn_backend = attn_backend
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = bool(tie_word_embeddings)
        super().__init__(**kwargs)

    @property
    def is_gated(self) -> bool:
        """True when the feed-forward is gated (swiglu: gate_proj, up_proj, down_proj)."""
        return self.activation == "swiglu"

    @property
    def is_moe(self) -> bool:
        """True when the feed-forward is a sparse mixture of experts."""
        return self.n_experts is not None


def _check_choices(positional_encoding: str, norm_type: str, activation: str, attn_backend: str) -> None:
    """Raise ValueError naming the first of the four enumerated options not among its choices."""
    for name, value, choices in (("positional_encoding", positional_encoding, POSITIONAL_ENCODINGS),
                                 ("norm_type", norm_type, NORM_TYPES),
                                 ("activation", activation, ACTIVATIONS),
                                 ("attn_backend", attn_backend, ATTENTION_BACKENDS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _resolve_heads(attention_type: str | None, d_model: int, n_heads: int, n_kv_heads: int | None,
                   head_dim: int | None) -> tuple[str, int]:
    """``(attention_type, n_kv_heads)`` made consistent: an unset type follows the K/V heads (gqa if
    H_kv < H, mqa if H_kv == 1 < H, else mha); an unset H_kv follows the type (H for mha, 1 for mqa).

    Raises:
        ValueError: D not divisible by H, an unknown type, a type contradicting ``n_kv_heads``, gqa
            without ``n_kv_heads``, H not divisible by H_kv, or a ``head_dim`` other than D / H.
    """
    if d_model % n_heads != 0:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    if attention_type is None:
        attention_type = "gqa" if (n_kv_heads is not None and n_kv_heads < n_heads) else "mha"
        if n_kv_heads == 1 and n_heads > 1:
            attention_type = "mqa"
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
    if attention_type == "mha":
        if n_kv_heads is not None and n_kv_heads != n_heads:
            raise ValueError(f"attention_type mha needs n_kv_heads == n_heads ({n_heads}), got {n_kv_heads}")
        n_kv_heads = n_heads
    elif attention_type == "mqa":
        if n_kv_heads is not None and n_kv_heads != 1:
            raise ValueError(f"attention_type mqa needs n_kv_heads == 1, got {n_kv_heads}")
        n_kv_heads = 1
    else:  # gqa
        if n_kv_heads is None:
            raise ValueError("attention_type gqa needs n_kv_heads")
    if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
    if head_dim is not None and head_dim != d_model // n_heads:
        raise ValueError(f"head_dim must be d_model / n_heads = {d_model // n_heads}, got {head_dim}")
    return attention_type, n_kv_heads


def _resolve_yarn(positional_encoding: str, rope_scaling: dict | None, yarn_factor: float | None,
                  yarn_original_max_seq_len: int | None, max_seq_len: int) -> tuple[float | None, int | None]:
    """``(yarn_factor, yarn_original_max_seq_len)``: the recipe's ``rope_scaling`` mapping (``factor``,
    ``original_max_seq_len`` or HF's ``original_max_position_embeddings``) over the flat arguments;
    for yarn an unset original length is ``max_seq_len / factor``.

    Raises:
        ValueError: ``positional_encoding`` yarn without a factor.
    """
    if rope_scaling is not None:
        yarn_factor = rope_scaling.get("factor", yarn_factor)
        yarn_original_max_seq_len = rope_scaling.get(
            "original_max_seq_len",
            rope_scaling.get("original_max_position_embeddings", yarn_original_max_seq_len),
        )
    if positional_encoding == "yarn":
        if yarn_factor is None:
            raise ValueError("positional_encoding yarn needs rope_scaling.factor")
        if yarn_original_max_seq_len is None:
            yarn_original_max_seq_len = int(max_seq_len / float(yarn_factor))
    return yarn_factor, yarn_original_max_seq_len


def _check_experts(n_experts: int | None, experts_per_token: int) -> None:
    """Raise ValueError unless a MoE (``n_experts`` set) has E >= 1 and 1 <= k <= E."""
    if n_experts is not None:
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if not 1 <= experts_per_token <= n_experts:
            raise ValueError(f"experts_per_token must be in [1, n_experts={n_experts}], got {experts_per_token}")


__all__ = ["LlmlabConfig", "default_d_ff"]
