"""What ``llmlab eval`` takes from the stage a model came from (its preference loss and reference
model), and lm-evaluation-harness tasks on a loaded model."""

from __future__ import annotations

from typing import Any

#: the DPO beta of the implicit reward when neither --beta nor a dpo stage gives one
DEFAULT_BETA = 0.1


def stage_loss_settings(recipe: dict, loc: Any) -> dict | None:
    """The loss settings of the dpo, orpo or kto stage ``loc`` came from, so ``llmlab eval`` reports that
    stage's held-out numbers: ``beta``, ``loss`` (keyword arguments of
    :func:`llmlab.inference.evaluate.evaluate_model`: a dpo stage's ``loss_type``, ``label_smoothing``,
    ``rpo_alpha``, ``simpo_gamma``, ``cpo_alpha``; an orpo stage's ``loss_type="orpo"``; a kto stage's
    ``loss_type="kto"``, ``desirable_weight``, ``undesirable_weight``; schema defaults filled:
    :func:`llmlab.stage_params.params_of`) and ``reference``, its reference stage (``reference_from``,
    else the ``from`` stage; None for orpo and the reference-free simpo / cpo). None when the model is
    not such a stage's.

    Args:
        recipe: the run's recipe.resolved.yaml ({} when there is none).
        loc: the :class:`llmlab.inference.loading.ModelLocation` of the model.
    """
    from llmlab.stage_params import params_of
    from llmlab.stage_specs import REFERENCE_FREE_DPO_LOSSES

    cfg = (recipe.get("stages") or {}).get(loc.stage_name) if loc.stage_name else None
    kind = cfg.get("type") if cfg else None
    if kind not in ("dpo", "orpo", "kto") or loc.run_dir is None:
        return None
    p = params_of(kind, cfg)
    if kind == "orpo":
        return {"beta": float(p.beta), "loss": {"loss_type": "orpo"}, "reference": None}
    reference = p.reference_from or cfg.get("from")
    if kind == "kto":
        return {"beta": float(p.beta), "reference": reference,
                "loss": {"loss_type": "kto", "desirable_weight": float(p.desirable_weight),
                         "undesirable_weight": float(p.undesirable_weight)}}
    loss = {"loss_type": p.loss_type, "label_smoothing": float(p.label_smoothing), "rpo_alpha": float(p.rpo_alpha),
            "simpo_gamma": float(p.simpo_gamma), "cpo_alpha": float(p.cpo_alpha)}
    free = p.loss_type in REFERENCE_FREE_DPO_LOSSES
    return {"beta": float(p.beta), "loss": loss, "reference": None if free else reference}


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], batch_size: int = 8, limit: int | None = None) -> dict:
    """Run lm-evaluation-harness tasks on a loaded model (needs the optional ``lm-eval`` package and
    its tasks' data available locally).

    Raises:
        ImportError: lm-eval is not installed.
    """
    import lm_eval  # type: ignore
    from lm_eval.models.huggingface import HFLM  # type: ignore

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit)
    return {"results": res.get("results", {}), "versions": res.get("versions", {})}
