"""``lr: auto`` (the default): resolved once into numbers by the rule of llmlab.recipe.optim_auto in a
pretrain stage with AdamW on an ``arch`` model; a pinned ``lr`` keeps today's meaning of every key."""

import copy

import pytest
import yaml

from llmlab.recipe import load_recipe_or_raise
from llmlab.recipe.optim_auto import LEGACY, auto_lr, auto_notes, auto_warmup, non_embedding_parameters
from tests.tiny import TINY


def _resolve(tmp_path, recipe: dict) -> dict:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output_dir": str(tmp_path / "run")}, sort_keys=False))
    return load_recipe_or_raise(path, env={})


def _without_optimizer(recipe: dict) -> dict:
    rec = copy.deepcopy(recipe)
    for st in rec["stages"].values():
        st.pop("optimizer", None)
        st.pop("scheduler", None)
    return rec


def test_the_rule_is_gpt3s_power_law_capped():
    assert auto_lr(85_000_000) == pytest.approx(6e-4)
    assert auto_lr(85_000_000 * 8) == pytest.approx(3e-4)  # (1/8)^(1/3) = 1/2
    assert auto_lr(1000) == 3e-3  # the cap
    assert auto_warmup(0.95, None) == 40 and auto_warmup(0.95, 100) == 10 and auto_warmup(0.99, 10**6) == 200


def test_no_optimizer_keys_pretrain_gets_the_rule_finetuning_keeps_the_old_defaults(tmp_path):
    rec = _resolve(tmp_path, _without_optimizer(TINY))
    pre = rec["stages"]["pretrain"]
    n = non_embedding_parameters(rec["model"])
    assert 0 < n < 10**7
    assert pre["optimizer"]["lr"] == auto_lr(n)
    assert pre["optimizer"]["weight_decay"] == 0.1
    assert pre["scheduler"]["warmup_steps"] == auto_warmup(pre["optimizer"]["beta2"], pre["max_steps"])
    for name, st in rec["stages"].items():
        if name != "pretrain" and isinstance(st.get("optimizer"), dict):
            assert st["optimizer"]["lr"] == LEGACY["lr"] and st["optimizer"]["weight_decay"] == LEGACY["weight_decay"]
            assert st["scheduler"].get("warmup_steps", 0) == LEGACY["warmup_steps"]
    assert auto_notes(rec) and auto_notes(rec)[0].startswith("pretrain: lr auto = ")


def test_a_pinned_lr_keeps_todays_meaning_of_the_other_keys(tmp_path):
    rec = _without_optimizer(TINY)
    rec["stages"]["pretrain"]["optimizer"] = {"name": "adamw", "lr": 1e-3}
    rec["stages"]["pretrain"]["scheduler"] = {"name": "cosine"}
    pre = _resolve(tmp_path, rec)["stages"]["pretrain"]
    assert pre["optimizer"]["lr"] == 1e-3
    assert pre["optimizer"]["weight_decay"] == 0.0 and isinstance(pre["optimizer"]["weight_decay"], float)
    assert pre["scheduler"]["warmup_steps"] == 0 and isinstance(pre["scheduler"]["warmup_steps"], int)


def test_other_optimizers_keep_the_old_default_lr(tmp_path):
    rec = _without_optimizer(TINY)
    rec["stages"]["pretrain"]["optimizer"] = {"name": "lion"}
    pre = _resolve(tmp_path, rec)["stages"]["pretrain"]
    assert pre["optimizer"]["lr"] == LEGACY["lr"] and pre["optimizer"]["weight_decay"] == 0.0
