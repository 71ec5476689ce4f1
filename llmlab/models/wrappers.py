"""What is inside a wrapped model: distributed / compile wrappers, PEFT models, frozen copies."""

from __future__ import annotations

import contextlib

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / FSDP / ``torch.compile`` wrappers (accelerate's
    ``extract_model_from_parallel``; mixed-precision forward hooks are kept). A PEFT model stays a
    PEFT model (its ``disable_adapter`` lives there)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)


@contextlib.contextmanager
def without_mixed_precision(model: torch.nn.Module):
    """Within the block, ``model`` runs its own forward, not the autocast wrapper accelerate's
    ``prepare`` puts around it under bf16/fp16 mixed precision (kept by :func:`unwrap`), so the
    forward computes in the weights' dtype (fp32 master weights: fp32). The wrapper is put back after.
    FSDP's own mixed-precision policy is not affected. A model without the wrapper is left as it is."""
    patched, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if patched is None or original is None:
        yield model
        return
    model.forward = original
    try:
        yield model
    finally:
        model.forward = patched


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (LoRA adapters on a base model)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with every parameter's ``requires_grad`` off (returned for chaining)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
