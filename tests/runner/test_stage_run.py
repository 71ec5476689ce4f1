"""Where a stage's weights start (llmlab.stage_run.init_weights): only from its StagePlan.init, the
one adapter-continuation rule that `llmlab plan` shows too."""

from __future__ import annotations

import copy

import pytest
import yaml

from llmlab.recipe import load_recipe_or_raise
from llmlab.runplan import build_run_plan
from llmlab.session import RunError
from llmlab.stage_run import init_weights
from tests.tiny import TINY


def _plan(tmp_path, mutate):
    rec = copy.deepcopy(TINY)
    rec["output_dir"] = "run"
    mutate(rec)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    plan = build_run_plan(load_recipe_or_raise(path, env={}))
    for stage in plan.stages:  # every stage finished: a final/ (and an adapter/, unused unless continued)
        stage.layout.final.mkdir(parents=True)
        (stage.layout.final / "config.json").write_text("{}")
    return plan


def test_an_unmerged_adapter_is_continued_on_its_base_through_a_chain(tmp_path):
    def mutate(rec):
        rec["stages"]["sft"]["lora"] = {"preset": "attention_only", "r": 4, "merge": False}
        rec["stages"]["dpo2"] = copy.deepcopy(rec["stages"]["dpo"])

    plan = _plan(tmp_path, mutate)
    run = plan.layout
    assert init_weights(plan, plan.stage("pretrain")) == (None, None)
    assert init_weights(plan, plan.stage("sft")) == (run.stage("pretrain").final, None)
    # dpo continues the adapter sft kept, dpo2 the one dpo saved; both on pretrain's weights, the adapter's base
    assert init_weights(plan, plan.stage("dpo")) == (run.stage("pretrain").final, run.stage("sft").adapter)
    assert init_weights(plan, plan.stage("dpo2")) == (run.stage("pretrain").final, run.stage("dpo").adapter)


def test_a_merged_adapter_or_a_stage_of_its_own_starts_from_final(tmp_path):
    plan = _plan(tmp_path, lambda rec: rec["stages"]["sft"].update(lora={"r": 4}))
    assert init_weights(plan, plan.stage("dpo")) == (plan.layout.stage("sft").final, None)


def test_an_input_without_final_is_refused(tmp_path):
    plan = _plan(tmp_path, lambda rec: None)
    (plan.layout.stage("sft").final / "config.json").unlink()
    with pytest.raises(RunError, match="stage sft has no finished output"):
        init_weights(plan, plan.stage("dpo"))
