"""LoRA presets resolved per architecture. Pure Python (no torch): the validator imports it.

A preset names the modules LoRA adapts. ``None`` means the preset means nothing for that
architecture, which is a validation error, never a silent no-op.
PEFT refuses ``out_proj`` and ``conv1d`` on Mamba models (their fused kernels read the weights
directly), so Mamba2 presets only ever adapt ``in_proj``.
"""

from __future__ import annotations

from llmlab.specs import Mamba2Spec, ModelSpec, PretrainedSpec, TransformerSpec

PRESET_NAMES = ("minimal", "attention_only", "ffn_only", "all", "custom")

_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_GATED_FFN = ["gate_proj", "up_proj", "down_proj"]
_PLAIN_FFN = ["up_proj", "down_proj"]

#: architecture key -> preset -> module names (None: meaningless for that architecture)
PRESETS: dict[str, dict[str, list[str] | None]] = {
    # our Transformer with a gated FFN (swiglu), and Llama/Mistral/Qwen-style checkpoints
    "transformer_gated": {
        "minimal": ["q_proj", "v_proj"],
        "attention_only": _ATTN,
        "ffn_only": _GATED_FFN,
        "all": _ATTN + _GATED_FFN,
    },
    # our Transformer with a plain FFN (relu, gelu, leaky_relu, silu)
    "transformer_plain": {
        "minimal": ["q_proj", "v_proj"],
        "attention_only": _ATTN,
        "ffn_only": _PLAIN_FFN,
        "all": _ATTN + _PLAIN_FFN,
    },
    "mamba2": {
        "minimal": ["in_proj"],
        "attention_only": None,
        "ffn_only": None,
        "all": ["in_proj"],
    },
}

#: modules PEFT refuses per architecture (custom target_modules naming them is an error)
FORBIDDEN_TARGETS: dict[str, set[str]] = {"mamba2": {"out_proj", "conv1d"}}

_COMMON = {"embed_tokens", "lm_head"}
#: every module name LoRA can adapt per architecture (the last part of a module's dotted name;
#: ``router`` is the MoE router of llmlab's Transformer, MoE experts reuse the FFN names)
KNOWN_TARGETS: dict[str, set[str]] = {
    "transformer_gated": set(_ATTN) | set(_GATED_FFN) | _COMMON | {"router"},
    "transformer_plain": set(_ATTN) | set(_PLAIN_FFN) | _COMMON | {"router"},
    "mamba2": {"in_proj", "embeddings", "lm_head"},
}


def arch_key(model_cfg: dict | ModelSpec) -> str | None:
    """The PRESETS key for a recipe's ``model:`` section: typed (:mod:`llmlab.specs`), or a dict,
    also one not validated yet (the validator calls this; absent keys take the schema's defaults);
    None when unknown before loading (a ``from_pretrained`` checkpoint of an unknown family)."""
    if isinstance(model_cfg, (TransformerSpec, Mamba2Spec, PretrainedSpec)):
        arch, activation = getattr(model_cfg, "arch", None), getattr(model_cfg, "activation", None)
    else:
        arch = model_cfg.get("arch")
        if arch == "transformer":
            from llmlab.schemafile import schema_filled

            section = {k: v for k, v in model_cfg.items() if v is not None}
            activation = schema_filled("#/properties/model", section)["activation"]  # absent: the default
    if arch == "mamba2":
        return "mamba2"
    if arch == "transformer":
        return "transformer_gated" if activation == "swiglu" else "transformer_plain"
    return None


def arch_key_for_model_type(model_type: str, hf_config: dict | None = None) -> str | None:
    """The PRESETS key for a Hugging Face ``config.model_type`` (for from_pretrained models).

    ``hf_config`` (the checkpoint's config.json as a dict, not a recipe section) is needed for our
    own ``llmlab`` models, whose feed-forward is gated or plain depending on ``activation``; without
    it swiglu (LlmlabConfig's default) is assumed.
    """
    if model_type == "mamba2":
        return "mamba2"
    if model_type == "llmlab":
        # an llmlab checkpoint's config.json always holds its activation
        gated = hf_config is None or hf_config["activation"] == "swiglu"
        return "transformer_gated" if gated else "transformer_plain"
    if model_type in {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "olmo", "olmo2"}:
        return "transformer_gated"
    return None


def unknown_targets(key: str, target_modules: list[str]) -> list[str]:
    """The entries of ``target_modules`` that name no module of llmlab's own architecture ``key``
    (matched by the last dotted part; regular expressions are left to PEFT). Only for models
    llmlab builds (``model.arch``): a checkpoint's module names are known only once it is loaded."""
    known = KNOWN_TARGETS.get(key)
    if known is None:
        return []
    return [t for t in target_modules
            if isinstance(t, str) and not set(t) & set("*?[]()|^$\\+") and t.rsplit(".", 1)[-1] not in known]


def resolve_targets(key: str, preset: str, target_modules: list[str] | None = None) -> list[str]:
    """Module names for ``preset`` on architecture ``key``.

    Raises:
        ValueError: the preset means nothing for the architecture, ``custom`` without
            target_modules, or a target PEFT refuses on this architecture.
    """
    if preset == "custom":
        if not target_modules:
            raise ValueError("preset 'custom' needs target_modules")
        bad = FORBIDDEN_TARGETS.get(key, set()) & set(target_modules)
        if bad:
            raise ValueError(f"PEFT cannot adapt {sorted(bad)} on {key}; use in_proj")
        return list(target_modules)
    table = PRESETS.get(key)
    if table is None:
        raise ValueError(f"no LoRA presets for architecture {key!r}; use preset 'custom'")
    targets = table.get(preset)
    if targets is None:
        raise ValueError(f"LoRA preset {preset!r} means nothing for {key}")
    return list(targets)
