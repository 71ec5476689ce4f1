"""Setting a stage up for training, in the order the loop needs (cf. torchtune's ``_setup_*``).

:func:`setup_model` builds the stage's model, checks it against the tokenizer, applies LoRA and
gradient checkpointing, moves it to the device and lets the stage finish its own setup (reference
model, data); :func:`maybe_shard` shards it under ``distributed.strategy: fsdp``. :func:`setup_optimizer` builds the optimizer and schedule (and switches attention to
plain PyTorch ops for Sophia). :func:`maybe_compile` wraps the prepared model in ``torch.compile``;
:func:`keep_freed_memory` stops a CPU run from page-faulting its activations in again at every step.
"""

from __future__ import annotations

import torch

from llmlab.config import DistributedConfig, TrainingConfig
from llmlab.stages.base import Stage
from llmlab.train.errors import TrainingError
from llmlab.train.optim import build_optimizer, build_scheduler, needs_hessian


def setup_model(stage: Stage, accelerator) -> torch.nn.Module:
    """The model ``stage`` trains: built, LoRA applied, gradient checkpointing on, on the device.

    Calls ``stage.setup(model)`` and builds ``stage.data`` with rank 0 first (it tokenizes and
    caches the data; the other ranks reuse the cache).

    Raises:
        TrainingError: the model's input embeddings have fewer rows than the tokenizer has tokens.
    """
    ctx = stage.ctx
    model = stage.build_model()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and ctx.tokenizer is not None and emb.num_embeddings < len(ctx.tokenizer):
        raise TrainingError(f"stage {ctx.name}: the model's vocabulary ({emb.num_embeddings}) does not cover the "
                            f"tokenizer's {len(ctx.tokenizer)} tokens; use the tokenizer the model was trained with")
    if ctx.own_lora is not None:  # a continued adapter is on the model already
        from llmlab.models.build import apply_lora

        model = apply_lora(model, ctx.own_lora, stage_model_arch(model))
    spec = ctx.model_spec
    if spec is not None and spec.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    model.to(accelerator.device)
    with accelerator.main_process_first():  # rank 0 tokenizes and caches the data, the others reuse it
        stage.setup(model)
        _ = stage.data
    return model


def maybe_shard(model: torch.nn.Module, dist_cfg: DistributedConfig, accelerator) -> tuple[bool, torch.nn.Module | None]:
    """Shard ``model`` in place with FSDP2 under ``distributed.strategy: fsdp`` and several processes
    (:func:`llmlab.train.fsdp.shard_model`; one process keeps the whole model).

    Returns:
        (whether it was sharded, rank 0's meta-device copy of the unsharded model that
        ``final/`` is gathered into — None elsewhere or when not sharded).
    """
    from llmlab.train.fsdp import fsdp_enabled, meta_skeleton, shard_model

    if not fsdp_enabled(dist_cfg, accelerator.num_processes):
        return False, None
    skeleton = meta_skeleton(model) if accelerator.is_main_process else None  # before sharding: no memory
    shard_model(model, dist_cfg, accelerator.device, accelerator.mixed_precision)
    return True, skeleton


def setup_optimizer(model: torch.nn.Module, tc: TrainingConfig, device: torch.device, fsdp: bool = False):
    """``(optimizer, scheduler)`` of the stage's ``optimizer`` and ``scheduler`` over ``max_steps``.

    ``fsdp``: the recipe's ``distributed.strategy`` is fsdp, at any world size (AdamW then takes the
    same, unfused CPU kernel in one process as sharded in several, so both give the same weights).
    Sophia's Hessian estimate differentiates through the backward pass; fused SDPA kernels have no
    double backward, so with Sophia the model's attention is switched to plain PyTorch ops.
    """
    optimizer = build_optimizer(model, tc.optimizer, device, cpu_fused=not fsdp)
    scheduler = build_scheduler(optimizer, tc.scheduler, tc.max_steps)
    if needs_hessian(optimizer):
        if hasattr(getattr(model, "config", None), "attn_backend"):
            model.config.attn_backend = "eager"
        elif hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
    return optimizer, scheduler


#: glibc's malloc hands allocations of at least M_MMAP_THRESHOLD bytes (its adaptive default
#: stops at 32 MiB) to their own mmap and gives them back to the kernel on free, and trims the
#: heap's free top beyond M_TRIM_THRESHOLD: then a step's largest activations (the logits and
#: their gradient) are mapped, page-faulted and zero-filled by the kernel again at every step.
#: Raised, freed blocks stay in the process for the next step.
CPU_MALLOC_OPTIONS = {-3: 256 << 20, -1: 1 << 30}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (bytes)


def keep_freed_memory(device: torch.device) -> bool:
    """On a CPU with glibc: keep freed memory in the process (:data:`CPU_MALLOC_OPTIONS`) instead
    of returning it to the kernel at every step. Measured on the 5.26 M model of
    benchmarks/vs_litgpt.py: the kernel's page-fault time fell from 44-63 to 0-2 ms per step
    (5-6 % of the step), peak RSS +4 %; on the quick-start's 1.3 M pretrain, +116 MB (+13 %), flat
    over 1,500 steps (docs/performance.md). Process-wide and idempotent; returns whether it applied
    (False on other devices or C libraries)."""
    import ctypes
    import platform

    if device.type != "cpu" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in CPU_MALLOC_OPTIONS.items())


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(model)`` when ``enabled`` (a graph that fails to compile runs eagerly)."""
    if not enabled:
        return model
    import torch._dynamo as dynamo

    dynamo.config.suppress_errors = True
    return torch.compile(model)


def stage_model_arch(model: torch.nn.Module) -> str | None:
    """The LoRA preset key (see llmlab.models.lora_presets) of an instantiated model."""
    from llmlab.models.lora_presets import arch_key_for_model_type

    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt == "llmlab":
        return "transformer_gated" if model.config.activation == "swiglu" else "transformer_plain"
    return arch_key_for_model_type(mt) if mt else None
