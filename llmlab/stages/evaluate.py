"""The ``evaluate`` stage type: measure earlier stages' final models side by side on held-out data.

An evaluate stage trains nothing. For each stage named in ``models`` it loads ``<stage>/final/``
(:func:`llmlab.inference.loading.load_for_inference`, so the chat-or-continuation rule is the same as
``llmlab eval``'s), reads the held-out rows (``eval_split``) of each dataset in ``datasets`` — at most
``max_samples`` of them, evenly spaced — and scores them with
:func:`llmlab.inference.evaluate.evaluate_model`:

- text: perplexity and bits per byte;
- conversation: perplexity on the assistant tokens;
- preference: ``logp_accuracy``; with ``reference_from``, the DPO implicit-reward ``reward_accuracy``
  and ``reward_margin`` (β = ``beta``); a reward-model stage is scored directly;
- prompt: ``num_samples`` sampled generations (sample ``i`` seeded with the recipe seed + ``i``),
  scored by the ``reward_from`` stage's reward model when given.

A reward-model stage in ``models`` is only evaluated on preference data; its other entries read
``{"skipped": reason}``. The numbers equal ``llmlab eval`` on the same model and rows.

Results go to ``<stage_dir>/results.json`` as ``{model: {dataset: metrics}}`` (non-finite numbers
written as null); :func:`comparison_table` renders the 1–2 headline metrics per dataset.

Nothing here imports torch at module level, so the fingerprint and plan code may use
:func:`evaluate_inputs` and :func:`evaluate_stage_status` cheaply.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

EVALUATE = "evaluate"
RESULTS_FILE = "results.json"

#: per dataset kind, the metrics shown in the comparison table (those that some model reports)
HEADLINE = {
    "text": ("perplexity", "bits_per_byte"),
    "conversation": ("perplexity",),
    "preference": ("logp_accuracy", "reward_accuracy"),
    "prompt": ("mean_reward", "mean_completion_tokens"),
}
#: metrics where lower is better (the best value of a column is shown in bold)
LOWER_IS_BETTER = {"perplexity", "bits_per_byte", "bits_per_token", "mean_loss"}
#: metrics where higher is better
HIGHER_IS_BETTER = {"logp_accuracy", "reward_accuracy", "reward_margin", "mean_reward"}

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class EvaluateError(ValueError):
    """An evaluate stage cannot run (a model stage without final/, a dataset without held-out rows);
    the message says which. A ValueError, so ``llmlab run`` reports it as a failed stage."""


def evaluate_inputs(cfg: dict) -> dict[str, str | None]:
    """The stages an evaluate stage reads, in the shape of :func:`llmlab.fingerprint.stage_inputs`:
    ``{"from": None, "models[0]": STAGE, ..., "reference_from": STAGE, "reward_from": STAGE}``
    (the last two only when set). ``from`` is None: an evaluate stage starts from no weights."""
    inputs: dict[str, str | None] = {"from": None}
    for i, m in enumerate(cfg.get("models") or []):
        inputs[f"models[{i}]"] = m
    for key in ("reference_from", "reward_from"):
        if cfg.get(key):
            inputs[key] = cfg[key]
    return inputs


def evaluate_stage_status(stage_dir: Path, fp: dict) -> tuple[str, str]:
    """(status, detail) of an evaluate stage: ``done`` (stage.json says done with this fingerprint and
    results.json exists), ``stale`` (another fingerprint; detail says what changed) or ``pending``.
    The counterpart of :func:`llmlab.fingerprint.stage_status`, which looks for final/ and steps."""
    from llmlab.fingerprint import explain_change, read_stage_json

    info = read_stage_json(stage_dir)
    if info is None:
        return "pending", ""
    if info.get("fingerprint") != fp["fingerprint"]:
        return "stale", explain_change(info.get("parts"), fp["parts"])
    if info.get("status") == "done":
        if (stage_dir / RESULTS_FILE).is_file():
            return "done", RESULTS_FILE
        return "pending", f"{RESULTS_FILE} is missing"
    return "pending", "started, not finished"


def evaluation_rows(recipe: dict, dataset: str, max_samples: int | None) -> tuple[str, list[dict]]:
    """``(kind, rows)``: the held-out rows of the recipe's dataset ``dataset`` in canonical form, at
    most ``max_samples`` of them, evenly spaced (what ``llmlab eval RUN -d DATASET --limit N`` reads).

    Raises:
        EvaluateError: the dataset cannot be loaded, has no held-out rows, or mixes row kinds.
    """
    from llmlab.data.sources import load_named_dataset
    from llmlab.inference.datasets import normalize_row, spread

    try:
        held_out = load_named_dataset(recipe, dataset).eval
    except (KeyError, ValueError) as e:
        raise EvaluateError(f"dataset {dataset!r}: {e}") from None
    if len(held_out) == 0:
        raise EvaluateError(f"dataset {dataset!r} has no held-out rows to evaluate on; give it an eval_split > 0")
    kinds: set[str] = set()
    rows = []
    for i, r in enumerate(held_out.to_list(), 1):
        try:
            k, row = normalize_row(dict(r))
        except ValueError as e:
            raise EvaluateError(f"dataset {dataset!r}: held-out row {i}: {e}") from None
        kinds.add(k)
        rows.append(row)
    if len(kinds) > 1:
        raise EvaluateError(f"dataset {dataset!r}: held-out rows of several kinds ({', '.join(sorted(kinds))})")
    return kinds.pop(), spread(rows, max_samples)


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None (results.json stays strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _device_and_dtype(recipe: dict) -> tuple[str | None, str | None]:
    device = recipe.get("device", "auto")
    dev = None if device in (None, "auto") else str(device)
    return dev, _DTYPES.get(str(recipe.get("precision", "auto")))


def _load(stage_dir: Path, stage: str, allow_code: bool, device: str | None, dtype: str | None):
    from llmlab.inference.loading import ModelLoadError, load_for_inference

    if not (stage_dir / "final" / "config.json").is_file():
        raise EvaluateError(f"stage {stage} has no finished output at {stage_dir / 'final'}; run it first")
    try:
        return load_for_inference(stage_dir, allow_code=allow_code, device=device, dtype=dtype)
    except ModelLoadError as e:
        raise EvaluateError(f"stage {stage}: {e}") from None


def _same_vocab(a: Any, b: Any) -> bool:
    return a is None or b is None or a.get_vocab() == b.get_vocab()


def run_evaluate_stage(recipe: dict, name: str, stage_paths: dict[str, Path], tokenizer: Any = None,
                       allow_code: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Evaluate the evaluate stage ``name`` of a resolved recipe; write and return its results.

    Args:
        recipe: the resolved recipe (``recipe["stages"][name]`` has ``type: evaluate``).
        name: the evaluate stage.
        stage_paths: stage name → stage directory (``<output_dir>/<stage>``); the model stages must
            have a ``final/``, and ``stage_paths[name]`` receives ``results.json``.
        tokenizer: the run's tokenizer. Each model is scored with the tokenizer saved beside its
            weights (as ``llmlab eval`` does); this one, when given, must have the same vocabulary.
        allow_code: permit ``trust_remote_code`` when loading.
        log: called with one progress line per model (e.g. ``console.print``).

    Returns:
        ``{model_stage: {dataset: metrics}}`` in ``models`` × ``datasets`` order; the metrics are
        :func:`llmlab.inference.evaluate.evaluate_model`'s, or ``{"skipped": reason}`` for a
        reward model on non-preference data. Non-finite numbers are None.

    Raises:
        EvaluateError: a model stage has no final/, a dataset has no held-out rows, or a tokenizer
            differs from the run's.
    """
    import torch

    from llmlab.inference.evaluate import evaluate_model
    from llmlab.inference.generation import GenerationSettings
    from llmlab.inference.loading import is_reward_model

    cfg = recipe["stages"][name]
    if cfg.get("type") != EVALUATE:
        raise EvaluateError(f"stage {name} is a {cfg.get('type')} stage, not an evaluate stage")
    seed = int(recipe.get("seed", 0) or 0)
    models = list(cfg.get("models") or [])
    datasets = list(cfg.get("datasets") or {})
    if not models or not datasets:
        raise EvaluateError(f"stage {name}: nothing to evaluate (models: {models}, datasets: {datasets})")
    device, dtype = _device_and_dtype(recipe)
    max_samples = cfg.get("max_samples", 200)
    batch_size = int(cfg.get("batch_size", 8))
    beta = float(cfg.get("beta", 0.1))
    settings = GenerationSettings(max_new_tokens=int(cfg.get("max_new_tokens", 32)),
                                  temperature=float(cfg.get("temperature", 0.8)), seed=seed)
    num_samples = int(cfg.get("num_samples", 8))
    say = log or (lambda _msg: None)

    data = {ds: evaluation_rows(recipe, ds, max_samples) for ds in datasets}
    kinds = {k for k, _ in data.values()}

    def load(stage: str, role: str):
        model, tok, is_chat = _load(Path(stage_paths[stage]), stage, allow_code, device, dtype)
        if not _same_vocab(tok, tokenizer):
            raise EvaluateError(f"stage {stage} ({role}): its tokenizer differs from the run's")
        return model, tok, is_chat

    reference = reward = None
    if cfg.get("reference_from") and "preference" in kinds:
        reference = load(cfg["reference_from"], "reference_from")[0]
    if cfg.get("reward_from") and "prompt" in kinds:
        reward = load(cfg["reward_from"], "reward_from")

    results: dict[str, dict] = {}
    for stage in models:
        model, tok, is_chat = load(stage, "models")
        say(f"  evaluate {name}: {stage} on {', '.join(datasets)}")
        per: dict[str, dict] = {}
        rm = is_reward_model(model)
        for ds in datasets:
            kind, rows = data[ds]
            if rm and kind != "preference":
                per[ds] = {"kind": kind, "rows": len(rows), "skipped": "a reward model only scores preference data"}
                continue
            torch.manual_seed(seed)
            try:
                metrics = evaluate_model(model, tok, rows, kind, is_chat=is_chat,
                                         reference=reference if kind == "preference" else None,
                                         reward_model=reward if kind == "prompt" else None, beta=beta,
                                         batch_size=batch_size, settings=settings, num_samples=num_samples)
            except ValueError as e:
                raise EvaluateError(f"stage {name}: {stage} on {ds}: {e}") from None
            per[ds] = _finite(metrics)
        results[stage] = per
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    out_dir = Path(stage_paths[name])
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out_dir / RESULTS_FILE, results)
    return results


def _fmt(metric: str, value: Any) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if metric == "perplexity":
        return f"{value:.2f}"
    if metric == "mean_completion_tokens":
        return f"{value:.1f}"
    return f"{value:.3f}"


def comparison_table(results: dict, title: str | None = None) -> Table:
    """A table of ``results`` (``{model: {dataset: metrics}}``): one row per model, one column per
    ``dataset:metric`` for the headline metrics of each dataset's kind (:data:`HEADLINE`: text
    perplexity and bits per byte, conversation perplexity, preference logp and reward accuracy,
    prompt mean reward and completion length) that at least one model reports. The best value of a
    column is bold when there are several models; a missing or skipped value is ``-``."""
    datasets: dict[str, str] = {}
    for per in results.values():
        for ds, m in per.items():
            if isinstance(m, dict) and ds not in datasets and m.get("kind") in HEADLINE:
                datasets[ds] = m["kind"]
    columns: list[tuple[str, str]] = []
    for ds, kind in datasets.items():
        for metric in HEADLINE[kind]:
            if any(isinstance((per.get(ds) or {}).get(metric), (int, float)) for per in results.values()):
                columns.append((ds, metric))
    t = Table(title=title or "evaluation")
    t.add_column("model")
    for ds, metric in columns:
        t.add_column(f"{ds}:{metric}", justify="right")
    best: dict[tuple[str, str], float] = {}
    if len(results) > 1:
        for col in columns:
            vals = [v for per in results.values()
                    if isinstance(v := (per.get(col[0]) or {}).get(col[1]), (int, float))]
            if vals and col[1] in LOWER_IS_BETTER:
                best[col] = min(vals)
            elif vals and col[1] in HIGHER_IS_BETTER:
                best[col] = max(vals)
    for model, per in results.items():
        cells = []
        for col in columns:
            v = (per.get(col[0]) or {}).get(col[1])
            text = _fmt(col[1], v)
            cells.append(f"[bold]{text}[/]" if col in best and v == best[col] and text != "-" else text)
        t.add_row(model, *cells)
    return t
