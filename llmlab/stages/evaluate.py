"""The ``evaluate`` stage type: measure earlier stages' final models side by side on held-out data.

An evaluate stage trains nothing. For each stage named in ``models`` it loads ``<stage>/final/``
(:func:`llmlab.inference.loading.load_for_inference`, so the chat-or-continuation rule is the same as
``llmlab eval``'s), reads the held-out rows (``eval_split``) of each dataset in ``datasets`` — at most
``max_samples`` of them, evenly spaced — and scores them with
:func:`llmlab.inference.evaluate.evaluate_model`:

- text: perplexity and bits per byte;
- conversation: perplexity on the assistant tokens;
- preference: ``logp_accuracy`` (in results.json also ``avg_logp_accuracy``, on per-token means:
  SimPO's and ORPO's reward; not a table column, which would not fit 80 columns); with
  ``reference_from``, the DPO implicit-reward ``reward_accuracy``
  and ``reward_margin`` (β = ``beta``); a reward-model stage is scored directly;
- prompt: ``num_samples`` sampled generations (sample ``i`` seeded with the recipe seed + ``i``),
  scored by the ``reward_from`` stage's reward model when given.

A reward-model stage in ``models`` is only evaluated on preference data; its other entries read
``{"skipped": reason}``. The numbers equal ``llmlab eval`` on the same model and rows.

Results go to ``<stage_dir>/results.json`` as ``{model: {dataset: metrics}}`` (non-finite numbers
written as null); :func:`comparison_table` renders the 1–2 headline metrics per dataset.

:class:`EvaluateStage` is the stage type's :class:`~llmlab.stages.base.Stage`; its inputs and status
rules (``inputs: models``, done when results.json is written) are
:func:`llmlab.fingerprint.models_inputs` and :func:`llmlab.fingerprint.results_stage_status`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from llmlab.fingerprint import models_inputs, results_stage_status
from llmlab.layout import StageLayout, write_json_atomic
from llmlab.runplan import RunPlan, RunSettings
from llmlab.stage_params import EvaluateParams
from llmlab.stage_specs import stage_spec
from llmlab.stages.base import Stage

EVALUATE = "evaluate"
RESULTS_FILE = stage_spec(EVALUATE).results_file

#: per dataset kind, the metrics shown in the comparison table (those that some model reports)
HEADLINE = {
    "text": ("perplexity", "bits_per_byte"),
    "conversation": ("perplexity",),
    "preference": ("logp_accuracy", "reward_accuracy", "nll_loss"),
    "prompt": ("mean_reward", "mean_completion_tokens"),
}
#: metrics where lower is better (the best value of a column is shown in bold)
LOWER_IS_BETTER = {"perplexity", "bits_per_byte", "bits_per_token", "mean_loss", "nll_loss"}
#: metrics where higher is better
HIGHER_IS_BETTER = {"logp_accuracy", "avg_logp_accuracy", "reward_accuracy", "reward_margin", "mean_reward"}

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class EvaluateError(ValueError):
    """An evaluate stage cannot run (a model stage without final/, a dataset without held-out rows);
    the message says which. A ValueError, so ``llmlab run`` reports it as a failed stage."""


def evaluate_inputs(cfg: dict) -> dict[str, str | None]:
    """The stages an evaluate stage reads (:func:`llmlab.fingerprint.models_inputs`)."""
    return models_inputs(cfg)


def evaluate_stage_status(stage_dir: Path, fp: dict) -> tuple[str, str]:
    """(status, detail) of an evaluate stage (:func:`llmlab.fingerprint.results_stage_status`)."""
    return results_stage_status(stage_dir, fp, RESULTS_FILE)


def evaluation_rows(recipe: dict, dataset: str, max_samples: int | None) -> tuple[str, list[dict]]:
    """``(kind, rows)``: the held-out rows of the recipe's dataset ``dataset`` in canonical form, at
    most ``max_samples`` of them, evenly spaced (what ``llmlab eval RUN -d DATASET --limit N`` reads).

    Raises:
        EvaluateError: the dataset cannot be loaded, has no held-out rows, or mixes row kinds.
    """
    from llmlab.data.sources import read_splits
    from llmlab.inference.datasets import normalize_row, spread

    try:  # a streamable source is streamed, holding only its held-out rows
        held_out = read_splits(recipe, dataset, ("eval",))["eval"]
    except (KeyError, ValueError) as e:
        raise EvaluateError(f"dataset {dataset!r}: {e}") from None
    if len(held_out) == 0:
        raise EvaluateError(f"dataset {dataset!r} has no held-out rows to evaluate on; give it an eval_split > 0")
    kinds: set[str] = set()
    rows = []
    for i, r in enumerate(held_out, 1):
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


def _device_and_dtype(settings: RunSettings) -> tuple[str | None, str | None]:
    """(device, dtype name) to load the models with: None where the run's setting is ``auto``."""
    dev = None if settings.device == "auto" else str(settings.device)
    return dev, _DTYPES.get(str(settings.precision))


def _load(stage_dir: Path, stage: str, allow_code: bool, device: str | None, dtype: str | None):
    from llmlab.inference.loading import ModelLoadError, load_for_inference

    final = StageLayout(stage_dir).final
    if not (final / "config.json").is_file():
        raise EvaluateError(f"stage {stage} has no finished output at {final}; run it first")
    try:
        return load_for_inference(stage_dir, allow_code=allow_code, device=device, dtype=dtype)
    except ModelLoadError as e:
        raise EvaluateError(f"stage {stage}: {e}") from None


def _same_vocab(a: Any, b: Any) -> bool:
    return a is None or b is None or a.get_vocab() == b.get_vocab()


def run_evaluate_stage(run_plan: RunPlan, name: str, stage_paths: dict[str, Path], tokenizer: Any = None,
                       allow_code: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Evaluate the evaluate stage ``name`` of a run plan; write and return its results.

    Args:
        run_plan: the run's plan (:func:`llmlab.runplan.build_run_plan`); stage ``name`` has
            ``type: evaluate``, its ``params`` are :class:`~llmlab.stage_params.EvaluateParams`.
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

    plan = run_plan.stage(name)
    if plan.type != EVALUATE:
        raise EvaluateError(f"stage {name} is a {plan.type} stage, not an evaluate stage")
    p: EvaluateParams = plan.params
    seed = int(run_plan.settings.seed)
    models, datasets = list(p.models), list(plan.datasets)
    if not models or not datasets:
        raise EvaluateError(f"stage {name}: nothing to evaluate (models: {models}, datasets: {datasets})")
    device, dtype = _device_and_dtype(run_plan.settings)
    settings = GenerationSettings(max_new_tokens=int(p.max_new_tokens), temperature=float(p.temperature), seed=seed)
    say = log or (lambda _msg: None)

    data = {ds: evaluation_rows(run_plan.recipe, ds, p.max_samples) for ds in datasets}
    kinds = {k for k, _ in data.values()}

    def load(stage: str, role: str):
        model, tok, is_chat = _load(Path(stage_paths[stage]), stage, allow_code, device, dtype)
        if not _same_vocab(tok, tokenizer):
            raise EvaluateError(f"stage {stage} ({role}): its tokenizer differs from the run's")
        return model, tok, is_chat

    reference = load(p.reference_from, "reference_from")[0] if p.reference_from and "preference" in kinds else None
    reward = load(p.reward_from, "reward_from") if p.reward_from and "prompt" in kinds else None

    results: dict[str, dict] = {}
    for stage in models:
        model, tok, is_chat = load(stage, "models")
        say(f"  evaluate {name}: {stage} on {', '.join(datasets)}")
        scorer = functools.partial(evaluate_model, model, tok, is_chat=is_chat, beta=float(p.beta),
                                   batch_size=int(p.batch_size), settings=settings, num_samples=int(p.num_samples))
        results[stage] = _score_datasets(scorer, is_reward_model(model), data, reference, reward, seed,
                                         f"stage {name}: {stage}")
        for ds, m in results[stage].items():
            if m.get("truncated"):  # never silent: the scores are of cut sequences
                say(f"  evaluate {name}: {stage} on {ds}: {m['truncated']} of {m['rows']} rows were longer than "
                    "the model's context and were cut from the left")
        del model, scorer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    out_dir = Path(stage_paths[name])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / RESULTS_FILE, results)
    return results


class EvaluateStage(Stage):
    """The ``evaluate`` stage type: trains nothing; :meth:`run` scores the ``models`` stages on the
    held-out data (:func:`run_evaluate_stage`) and writes ``results.json``."""

    type = EVALUATE

    def run(self, log: Callable[[str], None] | None = None) -> dict:
        """``{model_stage: {dataset: metrics}}``, also written to ``<stage_dir>/results.json``.

        Raises:
            EvaluateError: see :func:`run_evaluate_stage`.
        """
        ctx = self.ctx
        return run_evaluate_stage(ctx.run_plan, ctx.name, ctx.stage_paths, ctx.tokenizer, allow_code=ctx.allow_code,
                                  log=log)


def _score_datasets(scorer: Callable, reward_model: bool, data: dict[str, tuple[str, list]], reference, reward,
                    seed: int, where: str) -> dict[str, dict]:
    """``{dataset: metrics}`` of one model: ``scorer(rows, kind, reference=, reward_model=)`` per dataset
    (torch seeded with ``seed`` before each), or ``{"skipped": reason}`` for a reward model on
    non-preference data.

    Raises:
        EvaluateError: the scorer rejects a dataset (the message names ``where`` and the dataset).
    """
    import torch

    per: dict[str, dict] = {}
    for ds, (kind, rows) in data.items():
        if reward_model and kind != "preference":
            per[ds] = {"kind": kind, "rows": len(rows), "skipped": "a reward model only scores preference data"}
            continue
        torch.manual_seed(seed)
        try:
            metrics = scorer(rows, kind, reference=reference if kind == "preference" else None,
                             reward_model=reward if kind == "prompt" else None)
        except ValueError as e:
            raise EvaluateError(f"{where} on {ds}: {e}") from None
        per[ds] = _finite(metrics)
    return per


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
    dataset and metric (two header lines) for the headline metrics of each dataset's kind (:data:`HEADLINE`: text
    perplexity and bits per byte, conversation perplexity, preference logp and reward accuracy and
    the chosen replies' NLL per token, prompt mean reward and completion length) that at least one model reports. The best value of a
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
        t.add_column(f"{ds}\n{metric}", justify="right")  # two header lines: narrow enough for 8 columns
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
