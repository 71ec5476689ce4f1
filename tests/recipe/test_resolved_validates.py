"""A run's recipe.resolved.yaml (every default written out) validates as written and resolves to itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlab.recipe import dump_resolved, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_resolved_recipe_validates_as_written(recipe, tmp_path):
    resolved, errors = load_recipe(recipe, env={})
    assert not errors, errors
    out = tmp_path / "recipe.resolved.yaml"
    out.write_text("# resolved by llmlab\n" + dump_resolved(resolved))
    again, errors = load_recipe(out, env={})
    assert not errors, [str(e) for e in errors]
    assert again == resolved


def test_an_inapplicable_key_with_a_non_default_value_is_still_an_error(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: x\ntokenizer: {train: {vocab_size: 300}}\n"
                 "model: {arch: transformer, d_model: 32, n_layers: 1, n_heads: 2, max_seq_len: 32, "
                 "experts_per_token: 3}\n"
                 "datasets: {bible: {builtin: kjv, streaming: true, max_samples: 10}}\n"
                 "stages: {pretrain: {type: pretrain, datasets: {bible: 1.0}, max_steps: 1}}\n")
    _, errors = load_recipe(f, env={})
    msgs = " | ".join(str(e) for e in errors)
    assert "experts_per_token only applies" in msgs and "'streaming' only applies to a hub dataset" in msgs
