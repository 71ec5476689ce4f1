"""``auto`` optimizer values (the schema's defaults of ``optimizer.lr``, ``optimizer.weight_decay`` and
``scheduler.warmup_steps``) resolved into numbers, once, at recipe resolution.

The rule (issue 27: a recipe with no optimizer keys should learn as well as the best of a sweep):

* ``lr``: in a ``pretrain`` stage with ``adamw`` / ``adamw_8bit`` on a model built from ``arch``,
  ``min(3e-3, 6e-4 × (8.5e7 / N)^(1/3))`` with N the non-embedding parameters. GPT-3's learning
  rates by model size (Brown et al. 2020, "Language Models are Few-Shot Learners", table 2.1:
  6e-4 for GPT-3 Small, 85 M non-embedding parameters, down to 0.6e-4 at 175 B) fall as N^-0.32
  on a log-log fit; the rule follows that power law down to small models and caps it at 3e-3
  (benchmarks/vs_litgpt.py --sweep: 8e-3 is unstable on the 5 M benchmark model). It gives 1.8e-3
  for that model and 2.9e-3 for the quick-start's.
* ``weight_decay``: 0.1 (GPT-3, LLaMA) where the ``lr`` rule applied.
* ``warmup_steps``: where the ``lr`` rule applied, ``min(2 / (1 - beta2), max_steps // 10)``: the
  untuned linear warm-up of Ma & Yarats (2021, "On the adequacy of untuned warmup for adaptive
  optimization": 2 / (1 - beta2) steps, 40 at beta2 0.95), at most a tenth of the stage.
* Everywhere else (fine-tuning stages, other optimizers, pretrained models) and for every key of a
  stage that pins ``lr``: the values from before ``auto`` existed (:data:`LEGACY`), so a recipe that
  gives ``lr`` keeps its meaning and its fingerprints byte for byte.

The numbers go into the resolved recipe (recipe.resolved.yaml), so fingerprints hash them, stage.json
records them and ``llmlab plan`` shows them (:func:`auto_notes`).
"""

from __future__ import annotations

AUTO = "auto"

#: what each ``auto`` meant before the rule existed (and still means where the rule does not apply)
LEGACY = {"lr": 3e-4, "weight_decay": 0.0, "warmup_steps": 0}

#: optimizers the ``lr`` rule is for (their lr is AdamW's; adafactor's, lion's and muon's are not)
RULE_OPTIMIZERS = ("adamw", "adamw_8bit")

#: GPT-3 Small (Brown et al. 2020, table 2.1): non-embedding parameters and learning rate
ANCHOR_PARAMS, ANCHOR_LR = 8.5e7, 6e-4
LR_CAP = 3e-3
WEIGHT_DECAY = 0.1


def auto_lr(non_embedding_params: int) -> float:
    """``min(3e-3, 6e-4 × (8.5e7 / N)^(1/3))`` for N non-embedding parameters (N >= 1)."""
    return float(min(LR_CAP, ANCHOR_LR * (ANCHOR_PARAMS / max(int(non_embedding_params), 1)) ** (1 / 3)))


def auto_warmup(beta2: float, max_steps: int | None) -> int:
    """``min(2 / (1 - beta2), max_steps // 10)`` steps (Ma & Yarats 2021); no cap when max_steps is unknown."""
    steps = round(2.0 / (1.0 - float(beta2)))
    return int(steps if max_steps is None else min(steps, int(max_steps) // 10))


def non_embedding_parameters(model_cfg: dict) -> int:
    """The model's parameters less its token embedding and output projection (counted at vocabulary 0)."""
    from llmlab.models.params import count_parameters

    return count_parameters(model_cfg, 0)


def _rule_applies(resolved: dict, stage: dict, opt: dict) -> bool:
    model = resolved.get("model")
    return (stage.get("type") == "pretrain" and opt.get("name", "adamw") in RULE_OPTIMIZERS
            and isinstance(model, dict) and bool(model.get("arch")) and not model.get("from_pretrained"))


def resolve_auto_optimizer(resolved: dict) -> None:
    """Replace every ``auto`` in the stages' ``optimizer`` and ``scheduler`` sections of ``resolved``
    (in place) by its number (the module docstring's rule)."""
    for stage in (resolved.get("stages") or {}).values():
        if not isinstance(stage, dict) or not isinstance(stage.get("optimizer"), dict):
            continue
        opt, sched = stage["optimizer"], stage.get("scheduler") if isinstance(stage.get("scheduler"), dict) else {}
        rule = opt.get("lr") == AUTO and _rule_applies(resolved, stage, opt)
        if opt.get("lr") == AUTO:
            opt["lr"] = auto_lr(non_embedding_parameters(resolved["model"])) if rule else LEGACY["lr"]
        if opt.get("weight_decay") == AUTO:
            opt["weight_decay"] = WEIGHT_DECAY if rule else LEGACY["weight_decay"]
        if sched.get("warmup_steps") == AUTO:
            steps = stage.get("max_steps") if isinstance(stage.get("max_steps"), int) else None
            sched["warmup_steps"] = auto_warmup(opt.get("beta2") or 0.95, steps) if rule else LEGACY["warmup_steps"]


def unresolved(value, key: str):
    """``value``, or :data:`LEGACY` ``[key]`` where it is still ``auto`` (a section built outside
    recipe resolution, e.g. in a test, has no model or stage to apply the rule to)."""
    return LEGACY[key] if value == AUTO else value


def auto_notes(resolved: dict) -> list[str]:
    """One line per stage whose optimizer values are the rule's (``lr``, ``weight_decay`` and
    ``warmup_steps`` all equal to what ``auto`` resolves to there): the numbers and their source,
    for ``llmlab plan``. (A recipe pinning exactly those three numbers reads the same.)"""
    out = []
    for name, stage in (resolved.get("stages") or {}).items():
        if not isinstance(stage, dict) or not isinstance(stage.get("optimizer"), dict):
            continue
        opt, sched = stage["optimizer"], stage.get("scheduler") if isinstance(stage.get("scheduler"), dict) else {}
        if not _rule_applies(resolved, stage, opt):
            continue
        steps = stage.get("max_steps") if isinstance(stage.get("max_steps"), int) else None
        lr = auto_lr(non_embedding_parameters(resolved["model"]))
        warm = auto_warmup(opt.get("beta2") or 0.95, steps)
        if opt.get("lr") == lr and opt.get("weight_decay") == WEIGHT_DECAY and sched.get("warmup_steps", warm) == warm:
            out.append(f"{name}: lr auto = {lr:.3g} (GPT-3's lr ~ N^-1/3 in non-embedding parameters), "
                       f"weight_decay {WEIGHT_DECAY:g}, warmup_steps {sched.get('warmup_steps', 0)} (docs/recipes.md)")
    return out
