"""``llmlab plan``: the stage graph of a recipe without training anything.

Pure computation (no torch import): exact parameter counts from the config, a training-memory
estimate, tokens per stage, mixture shares, tokens per parameter, and the status of each stage in
the run directory (done / partial at step N / pending / stale with the reason).

Every row is computed from the typed :class:`llmlab.runplan.RunPlan` (its ``model``,
``tokenizer``, ``settings`` and each :class:`~llmlab.runplan.StagePlan`'s ``training``, ``params``,
``lora`` and ``init``), never from the recipe dict. The functions here that take ``run`` also accept
a resolved recipe dict, which they build into a plan first (:func:`as_run_plan`): for callers not
yet handed the plan.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from llmlab.console import make_console
from llmlab.specs import PretrainedSpec
from llmlab.stage_specs import uses_reference

if TYPE_CHECKING:
    from llmlab.runplan import RunPlan, StagePlan


#: the dict path's one-entry memo: (the resolved dict, a copy of it, its plan)
_LAST_BUILT: list[tuple[dict, dict, RunPlan]] = []


def as_run_plan(run: RunPlan | dict, fresh: bool = False) -> RunPlan:
    """``run`` as it is, or the :func:`llmlab.runplan.build_run_plan` of a resolved recipe dict, for
    callers not yet handed the plan. Building one hashes the recipe's data, so the plan of the last
    dict is kept and reused while the same dict, unchanged, comes back (the runner asks for each
    stage's memory); ``fresh``: build it anew (the statuses and fingerprints of :func:`plan_rows`
    also follow data files that changed under an unchanged recipe)."""
    from llmlab.runplan import RunPlan, build_run_plan

    if isinstance(run, RunPlan):
        return run
    if not fresh and _LAST_BUILT and _LAST_BUILT[0][0] is run and _LAST_BUILT[0][1] == run:
        return _LAST_BUILT[0][2]
    plan = build_run_plan(run)
    _LAST_BUILT[:] = [(run, copy.deepcopy(run), plan)]
    return plan


def run_tokenizer_state(run: RunPlan | dict) -> str:
    """``"current"``: the run directory holds the tokenizer this recipe describes; ``"changed"``:
    it holds one trained from a different tokenizer section or data (every stage will retrain);
    ``"absent"``: none has been trained yet."""
    run = as_run_plan(run)
    layout = run.layout
    if not (layout.tokenizer / "tokenizer.json").is_file():
        return "absent"
    marker = layout.tokenizer_fingerprint
    current = marker.is_file() and marker.read_text().strip() == run.tokenizer_fingerprint
    return "current" if current else "changed"


def _tokenizer_json_size(path: Path) -> int | None:
    """The vocabulary size of a tokenizer.json: its largest token id (vocabulary or added) plus one."""
    data = json.loads(path.read_text())
    vocab = data.get("model", {}).get("vocab", {})
    ids = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    return max(ids) + 1 if ids else None


def vocab_size_for(run: RunPlan | dict) -> int | None:
    """The vocabulary size the model will have: the run's tokenizer if it is the one this recipe
    describes, else the tokenizer section's vocab_size (an upper bound for a tokenizer still to be
    trained: BPE may stop short of it), else a local tokenizer.json's size; None if unknown."""
    run = as_run_plan(run)
    tok = run.tokenizer
    candidates = [run.layout.tokenizer / "tokenizer.json"] if run_tokenizer_state(run) == "current" else []
    if tok.from_pretrained:
        candidates.append(Path(str(tok.from_pretrained)) / "tokenizer.json")
    for p in candidates:
        if p.is_file():
            return _tokenizer_json_size(p)
    return int(tok.train.vocab_size) if tok.train else None


def safetensors_shapes(model_dir: Path) -> list[tuple[str, list[int]]] | None:
    """``(name, shape)`` of every tensor in a local checkpoint, read from the safetensors headers only
    (``safe_open(framework="numpy")``: no tensor is loaded, torch is not imported); None when the
    directory holds no safetensors file."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    out = []
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            out.extend((k, list(st.get_slice(k).get_shape())) for k in st.keys())
    return out


def _numel(shapes) -> int:
    return sum(math.prod(shape) for _, shape in shapes)


def safetensors_param_count(model_dir: Path) -> int | None:
    """Number of parameters in a local checkpoint, read from the safetensors headers only."""
    shapes = safetensors_shapes(model_dir)
    return None if shapes is None else _numel(shapes)


def pretrained_shapes(source: str) -> list[tuple[str, list[int]]] | None:
    """Tensor shapes of a local ``from_pretrained`` checkpoint (a directory of safetensors, or a GGUF
    file, read from headers only); None for a hub id or when they cannot be read."""
    from llmlab.models.gguf import gguf_shapes, is_gguf, locate

    if is_gguf(source):
        try:
            path = Path(locate(source))
            return gguf_shapes(path) if path.is_file() else None
        except (FileNotFoundError, ImportError):
            return None
    return safetensors_shapes(Path(source)) if Path(source).is_dir() else None


def _local_checkpoint(source: str) -> str | None:
    """The local path of a ``from_pretrained`` checkpoint (a ``package:`` GGUF located), or None
    for a hub id or a GGUF that cannot be found."""
    from llmlab.models.gguf import is_gguf, locate

    if is_gguf(source):
        try:
            path = Path(locate(source))
        except (FileNotFoundError, ImportError):
            return None
        return str(path) if path.is_file() else None
    return source if Path(source).is_dir() else None


def pretrained_lora_trainable(source: str, lora) -> int | None:
    """Trainable LoRA parameters on a local ``from_pretrained`` checkpoint (its config.json or GGUF
    metadata names the family, the headers give the shapes); None when they cannot be known without
    loading. ``lora``: a :class:`llmlab.specs.LoraSpec` (or a ``lora:`` section)."""
    from llmlab.models.gguf import gguf_architecture, is_gguf, locate
    from llmlab.models.lora_presets import arch_key_for_model_type, resolve_targets
    from llmlab.models.params import lora_parameters, lora_spec

    shapes = pretrained_shapes(source)
    if shapes is None:
        return None
    if is_gguf(source):
        config = {"model_type": gguf_architecture(locate(source))}
    else:
        cfg_file = Path(source) / "config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    key = arch_key_for_model_type(str(config.get("model_type")), config)
    spec = lora_spec(lora)
    try:
        targets = resolve_targets(key or "custom", spec.preset, spec.target_modules)
    except ValueError:
        return None
    return lora_parameters(shapes, targets, int(spec.r), spec.use_dora)


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def fmt_bytes(n: float | None) -> str:
    """Bytes for people: ``1.5 GiB``, ``12.0 MiB``, ``512 B``; ``?`` for None."""
    if n is None:
        return "?"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def stage_tokens(stage: StagePlan) -> int:
    """Tokens a training stage processes (an upper bound where batches are padded), from its
    :class:`~llmlab.runplan.StagePlan`'s ``spec``, ``training`` and ``params``."""
    spec, train = stage.spec, stage.training
    per_seq = int(train.seq_len or 0)
    n = int(train.max_steps) * int(train.batch_size) * int(train.gradient_accumulation_steps)
    n *= (spec.sequences_per_example + spec.extra_sequences_per_example) * (
        int(getattr(stage.params, spec.samples_key)) if spec.samples_key else 1)
    if spec.generates:
        per_seq = per_seq or int(stage.params.max_new_tokens)
    return n * per_seq


def _exactness(run: RunPlan | dict, facts: dict) -> str:
    """How exact the parameter count is: exact with the run's tokenizer or a pretrained one; with
    a tokenizer still to be trained, an upper bound (its vocabulary may come out smaller)."""
    if facts["params"] is None:
        return "unknown"
    if facts["tokenizer"] != "current" and as_run_plan(run).tokenizer.train:
        return f"at most {facts['params']}: exact once the tokenizer is trained"
    return f"exact: {facts['params']}"


def model_params(run: RunPlan | dict, vocab: int | None) -> int | None:
    """The model's parameter count: exact from the config of an ``arch`` model (given the
    vocabulary), from the safetensors headers of a local ``from_pretrained`` checkpoint; None when
    unknown (no vocabulary yet, or a hub id not in the local cache)."""
    model = as_run_plan(run).model
    if isinstance(model, PretrainedSpec):
        shapes = pretrained_shapes(str(model.from_pretrained))
        return _numel(shapes) if shapes is not None else None
    if vocab:
        from llmlab.models.params import count_parameters

        return count_parameters(model, vocab)
    return None


def frozen_copies(run: RunPlan | dict, name: str) -> int:
    """Whole frozen models stage ``name`` holds beside the one it trains: the reference of a dpo
    stage (not of its reference-free simpo / cpo) or a kto stage
    (:func:`llmlab.stage_specs.uses_reference`), of a grpo stage with ``kl_beta`` > 0 and of a ppo
    stage with a KL penalty — none when the policy trains LoRA (:attr:`StagePlan.lora`) and has no
    ``reference_from`` (the reference is then the base with its adapters disabled,
    :mod:`llmlab.stages.reference`) — and a ppo stage's reward models read from a reward stage (same
    architecture, so about the policy's size)."""
    stage = as_run_plan(run).stage(name)
    kind, p = stage.type, stage.params
    preference = uses_reference(kind, p)  # dpo (not simpo / cpo) and kto keep one; orpo and reward do not
    wants_ref = (bool(preference) if preference is not None else
                 (kind == "grpo" and float(p.kl_beta) > 0)
                 or (kind == "ppo" and (float(p.kl_coef) > 0 or p.kl_target is not None)))
    ref = int(wants_ref and (p.reference_from is not None or stage.lora is None))
    rewards = sum(1 for r in p.reward or () if r.from_stage) if kind == "ppo" else 0
    return ref + rewards


def _trainable(run: RunPlan, stage: StagePlan, params: int | None, vocab: int | None) -> int | None:
    """Trainable parameters of a training stage: all ``params``, or its LoRA's
    (:attr:`StagePlan.lora`: its own or the adapter it continues) — counted from the config of an
    ``arch`` model, from the headers of a local ``from_pretrained`` checkpoint, else unknown."""
    if stage.lora is None:
        return params
    if isinstance(run.model, PretrainedSpec):
        return pretrained_lora_trainable(str(run.model.from_pretrained), stage.lora)
    if not vocab:  # an arch model's LoRA needs the vocabulary (its shapes): unknown, not all
        return None
    from llmlab.models.params import count_lora_parameters

    # lora_presets.arch_key reads a model section: the spec's fields are that section, filled
    return count_lora_parameters(dataclasses.asdict(run.model), vocab, stage.lora)


def stage_memory(run: RunPlan | dict, name: str, params: int | None, vocab: int | None,
                 shards: int = 1, device: str | None = None) -> tuple[int | None, dict[str, int] | None]:
    """``(trainable parameters, per-device memory by part in bytes)`` of training stage ``name``
    (:func:`llmlab.models.params.training_memory`; ``shards`` > 1 under FSDP; the frozen models of
    :func:`frozen_copies`; on a CPU ``device`` — the recipe's ``device`` when None, ``auto`` planned
    as a CPU — the process's fixed cost :data:`llmlab.models.params.CPU_RUNTIME_BYTES`). The memory
    is None when the model's size is unknown."""
    from llmlab.models.params import CPU_RUNTIME_BYTES, pretrained_dims, training_memory

    run = as_run_plan(run)
    stage, model = run.stage(name), run.model
    trainable = _trainable(run, stage, params, vocab)
    dims = None
    if params and isinstance(model, PretrainedSpec):  # activations from the checkpoint's shapes
        local = _local_checkpoint(str(model.from_pretrained))
        shapes = pretrained_shapes(local) if local else None
        dims = pretrained_dims(shapes) if shapes else None
        if dims is None:
            return trainable, None
        model, vocab = dataclasses.replace(model, from_pretrained=local), vocab or dims["vocab"]
    if not (params and vocab):
        return trainable, None
    train, spec = stage.training, stage.spec
    seq = int(train.seq_len or model.max_seq_len)
    # grpo: every prompt's group_size completions go through the model
    batch = int(train.batch_size) * spec.sequences_per_example * (
        int(getattr(stage.params, spec.samples_key)) if spec.samples_key else 1)
    cpu = (device or run.settings.device) != "cuda"
    return trainable, training_memory(model, vocab, batch, seq, trainable, train.optimizer.name,
                                      run.settings.precision, shards=shards, frozen_copies=frozen_copies(run, name),
                                      runtime_bytes=CPU_RUNTIME_BYTES if cpu else 0, dims=dims)


#: a stage planned to need more than this multiple of the device's total memory is refused when
#: the run starts: the estimate is within 1.5x of the measured peak for every shipped recipe
#: (docs/performance.md), so such a stage would be killed for lack of memory, not merely be tight
REFUSE_FACTOR = 2.0


def total_memory(device_type: str) -> tuple[int, str]:
    """``(bytes, what)``: the total memory of the device kind training runs on (a CUDA device's
    whole memory, else the machine's RAM)."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[1]), f"{torch.cuda.get_device_name()} has in all"
    import psutil  # a dependency of accelerate

    return int(psutil.virtual_memory().total), "this machine has in all"


def unfittable_message(run: RunPlan | dict, stages: list[str], device_type: str, shards: int = 1,
                       processes_here: int = 1, total: tuple[int, str] | None = None) -> str | None:
    """Why the run cannot start: the first training stage of ``stages`` whose planned peak memory
    (:func:`stage_memory`, times the ``processes_here`` processes sharing a CPU's RAM) is more than
    :data:`REFUSE_FACTOR` times the device's total memory (``total``: default :func:`total_memory`);
    None when every stage's estimate is below that, or unknown."""
    run = as_run_plan(run)
    vocab = vocab_size_for(run)
    params = model_params(run, vocab)
    for name in stages:
        if not run.stage(name).trains:
            continue
        _, parts = stage_memory(run, name, params, vocab, shards=shards, device=device_type)
        if not parts:
            continue
        need = sum(parts.values()) * (max(1, processes_here) if device_type != "cuda" else 1)
        have, what = total if total is not None else total_memory(device_type)
        if need > REFUSE_FACTOR * have:
            gib = 2.0 ** 30
            detail = ", ".join(f"{k} {v / gib:.2f}" for k, v in parts.items() if v)
            return (f"stage {name}: its planned peak training memory, {need / gib:.1f} GiB (GiB by part: {detail}; "
                    f"{_fmt_count(params)} parameters), is more than {REFUSE_FACTOR:g}x the {have / gib:.1f} GiB "
                    f"{what}: it would be killed for lack of memory. Shrink the model, lower batch_size or seq_len, "
                    "train a LoRA adapter, or shard it with distributed.strategy: fsdp over more devices; "
                    "`llmlab plan` shows the estimate. No stage was run.")
    return None


def _results_row(stage: StagePlan, params: int | None) -> dict:
    """The row of a stage that trains nothing: which models, on which data (equal shares)."""
    ds = list(stage.datasets)
    return {"stage": stage.name, "type": stage.type, "from": ", ".join(stage.params.models),
            "datasets": {k: 100.0 / len(ds) for k in ds}, "steps": 0, "tokens": 0, "params": params,
            "trainable": 0, "memory_bytes": None, "memory": None, "tokens_per_step": 0,
            "tokens_per_param": None}


def _training_row(run: RunPlan, stage: StagePlan, params: int | None, vocab: int | None,
                  world_size: int, shards: int) -> dict:
    """The row of a training stage: mixture shares, steps, tokens (all processes), memory (one device)."""
    total_w = sum(stage.datasets.values()) or 1.0
    trainable, memory = stage_memory(run, stage.name, params, vocab, shards)
    tokens = stage_tokens(stage) * world_size  # batch_size is per process
    steps = stage.training.max_steps
    return {
        "stage": stage.name, "type": stage.type, "from": stage.init.weights_from or "model",
        "datasets": {k: 100.0 * v / total_w for k, v in stage.datasets.items()}, "steps": steps,
        "tokens": tokens, "params": params, "trainable": trainable,
        "memory_bytes": None if memory is None else sum(memory.values()), "memory": memory,
        "tokens_per_step": tokens // max(1, steps),
        "tokens_per_param": tokens / params if (params and stage.spec.kind == "text") else None,
    }


def plan_rows(run: RunPlan | dict, world_size: int = 1) -> tuple[list[dict], dict]:
    """One row per stage, plus model and run facts. Pure Python.

    ``world_size``: processes training together (``torchrun --nproc_per_node`` × nodes); a
    row's ``tokens`` and ``tokens_per_step`` count all of them (``batch_size`` is per process),
    ``memory`` / ``memory_bytes`` are one device's (sharded by ``world_size`` under
    ``distributed.strategy: fsdp``, see :func:`llmlab.models.params.training_memory`).
    """
    run = as_run_plan(run, fresh=True)
    world_size = max(1, int(world_size))
    dist_cfg = run.settings.distributed
    strategy = dist_cfg.strategy
    groups, shards = dist_cfg.mesh_shape(world_size) if strategy == "fsdp" and world_size > 1 else (1, 1)
    statuses = run.statuses()
    vocab = vocab_size_for(run)
    params = model_params(run, vocab)
    rows = []
    for stage in run.stages:
        status, detail = statuses[stage.name]
        if stage.trains and status == "partial":  # resumed under another world size: does the global batch change?
            from llmlab.train.resharding import resume_note

            tr = stage.training
            note = resume_note(stage.layout.dir, {"batch_size": int(tr.batch_size), "world_size": world_size,
                                                  "gradient_accumulation_steps": int(tr.gradient_accumulation_steps)})
            detail = f"{detail}; {note}" if note else detail
        row = _training_row(run, stage, params, vocab, world_size, shards) if stage.trains \
            else _results_row(stage, params)
        row.update({"status": status, "status_detail": detail, "fingerprint": stage.fingerprint[:12]})
        if stage.trains and stage.training.epochs is not None:  # the epochs the steps were sized from
            row["epochs"] = stage.training.epochs
        rows.append(row)
    return rows, {"params": params, "vocab_size": vocab, "tokenizer": run_tokenizer_state(run),
                  "world_size": world_size, "strategy": strategy, "sharded": shards > 1,
                  **({"replicate": groups} if groups > 1 else {})}  # HSDP only


def default_world_size() -> int:
    """The world size to plan for when none is given: ``$WORLD_SIZE`` (set by torchrun and
    accelerate launch), else 1."""
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def world_line(facts: dict) -> str:
    """How the plan spreads over processes, e.g. ``2 processes, fsdp: parameters, gradients and
    optimizer state sharded 2 ways``."""
    n, strategy = facts["world_size"], facts["strategy"]
    if n == 1:
        return f"1 process (strategy {strategy} has no effect; plan another with --world-size N)"
    k = facts.get("replicate")  # present under HSDP only
    if k:
        return (f"{n} processes, hsdp: {k} replica groups of {n // k} processes; parameters, gradients and optimizer "
                f"state sharded {n // k} ways inside each group, replicated across groups")
    if facts["sharded"]:
        return f"{n} processes, fsdp: parameters, gradients and optimizer state sharded {n} ways"
    return f"{n} processes, ddp: every process holds the whole model"


def memory_table(rows: list[dict], facts: dict) -> Table | None:
    """Each training stage's per-device memory estimate by part (None when no row has one)."""
    rows = [r for r in rows if r["memory"]]
    if not rows:
        return None
    parts = ("weights", "grads", "optimizer", "activations", "frozen", "gathered", "runtime")
    n = facts["world_size"]
    t = Table(title=f"memory per device: {n} process{'es' if n > 1 else ''}, "
                    f"{'fsdp (sharded)' if facts['sharded'] else 'whole model on each'}")
    for col in ("stage", *parts, "total"):
        t.add_column(col)
    for r in rows:
        m = r["memory"]
        t.add_row(r["stage"], *(fmt_bytes(m[k]) if m[k] else "-" for k in parts), fmt_bytes(sum(m.values())))
    return t
