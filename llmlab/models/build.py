"""Build or load the model a recipe names, and wrap it with LoRA.

The caller seeds torch before :func:`build_model` (the initial weights are a pure function of the
seed and the ``model:`` section).

* ``arch: transformer`` -> :class:`~llmlab.models.modeling_llmlab.LlmlabForCausalLM`
* ``arch: mamba2`` -> ``transformers.Mamba2ForCausalLM`` (Dao & Gu 2024, "Transformers are SSMs";
  it uses the mamba_ssm / causal_conv1d kernels when installed, a pure PyTorch path otherwise), its
  mixers able to keep packed sequences apart (llmlab.models.mamba2_packed)
* ``from_pretrained: PATH_OR_HUB_ID`` -> ``AutoModelForCausalLM.from_pretrained`` (safetensors only;
  a ``.gguf`` file is dequantized by transformers with the ``gguf`` package, see llmlab.models.gguf)
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from llmlab.models import lora_presets
from llmlab.models.gguf import drop_gguf_quantizer, is_gguf, split_gguf
from llmlab.models.configuration_llmlab import LlmlabConfig
from llmlab.models.modeling_llmlab import LlmlabForCausalLM, register_auto_classes
from llmlab.models.params import as_model_spec, lora_spec
from llmlab.specs import LoraSpec, Mamba2Spec, ModelSpec, PretrainedSpec, TransformerSpec

log = logging.getLogger(__name__)

register_auto_classes()

#: recipe ``model:`` keys of arch transformer (LlmlabConfig takes them by the same name, except
#: tie_embeddings -> tie_word_embeddings)
TRANSFORMER_KEYS = (
    "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "positional_encoding", "rope_theta",
    "rope_scaling", "norm_type", "norm_eps", "attention_type", "sliding_window", "attention_bias", "mlp_bias",
    "activation", "dropout", "tie_embeddings", "init_std", "n_experts", "experts_per_token", "router_aux_loss_coef",
)
#: recipe ``model:`` keys of arch mamba2
MAMBA2_KEYS = (
    "d_model", "n_layers", "state_size", "head_dim", "expand", "conv_kernel", "n_groups", "chunk_size",
    "tie_embeddings", "max_seq_len",
)
#: keys any model section may carry that are not architecture knobs
_COMMON_KEYS = ("arch", "gradient_checkpointing", "vocab_size")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _special_ids(tokenizer) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    ids = {
        "pad_token_id": getattr(tokenizer, "pad_token_id", None),
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
    }
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    return ids


def _vocab_size(tokenizer, vocab_size: int | None) -> int:
    if tokenizer is not None:
        return len(tokenizer)
    if vocab_size is not None:
        return int(vocab_size)
    raise ValueError("build_model needs a tokenizer or vocab_size to size the embedding")


def _check_keys(model_cfg: dict, allowed: tuple[str, ...], arch: str) -> None:
    unknown = sorted(k for k in model_cfg if k not in allowed and k not in _COMMON_KEYS and model_cfg[k] is not None)
    if unknown:
        raise ValueError(f"model: keys {unknown} do not apply to arch {arch!r} (expected some of {sorted(allowed)})")


def _spec(model: dict | ModelSpec, arch: str, allowed: tuple[str, ...]) -> ModelSpec:
    """``model`` typed (a dict is checked for keys of another arch, then filled from the schema)."""
    if isinstance(model, dict):
        _check_keys(model, allowed, arch)
        model = as_model_spec({**model, "arch": arch})
    return model


def transformer_config(model: dict | TransformerSpec, vocab_size: int, special_ids: dict | None = None) -> LlmlabConfig:
    """The :class:`LlmlabConfig` for a recipe's ``model:`` section with ``arch: transformer`` (a
    :class:`~llmlab.specs.TransformerSpec`, or a dict: keys left out or ``null`` take the schema's
    defaults, schemas/recipe.schema.json, docs/recipes.md).

    Raises:
        ValueError: a dict with keys of another arch.
    """
    spec = _spec(model, "transformer", TRANSFORMER_KEYS)
    kwargs: dict[str, Any] = {k: v for k in TRANSFORMER_KEYS if (v := getattr(spec, k)) is not None}
    kwargs["tie_word_embeddings"] = bool(kwargs.pop("tie_embeddings"))
    kwargs.update({k: v for k, v in (special_ids or {}).items() if v is not None})
    return LlmlabConfig(vocab_size=vocab_size, **kwargs)


def mamba2_config(model: dict | Mamba2Spec, vocab_size: int, special_ids: dict | None = None):
    """The ``transformers.Mamba2Config`` for a recipe's ``model:`` section with ``arch: mamba2`` (a
    :class:`~llmlab.specs.Mamba2Spec`, or a dict filled from the schema).

    Mapping: d_model -> hidden_size, n_layers -> num_hidden_layers, num_heads = expand * d_model /
    head_dim (must divide exactly, and be a multiple of n_groups), state_size, head_dim, expand,
    conv_kernel, n_groups, chunk_size as named, tie_embeddings -> tie_word_embeddings; max_seq_len is
    stored as is (config.json ``max_seq_len``): Mamba2 has no position limit, but this is the context
    it was trained for, and inference (``context_limit``) caps prompt plus reply to it. A dict without
    ``max_seq_len`` declares no context (as a Mamba2 saved before config.json carried one).

    Raises:
        ValueError: head_dim does not divide expand * d_model, or n_groups the heads; a dict with
            keys of another arch.
    """
    from transformers import Mamba2Config

    c = _spec(model, "mamba2", MAMBA2_KEYS)
    declared = not isinstance(model, dict) or model.get("max_seq_len") is not None
    inner = c.expand * c.d_model
    if inner % c.head_dim:
        raise ValueError(f"mamba2: expand * d_model ({inner}) must be divisible by head_dim ({c.head_dim})")
    num_heads = inner // c.head_dim
    if num_heads % c.n_groups:
        raise ValueError(f"mamba2: num_heads = expand*d_model/head_dim = {num_heads} must be divisible by n_groups ({c.n_groups})")
    ids = {k: v for k, v in (special_ids or {}).items() if v is not None}
    return Mamba2Config(
        vocab_size=vocab_size,
        hidden_size=c.d_model,
        num_hidden_layers=c.n_layers,
        num_heads=num_heads,
        head_dim=c.head_dim,
        state_size=c.state_size,
        expand=c.expand,
        conv_kernel=c.conv_kernel,
        n_groups=c.n_groups,
        chunk_size=c.chunk_size,
        tie_word_embeddings=bool(c.tie_embeddings),
        pad_token_id=ids.get("pad_token_id"),
        bos_token_id=ids.get("bos_token_id"),
        eos_token_id=ids.get("eos_token_id"),
        **({"max_seq_len": int(c.max_seq_len)} if declared else {}),
    )


def _trust_remote_code(spec: PretrainedSpec, allow_code: bool) -> bool:
    wants = spec.trust_remote_code is True  # the schema's default: false
    if wants and not allow_code:
        raise PermissionError(
            f"model.trust_remote_code is true for {spec.from_pretrained!r}: running a checkpoint's "
            "Python code needs the explicit --allow-code flag"
        )
    return wants and allow_code


def _from_pretrained(spec: PretrainedSpec, allow_code: bool) -> PreTrainedModel:
    source = str(spec.from_pretrained)
    dtype_name = spec.dtype
    if dtype_name != "auto" and dtype_name not in _DTYPES:
        raise ValueError(f"model.dtype must be auto|float32|bfloat16|float16, got {dtype_name!r}")
    dtype = "auto" if dtype_name == "auto" else _DTYPES[dtype_name]
    trust = _trust_remote_code(spec, allow_code)
    kwargs: dict[str, Any] = {"revision": spec.revision, "dtype": dtype, "trust_remote_code": trust}
    if is_gguf(source):
        # GGUF is a plain tensor container (no pickle); transformers dequantizes it (needs `gguf`)
        where, name = split_gguf(source)
        if dtype == "auto":  # GGUF weights are dequantised to float32; "auto" would mean fp16 here
            kwargs["dtype"] = torch.float32
        return drop_gguf_quantizer(AutoModelForCausalLM.from_pretrained(where, gguf_file=name, **kwargs))
    try:
        return AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, **kwargs)
    except OSError as err:
        if Path(source).is_dir() and not any(Path(source).glob("*.safetensors")):
            raise OSError(
                f"{source}: no *.safetensors weights; llmlab loads safetensors only (never pickles). "
                "Convert the checkpoint with safetensors first."
            ) from err
        raise


def _typed_model(model: dict | ModelSpec) -> ModelSpec:
    """``model`` as a spec (a dict filled from the schema; its keys of another arch are refused)."""
    if not isinstance(model, dict):
        return model
    spec = as_model_spec(model)
    allowed = {TransformerSpec: TRANSFORMER_KEYS, Mamba2Spec: MAMBA2_KEYS}.get(type(spec))
    if allowed is not None:
        _check_keys(model, allowed, spec.arch)
    return spec


def build_model(model: dict | ModelSpec, tokenizer=None, vocab_size: int | None = None,
                allow_code: bool = False) -> PreTrainedModel:
    """Build (from scratch, seeded by the caller) or load the causal LM of a recipe's ``model:``.

    Args:
        model: the typed ``model:`` section (:class:`~llmlab.specs.TransformerSpec`,
            :class:`~llmlab.specs.Mamba2Spec` or :class:`~llmlab.specs.PretrainedSpec`; the run's
            ``RunPlan.model``), or a dict section (one of ``arch`` / ``from_pretrained``; absent
            keys take the schema's defaults).
        tokenizer: the run's tokenizer; sets vocab_size = len(tokenizer) and pad/bos/eos ids
            (pad falls back to eos). A ``from_pretrained`` model whose embedding has fewer rows
            than the tokenizer has tokens (a pad or chat-template token llmlab added) is grown to
            fit (:func:`grow_embeddings_for`).
        vocab_size: used when no tokenizer is given.
        allow_code: the user passed --allow-code (needed with ``trust_remote_code: true``).

    Returns:
        an ``LlmlabForCausalLM`` / ``Mamba2ForCausalLM`` / any AutoModelForCausalLM, in train mode is
        left to the caller; gradient checkpointing enabled when the section asks for it.

    Raises:
        ValueError: neither ``arch`` nor ``from_pretrained``, or keys of another arch.
    """
    spec = _typed_model(model)
    if isinstance(spec, PretrainedSpec):
        built = _from_pretrained(spec, allow_code)
        if tokenizer is not None:
            grow_embeddings_for(built, tokenizer)
    else:
        vocab = _vocab_size(tokenizer, vocab_size)
        ids = _special_ids(tokenizer)
        if isinstance(spec, TransformerSpec):
            built = LlmlabForCausalLM(transformer_config(spec, vocab, ids))
        else:
            from transformers import Mamba2ForCausalLM

            from llmlab.models.mamba2_packed import enable_packed_mamba2

            built = enable_packed_mamba2(Mamba2ForCausalLM(mamba2_config(spec, vocab, ids)))
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(built)
    return built


def grow_embeddings_for(model: PreTrainedModel, tokenizer) -> bool:
    """Grow ``model``'s input (and tied or separate output) embedding to ``len(tokenizer)`` rows
    when it has fewer, as Axolotl and TRL do after adding special tokens: transformers'
    ``resize_token_embeddings`` with ``mean_resizing`` (the new rows drawn around the mean of the
    old ones, Hewitt 2021, "Initializing new word embeddings for pretrained language models"), and
    ``pad_token_id`` set from the tokenizer. The existing rows are unchanged. Returns whether it grew.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = len(tokenizer)
    if emb is None or emb.num_embeddings >= n:
        return False
    old = emb.num_embeddings
    model.resize_token_embeddings(n, mean_resizing=True)
    if getattr(tokenizer, "pad_token_id", None) is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    log.info("model embedding grown from %d to %d rows for the tokens the run's tokenizer added", old, n)
    return True


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass (non-reentrant torch.utils.checkpoint)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def quantization_config(quantize: str):
    """A ``BitsAndBytesConfig`` for QLoRA (Dettmers et al. 2023): NF4 with double quantization and
    bf16 compute for ``4bit``, LLM.int8 for ``8bit``.

    Raises:
        RuntimeError: no CUDA device or no bitsandbytes (QLoRA's kernels are CUDA-only).
    """
    if not torch.cuda.is_available():
        raise RuntimeError(f"lora.quantize: {quantize} (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no "
                           "GPU. Remove lora.quantize to train the LoRA adapter on full-precision weights.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise RuntimeError("lora.quantize needs the bitsandbytes package: pip install 'llmlab[gpu]'") from err
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"lora.quantize: {quantize!r} is not one of 4bit, 8bit")


def load_causal_lm(path: str | Path, allow_code: bool = False, dtype: torch.dtype | str | None = None,
                   quantize: str | None = None) -> PreTrainedModel:
    """Load any Hugging Face-format causal LM directory (safetensors only).

    ``model_type "llmlab"`` loads through the registered classes, without running the directory's
    code; other remote-code models need ``allow_code``. ``quantize`` (``4bit``/``8bit``) loads the
    frozen base through bitsandbytes for QLoRA and prepares it for k-bit training (peft). A Mamba2 is
    made to take packed rows (:func:`llmlab.models.mamba2_packed.enable_packed_mamba2`), as when built.

    Raises:
        RuntimeError: ``quantize`` on a machine without CUDA or bitsandbytes.
    """
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": bool(allow_code)}
    if dtype is not None:
        kwargs["dtype"] = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if quantize:
        kwargs["quantization_config"] = quantization_config(quantize)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(str(path), **kwargs))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if getattr(model.config, "model_type", None) == "mamba2":
        from llmlab.models.mamba2_packed import enable_packed_mamba2

        enable_packed_mamba2(model)
    return model


def load_reward_model(path: str | Path, allow_code: bool = False, pad_token_id: int | None = None) -> PreTrainedModel:
    """Load a causal-LM (or reward-model) directory as an ``AutoModelForSequenceClassification``
    with ``num_labels=1``: the body's weights, and a freshly initialised scalar ``score`` head when
    the directory holds a causal LM.

    Raises:
        ValueError: the architecture has no sequence-classification class (e.g. Mamba2).
    """
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=bool(allow_code))
    kwargs: dict[str, Any] = {"num_labels": 1, "use_safetensors": True, "trust_remote_code": bool(allow_code)}
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err) or "AutoModelForSequenceClassification" in str(err):
            raise ValueError(
                f"{path}: architecture {config.model_type!r} has no sequence-classification (reward) head in "
                "transformers; use a transformer model (arch: transformer, or a Llama/Mistral/Qwen checkpoint) "
                "for reward models"
            ) from err
        raise


def arch_key_for_model(model) -> str | None:
    """The LoRA presets key (``lora_presets.PRESETS``) for an instantiated model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        return None
    return lora_presets.arch_key_for_model_type(model_type, {"activation": getattr(config, "activation", "swiglu")})


def apply_lora(model: PreTrainedModel, lora_cfg: dict | LoraSpec, arch_key: str | None = None):
    """Wrap ``model`` with LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation") via peft.

    Args:
        model: the model to adapt (its base weights are frozen by peft).
        lora_cfg: the stage's typed ``lora:`` (:class:`~llmlab.specs.LoraSpec`; a dict section is
            filled from the schema): ``preset``, ``r``, ``alpha``, ``dropout``,
            ``target_modules`` (custom), ``use_dora`` (DoRA, Liu et al. 2024), ``use_rslora``
            (rsLoRA, Kalajdzievski 2023: scale alpha / sqrt(r)).
        arch_key: a ``lora_presets.PRESETS`` key; ``None`` -> derived from ``model.config``.

    Returns:
        a ``peft.PeftModel`` (task CAUSAL_LM, or SEQ_CLS for a sequence classifier, whose ``score``
        head then trains fully).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    lora = lora_spec(lora_cfg)  # a bare section too: the schema's defaults
    if lora.quantize and not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        raise ValueError("lora.quantize: the base must be loaded quantized (load_causal_lm(..., quantize=...)); "
                         "a model built from scratch has no pretrained weights to quantize")
    key = arch_key or arch_key_for_model(model)
    if key is None:
        if lora.preset != "custom":
            raise ValueError(
                f"no LoRA presets for model_type {getattr(model.config, 'model_type', '?')!r}; use preset 'custom'"
            )
        key = "custom"
    targets = lora_presets.resolve_targets(key, lora.preset, list(lora.target_modules) if lora.target_modules else None)
    is_seq_cls = type(model).__name__.endswith("ForSequenceClassification")
    config = LoraConfig(
        r=int(lora.r),
        lora_alpha=float(lora.alpha),
        lora_dropout=float(lora.dropout),
        target_modules=targets,
        task_type=TaskType.SEQ_CLS if is_seq_cls else TaskType.CAUSAL_LM,
        use_dora=bool(lora.use_dora),
        use_rslora=bool(lora.use_rslora),
    )
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` (removed in
        # transformers 6): a FutureWarning on every LoRA stage that the user can do nothing about
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


__all__ = [
    "apply_lora",
    "arch_key_for_model",
    "build_model",
    "load_causal_lm",
    "load_reward_model",
    "mamba2_config",
    "transformer_config",
]
