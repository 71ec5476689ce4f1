"""The versions that ran a recipe are data in recipe.resolved.yaml and stage.json, and never make a
finished stage stale (they are no part of a fingerprint)."""

from __future__ import annotations

import copy
import json

import yaml

import llmlab
from llmlab import runner
from llmlab.fingerprint import stage_fingerprints
from llmlab.recipe import load_recipe, stage_order
from llmlab.commands.run import run_command
from llmlab.runner import package_versions
from llmlab.runplan import build_run_plan
from tests.tiny import TINY, write_recipe


def _one_stage() -> dict:
    rec = copy.deepcopy(TINY)
    rec["stages"] = {"pretrain": {**rec["stages"]["pretrain"], "max_steps": 4, "eval_every": 4, "save_every": 4}}
    return rec


def test_versions_are_recorded_as_data_and_do_not_make_a_done_stage_stale(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, _one_stage())
    assert run_command(recipe) == 0
    run = tmp_path / "run"
    resolved_text = (run / "recipe.resolved.yaml").read_text()
    resolved = yaml.safe_load(resolved_text)
    assert resolved["resolved_with"]["llmlab"] == llmlab.__version__
    assert {"python", "torch", "transformers"} <= set(resolved["resolved_with"])
    assert not resolved_text.lstrip().startswith("#")  # data, not a comment header
    record = json.loads((run / "pretrain" / "stage.json").read_text())
    assert record["versions"] == package_versions() and record["status"] == "done"

    # the written file is a recipe that validates, and its fingerprints are the run's
    again, errors = load_recipe(run / "recipe.resolved.yaml")
    assert errors == []
    original, _ = load_recipe(recipe)
    order = stage_order(original)
    assert stage_fingerprints(again, stage_order(again)) == stage_fingerprints(original, order)

    # a newer llmlab and torch: the finished stage is still done, and a second run trains nothing
    newer = {**package_versions(), "llmlab": "9.9.9", "torch": "99.0"}
    monkeypatch.setattr(runner, "package_versions", lambda: newer)
    assert build_run_plan(original).status("pretrain")[0] == "done"
    mtime = (run / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns
    assert run_command(recipe) == 0
    assert (run / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns == mtime
    assert yaml.safe_load((run / "recipe.resolved.yaml").read_text())["resolved_with"]["llmlab"] == "9.9.9"
    assert json.loads((run / "pretrain" / "stage.json").read_text())["versions"]["llmlab"] == llmlab.__version__
