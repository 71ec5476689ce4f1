"""Export an llmlab Transformer to a native transformers architecture (Llama or Mistral).

When the components match (rope or yarn positions + rmsnorm + swiglu, dense feed-forward; Mistral
also takes a sliding window but no biases), the weights are already Llama's: the module names are
the same, so the export is a config rewrite plus a strict state-dict load into
``LlamaForCausalLM`` / ``MistralForCausalLM``. The result runs anywhere Llama/Mistral runs, without
``trust_remote_code``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from llmlab.ownership import MARKER, NotOwnedError, check_replaceable, writing_folder

TARGETS = ("llama", "mistral")

#: files that are not copied from the source directory (rewritten, or code not needed; the
#: ownership marker of the run's final/: the export folder gets its own)
_SKIP = {"config.json", "configuration_llmlab.py", "modeling_llmlab.py", MARKER}


def export_mismatches(config, to: str) -> list[str]:
    """The components of an llmlab config that ``to`` cannot represent (empty: exportable)."""
    if to not in TARGETS:
        raise ValueError(f"export target must be one of {TARGETS}, got {to!r}")
    problems = []
    if config.positional_encoding not in ("rope", "yarn"):
        problems.append(f"positional_encoding is {config.positional_encoding!r}; {to} needs 'rope' (or 'yarn')")
    if config.norm_type != "rmsnorm":
        problems.append(f"norm_type is {config.norm_type!r}; {to} needs 'rmsnorm'")
    if config.activation != "swiglu":
        problems.append(f"activation is {config.activation!r}; {to} needs 'swiglu'")
    if config.n_experts is not None:
        problems.append(f"n_experts is {config.n_experts} (mixture of experts); {to} has a dense feed-forward")
    if to == "llama" and config.sliding_window is not None:
        problems.append(f"sliding_window is {config.sliding_window}; llama has no sliding window (export --to mistral)")
    if to == "mistral":
        if config.attention_bias:
            problems.append("attention_bias is true; mistral has no attention biases (export --to llama)")
        if config.mlp_bias:
            problems.append("mlp_bias is true; mistral has no feed-forward biases (export --to llama)")
    return problems


def target_config(config, to: str):
    """The ``LlamaConfig`` / ``MistralConfig`` equivalent to an exportable llmlab config."""
    import transformers
    from transformers import LlamaConfig, MistralConfig

    if config.positional_encoding == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": config.rope_theta, "factor": config.yarn_factor,
                "original_max_position_embeddings": config.yarn_original_max_seq_len}
    else:
        rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        attention_dropout=0.0,
    )
    if int(transformers.__version__.split(".")[0]) >= 5:
        common["rope_parameters"] = rope
    else:  # pragma: no cover - transformers 4.x
        common["rope_theta"] = rope.pop("rope_theta")
        if rope["rope_type"] != "default":
            common["rope_scaling"] = rope
    if to == "llama":
        return LlamaConfig(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias, **common)
    return MistralConfig(sliding_window=config.sliding_window, **common)


def export_model(model_dir: str | Path, to: str, out_dir: str | Path) -> Path:
    """Write a native ``LlamaForCausalLM`` / ``MistralForCausalLM`` checkpoint of an llmlab model.

    Args:
        model_dir: an HF-format llmlab directory (config.json with model_type "llmlab", safetensors).
        to: ``"llama"`` or ``"mistral"``.
        out_dir: where to write config.json, model.safetensors and the tokenizer/generation files
            found in ``model_dir``: a new or empty folder, or an earlier export (llmlab's ownership
            marker, :mod:`llmlab.ownership`), which is replaced.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: not an llmlab model, an unknown target, or components the target cannot
            represent (each named, e.g. ``norm_type is 'layernorm'; llama needs 'rmsnorm'``).
        NotOwnedError: ``out_dir`` is a file or holds files llmlab did not write (listed); nothing
            was written.
        OSError: ENOSPC when the disk filled up (the message says where; the partial copy is removed).
    """
    import torch
    from transformers import LlamaForCausalLM, MistralForCausalLM

    from llmlab.models.configuration_llmlab import LlmlabConfig
    from llmlab.models.modeling_llmlab import LlmlabForCausalLM

    model_dir, out_dir = Path(model_dir), Path(out_dir).resolve()
    if to not in TARGETS:
        raise ValueError(f"export target must be one of {TARGETS}, got {to!r}")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if model_type != "llmlab":
        raise ValueError(f"{model_dir}: model_type is {model_type!r}; only llmlab models export")
    config = LlmlabConfig.from_pretrained(model_dir)
    problems = export_mismatches(config, to)
    if problems:
        raise ValueError(f"{model_dir} cannot be exported to {to}: " + "; ".join(problems))
    check_replaceable(out_dir, "export")

    source = LlmlabForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype="auto")
    cls = LlamaForCausalLM if to == "llama" else MistralForCausalLM
    tconf = target_config(config, to)
    with torch.device("meta"):
        target = cls(tconf)
    state = source.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = target.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not line up with {cls.__name__}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        target.tie_weights()
    target.to(source.dtype)
    if hasattr(target, "generation_config") and hasattr(source, "generation_config"):
        target.generation_config = source.generation_config
    with writing_folder(out_dir.with_name(f".{out_dir.name}.tmp"), out_dir, "export") as tmp:
        target.save_pretrained(tmp, safe_serialization=True)
        for f in model_dir.iterdir():
            weights = f.name.endswith((".safetensors", ".safetensors.index.json"))
            if f.is_file() and f.name not in _SKIP and not weights and not (tmp / f.name).exists():
                shutil.copyfile(f, tmp / f.name)
    return out_dir


def export_command(model_dir: Path, to: str, out_dir: Path) -> int:
    """``llmlab export MODEL_DIR --to llama|mistral OUT_DIR``: 0 on success, 1 with the reason on
    stderr otherwise."""
    try:
        path = export_model(model_dir, to, out_dir)
    except (ValueError, OSError, NotOwnedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"exported {model_dir} as {to} to {path}")
    return 0


__all__ = ["TARGETS", "export_command", "export_mismatches", "export_model", "target_config"]
