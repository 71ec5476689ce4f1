"""Typed, frozen views of the resolved recipe's sections that the training loop reads.

Each view is built from the resolved dict by ``from_dict``; a key the dict lacks takes the recipe
schema's default (``schemas/recipe.schema.json``), so no default is written here or in the code that
reads the view. The views are read-only: the resolved dict stays the record of the run (it is what
``recipe.resolved.yaml`` and the fingerprints hold). Pure Python, no torch.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from llmlab.schemafile import fill_defaults


def _filled(ref: str, section: dict | None) -> dict:
    out = copy.deepcopy(dict(section or {}))
    fill_defaults({"$ref": ref}, out)
    return out


def _pick(cls, values: dict, **given) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: values.get(k) for k in names if k not in given}, **given)


@dataclass(frozen=True)
class OptimizerConfig:
    """A stage's ``optimizer:`` section (``$defs/optimizer`` in the schema). Keys that do not apply
    to ``name`` are None."""

    name: str
    """adamw | adamw_8bit | adafactor | lion | sophia | muon."""
    lr: float
    """Peak learning rate."""
    weight_decay: float
    """Decoupled weight decay (not applied to biases and norm weights)."""
    beta1: float | None = None
    """First-moment decay (adamw, adamw_8bit, lion, sophia; muon's AdamW part)."""
    beta2: float | None = None
    """Second-moment decay (adamw, adamw_8bit, lion, sophia; muon's AdamW part)."""
    eps: float | None = None
    """Denominator epsilon (adamw, adamw_8bit, sophia, muon)."""
    fused: bool | None = None
    """adamw: the fused kernel (None: on CUDA only)."""
    momentum: float | None = None
    """muon: momentum of the orthogonalised update."""
    nesterov: bool | None = None
    """muon: Nesterov momentum."""
    rho: float | None = None
    """sophia: the update clip ρ."""
    hessian_update_every: int | None = None
    """sophia: steps between Hutchinson Hessian estimates."""

    @classmethod
    def from_dict(cls, section: dict | None) -> OptimizerConfig:
        """The view of ``section`` (None or {}: the schema's default optimizer)."""
        return _pick(cls, _filled("#/$defs/optimizer", section))


@dataclass(frozen=True)
class SchedulerConfig:
    """A stage's ``scheduler:`` section (``$defs/scheduler``). Keys that do not apply to ``name`` are None."""

    name: str
    """none | constant | cosine | linear | polynomial."""
    warmup_steps: int | None = None
    """Linear warm-up steps from 0 to the peak learning rate."""
    min_lr_ratio: float | None = None
    """cosine: the floor as a fraction of the peak learning rate."""
    power: float | None = None
    """polynomial: the decay exponent."""

    @classmethod
    def from_dict(cls, section: dict | None) -> SchedulerConfig:
        """The view of ``section`` (None or {}: the schema's default schedule)."""
        return _pick(cls, _filled("#/$defs/scheduler", section))


def duration_seconds(value: float | int | str | None) -> float | None:
    """A ``max_time`` value in seconds: a number is seconds; a string is ``HH:MM:SS`` or
    ``DD:HH:MM:SS`` (the form of Lightning's ``Trainer(max_time=...)``); None stays None.

    Raises:
        ValueError: a string of another form.
    """
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    parts = str(value).split(":")
    if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts):
        raise ValueError(f"max_time {value!r}: give seconds or HH:MM:SS or DD:HH:MM:SS")
    units = (86400, 3600, 60, 1)[-len(parts):]
    return float(sum(int(p) * u for p, u in zip(parts, units)))


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """A stage's ``early_stopping:`` section (``$defs/stage_common/properties/early_stopping``)."""

    patience: int
    """Evaluations in a row without improvement that end the stage."""
    min_delta: float
    """How much lower than the best so far an ``eval_loss`` must be to count as an improvement."""

    @classmethod
    def from_dict(cls, section: dict | None) -> EarlyStoppingConfig | None:
        """The view of ``section`` (None: no early stopping)."""
        if section is None:
            return None
        return _pick(cls, _filled("#/$defs/stage_common/properties/early_stopping", section))


@dataclass(frozen=True)
class TrainingConfig:
    """The keys of a stage (``$defs/stage_common``) that the training loop reads."""

    max_steps: int
    """Optimizer steps to train to (resolution sets it from ``epochs`` where that is given)."""
    epochs: float | None
    """Passes over the training data that ``max_steps`` was computed from (None: max_steps given)."""
    batch_size: int
    """Examples per micro-batch (per process)."""
    gradient_accumulation_steps: int
    """Micro-batches per optimizer step."""
    seq_len: int | None
    """Training sequence length in tokens (resolution fills ``model.max_seq_len`` for an ``arch``
    model; None only in a bare section)."""
    grad_clip: float | None
    """Clip the global gradient norm to this (None or 0: no clipping)."""
    eval_every: int
    """Steps between evaluations (the last step is always evaluated)."""
    eval_steps: int
    """Held-out batches per evaluation."""
    log_every: int
    """Steps between training records (the stage's ``log_every``, else ``logging.log_every``)."""
    save_every: int
    """Steps between checkpoints (the last step is always saved)."""
    keep_last: int
    """Newest checkpoints kept on disk."""
    save_best_only: bool
    """Also save at each new best eval loss, never prune the best checkpoint, and end with its weights."""
    reset_optimizer: bool
    """On resume, load only the weights (fresh optimizer, schedule fast-forwarded)."""
    early_stopping: EarlyStoppingConfig | None
    """End the stage after ``patience`` evaluations without improvement (None: train to max_steps)."""
    sample_prompts: tuple[str, ...] | None
    """Prompts replied to (greedy and sampled) during training (None: no samples)."""
    sample_every: int | None
    """Steps between samples (None: ``eval_every``)."""
    max_time: float | None
    """Wall-clock seconds one run of the stage may take before it stops at a step boundary (None: no limit)."""
    seq_len: int | None
    """Training sequence length in tokens (resolution fills model.max_seq_len; None only in a bare section)."""
    optimizer: OptimizerConfig
    """The ``optimizer:`` section."""
    scheduler: SchedulerConfig
    """The ``scheduler:`` section."""

    @classmethod
    def from_dict(cls, stage: dict, logging: dict | None = None) -> TrainingConfig:
        """The view of a stage's config ``stage`` (any stage type; the recipe's ``logging`` section
        gives ``log_every`` when the stage has none).

        Raises:
            KeyError: ``max_steps`` is missing.
        """
        values = _filled("#/$defs/stage_common", {k: v for k, v in stage.items() if k not in ("optimizer", "scheduler")})
        if values.get("log_every") is None:
            values["log_every"] = _filled("#/properties/logging", logging)["log_every"]
        values["max_steps"] = stage["max_steps"]
        values["max_time"] = duration_seconds(values.get("max_time"))  # null default: not filled
        prompts = values.get("sample_prompts")
        return _pick(cls, values, early_stopping=EarlyStoppingConfig.from_dict(values.get("early_stopping")),
                     sample_prompts=tuple(prompts) if prompts is not None else None,
                     optimizer=OptimizerConfig.from_dict(stage.get("optimizer")),
                     scheduler=SchedulerConfig.from_dict(stage.get("scheduler")))


@dataclass(frozen=True)
class DataLoaderConfig:
    """The recipe's top-level ``dataloader_*`` keys: how training batches are built ahead of the
    step (:mod:`llmlab.data.prefetch`). They change speed, never weights, so no fingerprint holds them."""

    num_workers: int | None
    """Worker processes per training process (None: 0 on a CPU, else up to 4 within the cores)."""
    pin_memory: bool
    """Batches in pinned host memory (CUDA only), so the copy to the GPU overlaps the step."""
    prefetch_factor: int
    """Micro-batches each worker prepares ahead."""

    @classmethod
    def from_recipe(cls, recipe: dict) -> DataLoaderConfig:
        """The view of ``recipe``'s ``dataloader_<field>`` keys (absent: the schema's defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        from llmlab.schemafile import load_schema, resolve_ref

        props = load_schema()["properties"]
        return cls(**{n: recipe.get(f"dataloader_{n}", resolve_ref(props[f"dataloader_{n}"]).get("default"))
                      for n in names})


@dataclass(frozen=True)
class DistributedConfig:
    """The recipe's ``distributed:`` section (``#/properties/distributed`` in the schema)."""

    strategy: str
    """ddp | fsdp."""
    reshard_after_forward: bool
    """fsdp: free gathered block parameters after the forward (ZeRO-3) rather than after the backward."""
    cpu_offload: bool
    """fsdp: sharded parameters, gradients and optimizer state live in CPU memory."""
    async_checkpoint: bool
    """fsdp: checkpoint shards are written in the background while training goes on."""
    replicate: int
    """fsdp: HSDP replica groups (1: plain FSDP over every process)."""

    def mesh_shape(self, world_size: int) -> tuple[int, int]:
        """``(replica groups, processes sharding within each)`` for ``world_size`` processes under
        fsdp: ``(replicate, world_size // replicate)``; ``(1, world_size)`` is plain FSDP.

        Raises:
            ValueError: ``replicate`` does not divide ``world_size`` (naming the key).
        """
        if world_size % self.replicate:
            raise ValueError(f"distributed.replicate is {self.replicate}, which does not divide the {world_size} "
                             "processes: HSDP needs world size = replicate × processes per replica group (e.g. "
                             "replicate = the number of nodes)")
        return self.replicate, world_size // self.replicate

    @classmethod
    def from_dict(cls, section: dict | None) -> DistributedConfig:
        """The view of ``section`` (None or {}: ddp)."""
        return _pick(cls, _filled("#/properties/distributed", section))


__all__ = ["DataLoaderConfig", "DistributedConfig", "EarlyStoppingConfig", "OptimizerConfig", "SchedulerConfig",
           "TrainingConfig", "duration_seconds"]
