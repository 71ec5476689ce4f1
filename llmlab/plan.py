"""``llmlab plan``: the stage graph of a recipe without training anything.

Pure computation (no torch import): exact parameter counts from the config, a training-memory
estimate, tokens per stage, mixture shares, tokens per parameter, and the status of each stage in
the run directory (done / partial at step N / pending / stale with the reason).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.table import Table

from llmlab.console import make_console
from llmlab.recipe.schema import stage_defaults
from llmlab.schemafile import schema_filled
from llmlab.stage_specs import stage_spec, uses_reference


def run_tokenizer_state(recipe: dict) -> str:
    """``"current"``: the run directory holds the tokenizer this recipe describes; ``"changed"``:
    it holds one trained from a different tokenizer section or data (every stage will retrain);
    ``"absent"``: none has been trained yet."""
    from llmlab.fingerprint import tokenizer_fingerprint

    out = Path(recipe["output_dir"])
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        return "absent"
    marker = out / "tokenizer.fingerprint"
    current = marker.is_file() and marker.read_text().strip() == tokenizer_fingerprint(recipe)
    return "current" if current else "changed"


def vocab_size_for(recipe: dict) -> int | None:
    """The vocabulary size the model will have: the run's tokenizer if it is the one this recipe
    describes, else the tokenizer section's vocab_size (an upper bound for a tokenizer still to be
    trained: BPE may stop short of it), else a local tokenizer.json's size; None if unknown."""
    out = Path(recipe["output_dir"]) / "tokenizer" / "tokenizer.json"
    tok = recipe["tokenizer"]
    candidates = [out] if run_tokenizer_state(recipe) == "current" else []
    if tok.get("from_pretrained"):
        candidates.append(Path(str(tok["from_pretrained"])) / "tokenizer.json")
    for p in candidates:
        if p.is_file():
            data = json.loads(p.read_text())
            vocab = data.get("model", {}).get("vocab", {})
            ids = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
            return max(ids) + 1 if ids else None
    if tok.get("train"):
        return int(schema_filled("#/properties/tokenizer/properties/train", tok["train"])["vocab_size"])
    return None


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


def pretrained_lora_trainable(source: str, lora_cfg: dict) -> int | None:
    """Trainable LoRA parameters on a local ``from_pretrained`` checkpoint (its config.json or GGUF
    metadata names the family, the headers give the shapes); None when they cannot be known without
    loading."""
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
    spec = lora_spec(lora_cfg)
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


def stage_tokens(cfg: dict) -> int:
    """Tokens a stage processes (an upper bound where batches are padded); keys absent from ``cfg``
    take the schema's defaults."""
    spec = stage_spec(cfg["type"])
    cfg = {**stage_defaults(cfg["type"]), **cfg}
    per_seq = int(cfg.get("seq_len") or 0)
    n = int(cfg["max_steps"]) * int(cfg["batch_size"]) * int(cfg["gradient_accumulation_steps"])
    n *= (spec.sequences_per_example + spec.extra_sequences_per_example) * (
        int(cfg[spec.samples_key]) if spec.samples_key else 1)
    if spec.generates:
        per_seq = per_seq or int(cfg["max_new_tokens"])
    return n * per_seq


def _trained_lora(recipe: dict, name: str) -> dict | None:
    """The LoRA config stage ``name`` trains: its own, or — for a stage without one whose ``from``
    stage kept its adapter unmerged (``merge: false``) — that adapter's, which it continues
    (the rule of :class:`llmlab.runplan.StageInit`); None when it trains every parameter."""
    from llmlab.runplan import trained_lora

    return trained_lora(recipe["stages"], name)[0]


def _exactness(recipe: dict, facts: dict) -> str:
    """How exact the parameter count is: exact with the run's tokenizer or a pretrained one; with
    a tokenizer still to be trained, an upper bound (its vocabulary may come out smaller)."""
    if facts["params"] is None:
        return "unknown"
    if facts["tokenizer"] != "current" and recipe["tokenizer"].get("train"):
        return f"at most {facts['params']}: exact once the tokenizer is trained"
    return f"exact: {facts['params']}"


def model_params(recipe: dict, vocab: int | None) -> int | None:
    """The model's parameter count: exact from the config of an ``arch`` model (given the
    vocabulary), from the safetensors headers of a local ``from_pretrained`` checkpoint; None when
    unknown (no vocabulary yet, or a hub id not in the local cache)."""
    model_cfg = recipe["model"]
    if model_cfg.get("arch") and vocab:
        from llmlab.models.params import count_parameters

        return count_parameters(model_cfg, vocab)
    if model_cfg.get("from_pretrained"):
        shapes = pretrained_shapes(str(model_cfg["from_pretrained"]))
        return _numel(shapes) if shapes is not None else None
    return None


def frozen_copies(recipe: dict, name: str) -> int:
    """Whole frozen models stage ``name`` holds beside the one it trains: the reference of a dpo
    stage (not of its reference-free simpo / cpo) or a kto stage (:func:`llmlab.stage_specs.uses_reference`), of a grpo stage with ``kl_beta`` > 0 and of a ppo stage with a KL penalty — none when the
    policy trains LoRA and has no ``reference_from`` (the reference is then the base with its
    adapters disabled, :mod:`llmlab.stages.reference`) — and a ppo stage's reward models read from a
    reward stage (same architecture, so about the policy's size)."""
    cfg = recipe["stages"][name]
    kind = cfg["type"]
    preference = uses_reference(cfg)  # dpo (not simpo / cpo) and kto keep one; orpo and reward do not
    wants_ref = (bool(preference) if preference is not None else
                 (kind == "grpo" and float(cfg["kl_beta"]) > 0)
                 or (kind == "ppo" and (float(cfg["kl_coef"]) > 0 or cfg.get("kl_target") is not None)))
    ref = int(wants_ref and (cfg.get("reference_from") is not None or _trained_lora(recipe, name) is None))
    rewards = sum(1 for r in cfg.get("reward") or [] if r.get("from")) if kind == "ppo" else 0
    return ref + rewards


def stage_memory(recipe: dict, name: str, params: int | None, vocab: int | None,
                 shards: int = 1, device: str | None = None) -> tuple[int | None, dict[str, int] | None]:
    """``(trainable parameters, per-device memory by part in bytes)`` of training stage ``name``
    (:func:`llmlab.models.params.training_memory`; ``shards`` > 1 under FSDP; the frozen models of
    :func:`frozen_copies`; on a CPU ``device`` — the recipe's ``device`` when None, ``auto`` planned
    as a CPU — the process's fixed cost :data:`llmlab.models.params.CPU_RUNTIME_BYTES`). The memory
    is None when the model's size is unknown."""
    model_cfg, cfg = recipe["model"], recipe["stages"][name]
    trainable = params
    lora = _trained_lora(recipe, name)
    if lora and model_cfg.get("arch") and vocab:
        from llmlab.models.params import count_lora_parameters

        trainable = count_lora_parameters(model_cfg, vocab, lora)
    elif lora:  # from_pretrained: from the checkpoint's headers, else unknown (not all)
        trainable = pretrained_lora_trainable(str(model_cfg.get("from_pretrained")), lora)
    from llmlab.models.params import CPU_RUNTIME_BYTES, pretrained_dims, training_memory

    dims = None
    if params and model_cfg.get("from_pretrained"):  # activations from the checkpoint's shapes
        local = _local_checkpoint(str(model_cfg["from_pretrained"]))
        shapes = pretrained_shapes(local) if local else None
        dims = pretrained_dims(shapes) if shapes else None
        if dims is None:
            return trainable, None
        model_cfg, vocab = {**model_cfg, "from_pretrained": local}, vocab or dims["vocab"]
    if not (params and vocab):
        return trainable, None

    seq = int(cfg.get("seq_len") or model_cfg.get("max_seq_len", 512))
    spec = stage_spec(cfg["type"])  # grpo: every prompt's group_size completions go through the model
    batch = int(cfg["batch_size"]) * spec.sequences_per_example * (int(cfg[spec.samples_key]) if spec.samples_key else 1)
    cpu = (device or recipe["device"]) != "cuda"
    return trainable, training_memory(model_cfg, vocab, batch, seq, trainable,
                                      (cfg.get("optimizer") or {}).get("name", "adamw"),
                                      recipe.get("precision", "auto"), shards=shards,
                                      frozen_copies=frozen_copies(recipe, name),
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


def unfittable_message(recipe: dict, stages: list[str], device_type: str, shards: int = 1,
                       processes_here: int = 1, total: tuple[int, str] | None = None) -> str | None:
    """Why the run cannot start: the first training stage of ``stages`` whose planned peak memory
    (:func:`stage_memory`, times the ``processes_here`` processes sharing a CPU's RAM) is more than
    :data:`REFUSE_FACTOR` times the device's total memory (``total``: default :func:`total_memory`);
    None when every stage's estimate is below that, or unknown."""
    vocab = vocab_size_for(recipe)
    params = model_params(recipe, vocab)
    for name in stages:
        if not stage_spec(recipe["stages"][name]["type"]).trains:
            continue
        _, parts = stage_memory(recipe, name, params, vocab, shards=shards, device=device_type)
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


def plan_rows(recipe: dict, world_size: int = 1) -> tuple[list[dict], dict]:
    """One row per stage, plus model and run facts. Pure Python.

    ``world_size``: processes training together (``torchrun --nproc_per_node`` × nodes); a
    row's ``tokens`` and ``tokens_per_step`` count all of them (``batch_size`` is per process),
    ``memory`` / ``memory_bytes`` are one device's (sharded by ``world_size`` under
    ``distributed.strategy: fsdp``, see :func:`llmlab.models.params.training_memory`).
    """
    from llmlab.runplan import build_run_plan

    run = build_run_plan(recipe)
    world_size = max(1, int(world_size))
    strategy = run.settings.distributed.strategy
    shards = world_size if strategy == "fsdp" else 1
    statuses = run.statuses()
    vocab = vocab_size_for(recipe)
    params = model_params(recipe, vocab)
    rows = []
    for stage in run.stages:
        name, cfg, spec = stage.name, stage.config, stage.spec
        status, detail = statuses[name]
        if not spec.trains:  # trains nothing: which models, on which data, and its status
            ds = list(stage.datasets)
            rows.append({"stage": name, "type": stage.type, "from": ", ".join(stage.params.models),
                         "datasets": {k: 100.0 / len(ds) for k in ds}, "steps": 0, "tokens": 0, "params": params,
                         "trainable": 0, "memory_bytes": None, "memory": None, "tokens_per_step": 0,
                         "tokens_per_param": None, "status": status,
                         "status_detail": detail, "fingerprint": stage.fingerprint[:12]})
            continue
        weights = stage.datasets
        total_w = sum(weights.values()) or 1.0
        shares = {k: 100.0 * v / total_w for k, v in weights.items()}
        trainable, memory = stage_memory(recipe, name, params, vocab, shards)
        tokens = stage_tokens(cfg) * world_size  # batch_size is per process
        steps = stage.training.max_steps
        rows.append({
            "stage": name, "type": stage.type, "from": stage.init.weights_from or "model",
            "datasets": shares, "steps": steps, "tokens": tokens, "params": params,
            "trainable": trainable, "memory_bytes": None if memory is None else sum(memory.values()),
            "memory": memory, "tokens_per_step": tokens // max(1, steps),
            "tokens_per_param": tokens / params if (params and spec.kind == "text") else None,
            "status": status, "status_detail": detail, "fingerprint": stage.fingerprint[:12],
            # the epochs the steps were sized from (only where the recipe gives epochs)
            **({"epochs": stage.training.epochs} if stage.training.epochs is not None else {}),
        })
    return rows, {"params": params, "vocab_size": vocab, "tokenizer": run_tokenizer_state(recipe),
                  "world_size": world_size, "strategy": strategy, "sharded": shards > 1}


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


def plan_command(recipe_path: Path, output_dir: Path | None = None, overrides=(), resolved: bool = False,
                 fmt: str = "text", world_size: int | None = None) -> int:
    """``llmlab plan``: print the table (or the resolved recipe); 0 ok, 1 invalid recipe.

    ``world_size``: processes to plan for (None: :func:`default_world_size`)."""
    from llmlab.recipe import dump_resolved, load_for_command

    console = make_console()
    world_size = world_size or default_world_size()
    rec = load_for_command(recipe_path, overrides, output_dir, console, world_size=world_size)
    if rec is None:
        return 1
    if resolved:
        print(dump_resolved(rec), end="")
        return 0
    rows, facts = plan_rows(rec, world_size)
    if fmt == "json":
        from llmlab.data.prepare import dataset_plan

        print(json.dumps({"rows": rows, **facts, "datasets": dataset_plan(rec, rows)}, indent=2))
        return 0
    arch = rec["model"].get("arch") or f"from_pretrained {rec['model'].get('from_pretrained')}"
    console.print(f"[bold]{rec['name']}[/]: {arch}, {_fmt_count(facts['params'])} parameters "
                  f"({_exactness(rec, facts)}), vocab {facts['vocab_size']}, run dir {rec['output_dir']}")
    console.print(world_line(facts))
    if facts["tokenizer"] == "changed":
        console.print("[yellow]the tokenizer in the run directory was trained from a different tokenizer section or "
                      "data: `llmlab run` retrains it and then every stage. To keep the finished run, restore the "
                      "recipe's tokenizer section (and its datasets) or give this recipe another output_dir.[/]")
    t = Table()
    for col in ("stage", "type", "from", "datasets (share)", "steps", "tokens", "tokens/step", "trainable",
                "memory est. per device", "tokens/param (Chinchilla 20)", "status"):
        t.add_column(col)
    for r in rows:
        ds = ", ".join(f"{k} {v:.0f}%" for k, v in r["datasets"].items())
        status = r["status"] + (f" ({r['status_detail']})" if r["status_detail"] else "")
        steps = str(r["steps"]) + (f" ({r['epochs']:g} epochs)" if r.get("epochs") is not None else "")
        t.add_row(r["stage"], r["type"], r["from"], ds, steps, _fmt_count(r["tokens"]),
                  _fmt_count(r["tokens_per_step"]), _fmt_count(r["trainable"]), fmt_bytes(r["memory_bytes"]),
                  "-" if r["tokens_per_param"] is None else f"{r['tokens_per_param']:.1f}", status)
    console.print(t)
    from llmlab.recipe.optim_auto import auto_notes

    for note in auto_notes(rec):  # optimizer values that `lr: auto` chose
        console.print(note)
    mem = memory_table(rows, facts)
    if mem is not None:
        console.print(mem)
    from llmlab.data.prepare import dataset_plan

    ds_rows = dataset_plan(rec, rows)
    if ds_rows:  # pretraining data: what the token stores hold once prepared (llmlab prepare)
        d = Table(title="pretraining data")
        for col in ("stage", "dataset", "documents", "tokens", "epochs seen"):
            d.add_column(col)
        for r in ds_rows:
            d.add_row(r["stage"], r["dataset"], "not prepared" if r["documents"] is None else f"{r['documents']:,}",
                      "-" if r["tokens"] is None else _fmt_count(r["tokens"]),
                      "-" if r["epochs"] is None else f"{r['epochs']:.2f}")
        console.print(d)
    return 0
