"""The run plan: the resolved recipe as one frozen, typed stage graph (pure Python, no torch).

::

    resolved dict ──build_run_plan──▶ RunPlan
        .settings   RunSettings: seed, precision, device, dataloader, distributed, logging, RunLayout
        .tokenizer  TokenizerSpec        .model  TransformerSpec | Mamba2Spec | PretrainedSpec
        .datasets   {name: DatasetSource}  BuiltinSource | HubSource | LocalSource (llmlab.data.source)
        .stages     (StagePlan, ...) in graph order: spec, training, params, inputs, init, lora,
                    fingerprint, layout
        .statuses() each stage's (status, detail), reading each stage.json once

Defaults live in the schema only. :func:`build_run_plan` reads a recipe that
:func:`llmlab.recipe.load_recipe` resolved (every schema default filled in by
:func:`llmlab.recipe.schema.fill_defaults`), so no field here has a default of its own: a field is
None only where the schema's default is null (tests/test_runplan.py checks every dataclass against
its schema section). The resolved dict stays the record of the run (``recipe.resolved.yaml``) and
what the fingerprints hash (:mod:`llmlab.fingerprint`), so they do not change when the code
changes shape (tests/runner/test_fingerprint_pins.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from llmlab.config import DataLoaderConfig, DistributedConfig, TrainingConfig
from llmlab.data.source import DatasetSource, dataset_source  # noqa: F401 (re-exported: the datasets' type)
from llmlab.layout import RunLayout, StageLayout
from llmlab.schemafile import schema_filled  # noqa: F401 (re-exported)
from llmlab.specs import (  # noqa: F401 (re-exported: the sections' types)
    FilterSpec,
    LoraSpec,
    Mamba2Spec,
    ModelSpec,
    PretrainedSpec,
    TokenizerSpec,
    TokenizerTrainSpec,
    TransformerSpec,
    from_section,
    model_spec,
    tokenizer_spec,
    typed_section,
)
from llmlab.stage_params import params_of
from llmlab.stage_specs import StageSpec, stage_spec


# ----------------------------------------------------------------------------- run settings


@dataclass(frozen=True)
class LoggingSpec:
    """The recipe's ``logging:`` section."""

    SCHEMA: ClassVar[str] = "#/properties/logging"

    report_to: tuple[str, ...]
    """Extra trackers (tensorboard, wandb); metrics.jsonl is always written."""
    log_every: int
    """Default log interval in steps for every stage."""
    wandb_project: str | None = None
    """Weights & Biases project."""


@dataclass(frozen=True)
class RunSettings:
    """The recipe's run-wide keys."""

    SCHEMA: ClassVar[str] = "#"
    #: top-level keys held elsewhere: the sections (RunPlan), ``extends`` (gone after resolution),
    #: ``dataloader_*`` (grouped in ``dataloader``), ``resolved_with`` (the versions a run recorded in
    #: recipe.resolved.yaml, never read back as a setting)
    ELSEWHERE: ClassVar[tuple[str, ...]] = ("extends", "tokenizer", "model", "datasets", "stages", "resolved_with",
                                            "dataloader_num_workers", "dataloader_pin_memory",
                                            "dataloader_prefetch_factor")

    name: str
    """The recipe's name."""
    seed: int
    """Seed of every random number generator (data order, init, sampling)."""
    output_dir: Path
    """The run directory (absolute)."""
    precision: str
    """auto | bf16 | fp16 | fp32 (auto: decided on the device, recorded in stage.json)."""
    device: str
    """auto | cpu | cuda."""
    compile: bool
    """torch.compile the model."""
    logging: LoggingSpec
    """The ``logging:`` section."""
    distributed: DistributedConfig
    """The ``distributed:`` section."""
    dataloader: DataLoaderConfig = field(metadata={"derived": True})
    """The ``dataloader_*`` keys."""
    layout: RunLayout = field(metadata={"derived": True})
    """Every path of the run directory."""
    token_store: Path | None = None
    """Folder of the token stores (absolute; None: ``$LLMLAB_TOKEN_STORE`` or the run's cache)."""
    requires: str | None = None
    """PEP 440 specifier of the llmlab versions the recipe needs (checked when it is loaded)."""
    threads: int | None = None
    """CPU threads torch uses (None: ``$LLMLAB_THREADS`` or torch's default; :func:`llmlab.session.setup_threads`)."""


# ----------------------------------------------------------------------------- tokenizer, model


# TokenizerSpec, TokenizerTrainSpec, tokenizer_spec: llmlab.specs (llmlab.data reads them too), imported above


# ----------------------------------------------------------------------------- data sources


# DatasetSource (BuiltinSource | HubSource | LocalSource): llmlab.data.source, imported above


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class StageInit:
    """Where a stage's weights start: the one rule ``llmlab plan`` and the runner share.

    A stage starts from ``weights_from``'s ``final/`` (None: the ``model:`` section). When it has
    no ``lora`` of its own and the chain of ``from`` stages without one leads to a stage that kept
    its adapter unmerged (``lora.merge: false``), it continues that adapter: it loads
    ``adapter_from``'s ``adapter/`` (= ``weights_from``, which saved the adapter it trained or
    continued) on that adapter's base, and trains the LoRA of the stage that made it
    (:attr:`StagePlan.lora`)."""

    weights_from: str | None
    """The stage whose final weights it starts from (None: the model section)."""
    adapter_from: str | None
    """The stage whose ``adapter/`` it continues training (None: it continues no adapter)."""


@dataclass(frozen=True)
class StagePlan:
    """One node of the stage graph."""

    name: str
    """The stage's name (its directory under the run directory)."""
    type: str
    """The stage type."""
    spec: StageSpec
    """The type's registry entry (:mod:`llmlab.stage_specs`)."""
    datasets: dict
    """Training datasets: name → mixture weight (evaluate: the datasets evaluated)."""
    eval_datasets: dict | None
    """Held-out datasets: name → weight (None: the training datasets)."""
    training: TrainingConfig | None
    """The training keys the loop reads (None for a stage that trains nothing)."""
    params: Any
    """The type's own keys (:data:`llmlab.stage_params.STAGE_PARAMS`; None when it has none)."""
    lora: LoraSpec | None
    """The LoRA it trains: its own, or the adapter it continues (:class:`StageInit`)."""
    inputs: dict
    """The stages it reads, by role: ``from``, ``reference_from``, ``reward[i]``, ``models[i]``."""
    init: StageInit
    """Where its weights start."""
    fingerprint: str
    """Hash of what determines its weights (:func:`llmlab.fingerprint.stage_fingerprints`)."""
    fingerprint_parts: dict = field(repr=False)
    """The parts hashed (kept in stage.json to explain a change)."""
    output_fingerprint: str
    """The fingerprint plus max_steps: what the stages reading it hash."""
    layout: StageLayout
    """The paths of its directory."""
    config: dict = field(repr=False, compare=False)
    """The resolved stage section (the record; read the typed fields instead)."""

    @property
    def trains(self) -> bool:
        """It trains weights (steps, checkpoints, final/)."""
        return self.spec.trains

    def fingerprint_record(self) -> dict:
        """``{"fingerprint", "parts", "output"}`` as :func:`llmlab.fingerprint.stage_fingerprints` gives it."""
        return {"fingerprint": self.fingerprint, "parts": self.fingerprint_parts, "output": self.output_fingerprint}


def trained_lora(stages: dict, name: str) -> tuple[dict | None, str | None]:
    """(the LoRA config stage ``name`` trains, the stage that made the unmerged adapter it continues
    — None when it trains its own LoRA or none): the adapter-continuation rule of
    :class:`StageInit`, over a resolved recipe's ``stages:``."""
    cfg = stages[name]
    if cfg.get("lora"):
        return cfg["lora"], None
    src = cfg.get("from")
    while src:  # a chain of adapter continuations leads back to the stage that made the adapter
        src_cfg = stages[src]
        if src_cfg.get("lora"):
            return (src_cfg["lora"], src) if src_cfg["lora"].get("merge") is False else (None, None)
        src = src_cfg.get("from")
    return None, None


def stage_plan(recipe: dict, name: str, fp: dict, inputs: dict, layout: RunLayout) -> StagePlan:
    """The :class:`StagePlan` of stage ``name`` of a resolved recipe, given its fingerprint record
    ``fp`` and ``inputs`` (:func:`llmlab.fingerprint.stage_inputs`)."""
    cfg = recipe["stages"][name]
    spec = stage_spec(cfg["type"])
    lora, made_by = trained_lora(recipe["stages"], name) if spec.trains else (None, None)
    return StagePlan(
        name=name, type=cfg["type"], spec=spec, datasets=dict(cfg["datasets"]),
        eval_datasets=dict(cfg["eval_datasets"]) if cfg.get("eval_datasets") else None,
        training=TrainingConfig.from_dict(cfg, recipe.get("logging")) if spec.trains else None,
        params=params_of(cfg["type"], cfg), lora=from_section(LoraSpec, lora) if lora else None,
        inputs=dict(inputs), init=StageInit(weights_from=inputs["from"], adapter_from=inputs["from"] if made_by else None),
        fingerprint=fp["fingerprint"], fingerprint_parts=fp["parts"], output_fingerprint=fp["output"],
        layout=layout.stage(name), config=copy.deepcopy(cfg))


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunPlan:
    """A resolved recipe as a typed stage graph (:func:`build_run_plan`)."""

    settings: RunSettings
    """Run-wide settings."""
    tokenizer: TokenizerSpec
    """The tokenizer section."""
    model: ModelSpec
    """The model section."""
    datasets: dict[str, DatasetSource]
    """The named datasets."""
    stages: tuple[StagePlan, ...]
    """The stages in graph order (the recipe's order: every input comes earlier)."""
    tokenizer_fingerprint: str
    """Hash of the tokenizer section and the data it is trained on."""
    recipe: dict = field(repr=False, compare=False)
    """The resolved recipe: the run's record (recipe.resolved.yaml, fingerprints)."""

    @property
    def order(self) -> list[str]:
        """Stage names in graph order."""
        return [s.name for s in self.stages]

    @property
    def layout(self) -> RunLayout:
        """The run directory's paths."""
        return self.settings.layout

    def stage(self, name: str) -> StagePlan:
        """The plan of stage ``name``.

        Raises:
            KeyError: no such stage.
        """
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} (stages: {', '.join(self.order)})")

    def fingerprints(self) -> dict[str, dict]:
        """``{stage: {"fingerprint", "parts", "output"}}`` (the shape of
        :func:`llmlab.fingerprint.stage_fingerprints`)."""
        return {s.name: s.fingerprint_record() for s in self.stages}

    def status(self, name: str) -> tuple[str, str]:
        """(status, detail) of one stage in the run directory (reads its stage.json once):
        done | extend | partial | stale | pending (:func:`llmlab.status.plan_stage_status`)."""
        from llmlab.status import plan_stage_status

        return plan_stage_status(self.stage(name))

    def statuses(self) -> dict[str, tuple[str, str]]:
        """Every stage's (status, detail), in graph order, each stage.json read once."""
        return {name: self.status(name) for name in self.order}


def build_run_plan(resolved: dict) -> RunPlan:
    """The :class:`RunPlan` of a resolved recipe (:func:`llmlab.recipe.load_recipe`'s result).

    Computes every stage's fingerprint (local data files and ``from_pretrained`` directories are
    hashed: file reads, no torch).

    Raises:
        KeyError: a key the schema fills is missing (``resolved`` was not resolved).
    """
    from llmlab.fingerprint import stage_fingerprints, stage_inputs, tokenizer_fingerprint

    order = list(resolved["stages"])
    layout = RunLayout(Path(resolved["output_dir"]))
    inputs = {n: stage_inputs(resolved, n, order) for n in order}
    tok_fp = tokenizer_fingerprint(resolved)
    fps = stage_fingerprints(resolved, order, inputs=inputs, tokenizer_fp=tok_fp)
    settings = from_section(
        RunSettings, resolved, layout=layout, output_dir=layout.root,
        token_store=Path(resolved["token_store"]) if resolved.get("token_store") else None,
        logging=from_section(LoggingSpec, resolved["logging"]),
        distributed=DistributedConfig.from_dict(resolved.get("distributed")),
        dataloader=DataLoaderConfig.from_recipe(resolved))
    return RunPlan(
        settings=settings,
        tokenizer=tokenizer_spec(resolved["tokenizer"]),
        model=model_spec(resolved["model"]),
        datasets={n: dataset_source(n, d) for n, d in resolved["datasets"].items()},
        stages=tuple(stage_plan(resolved, n, fps[n], inputs[n], layout) for n in order),
        recipe=resolved, tokenizer_fingerprint=tok_fp)



def bare_run_plan(recipe: dict) -> RunPlan:
    """The :class:`RunPlan` of a hand-made recipe that was not resolved (a test's or benchmark's):
    a copy filled with the schema's defaults; a stage without ``datasets`` has none and a training
    stage without ``max_steps`` trains 0 steps; ``model`` is None without ``arch`` or
    ``from_pretrained``; no fingerprints (empty) and nothing read from disk. Not for runs: a run's
    recipe is resolved (:func:`build_run_plan`).

    Raises:
        KeyError: the recipe has no ``output_dir``.
    """
    from llmlab.fingerprint import stage_inputs
    from llmlab.schemafile import fill_defaults, load_schema

    bare = copy.deepcopy(recipe)
    bare.setdefault("name", "bare")
    fill_defaults(load_schema(), bare)
    for section in bare.setdefault("stages", {}).values():
        section.setdefault("datasets", {})
        if stage_spec(section["type"]).trains:
            section.setdefault("max_steps", 0)
    order, layout = list(bare["stages"]), RunLayout.of(bare)
    model = bare.get("model") or {}
    settings = from_section(
        RunSettings, bare, layout=layout, output_dir=layout.root, token_store=None,
        logging=from_section(LoggingSpec, bare["logging"]), distributed=DistributedConfig.from_dict(bare.get("distributed")),
        dataloader=DataLoaderConfig.from_recipe(bare))
    none = {"fingerprint": "", "parts": {}, "output": ""}
    return RunPlan(
        settings=settings, tokenizer=tokenizer_spec(bare.get("tokenizer") or {}),
        model=model_spec(model) if model.get("arch") or model.get("from_pretrained") else None,
        datasets={n: dataset_source(n, d) for n, d in (bare.get("datasets") or {}).items()},
        stages=tuple(stage_plan(bare, n, none, stage_inputs(bare, n, order), layout) for n in order),
        recipe=bare, tokenizer_fingerprint="")


__all__ = ["DatasetSource", "FilterSpec", "LoggingSpec", "LoraSpec", "Mamba2Spec", "ModelSpec", "PretrainedSpec",
           "RunPlan", "RunSettings", "StageInit", "StagePlan", "TokenizerSpec", "TokenizerTrainSpec",
           "TransformerSpec", "bare_run_plan", "build_run_plan", "dataset_source", "from_section", "model_spec", "schema_filled", "stage_plan",
           "tokenizer_spec", "trained_lora"]
