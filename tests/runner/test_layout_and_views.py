"""RunLayout / StageRecord (stage.json) and the typed config views (defaults from the schema)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmlab.config import OptimizerConfig, SchedulerConfig, TrainingConfig
from llmlab.layout import RunLayout, StageRecord, write_json_atomic
from llmlab.recipe import load_schema


def test_layout_spells_the_documented_run_directory(tmp_path):
    run = RunLayout(tmp_path)
    st = run.stage("sft")
    assert (run.resolved_recipe, run.tokenizer, run.tensorboard("sft")) == (
        tmp_path / "recipe.resolved.yaml", tmp_path / "tokenizer", tmp_path / "tensorboard" / "sft")
    assert st.checkpoint(300) == tmp_path / "sft" / "checkpoints" / "step-000300"
    assert (st.final, st.adapter, st.metrics, st.record, st.results) == tuple(
        tmp_path / "sft" / n for n in ("final", "adapter", "metrics.jsonl", "stage.json", "results.json"))
    assert st.latest_checkpoint_step() is None
    for step in (4, 12, 8):
        st.checkpoint(step).mkdir(parents=True)
    (st.checkpoints / ".tmp-step-000016-1").mkdir()
    assert st.latest_checkpoint_step() == 12


def test_stage_record_keys_while_running_and_when_done(tmp_path):
    rec = StageRecord(name="a", type="sft", status="running", fingerprint="f", parts={}, started_at="t",
                      max_steps=3, absent=frozenset({"models", "finished_at", "steps", "outputs"}))
    assert "models" not in rec.to_json() and "steps" not in rec.to_json() and rec.to_json()["max_steps"] == 3
    assert "absent" not in rec.to_json()
    rec.finish(finished_at="u", steps=3, outputs={"final": "x"})
    path = tmp_path / "stage.json"
    rec.write(path)
    data = json.loads(path.read_text())
    assert data["status"] == "done" and data["steps"] == 3 and data["outputs"] == {"final": "x"}
    assert "models" not in data
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]  # the temporary file was renamed


def test_stage_record_start_keeps_exactly_the_fields_given():
    """start(): the given fields are present (None as null), every other optional one absent until
    finish() sets it; stage.json keeps the dataclass's key order; an unknown field is refused."""
    rec = StageRecord.start("a", "sft", "f", {"config": {}}, "t", max_steps=3, init_path=None, versions={"x": "1"})
    assert rec.status == "running"
    assert list(rec.to_json()) == ["name", "type", "status", "fingerprint", "parts", "started_at", "versions",
                                   "max_steps", "init_path"]
    rec.finish(status="stopped", steps=2, first_eval=None)
    assert rec.status == "stopped" and rec.to_json()["steps"] == 2 and rec.to_json()["first_eval"] is None
    assert "finished_at" not in rec.to_json() and "models" not in rec.to_json()
    ev = StageRecord.start("e", "evaluate", "g", {}, "t", models=["a"], tokenizer_sha256=None)
    assert list(ev.to_json())[-2:] == ["tokenizer_sha256", "models"] and "max_steps" not in ev.to_json()
    with pytest.raises(TypeError, match="absent"):
        StageRecord.start("a", "sft", "f", {}, "t", absent=frozenset())
    with pytest.raises(TypeError, match="max_step"):
        StageRecord.start("a", "sft", "f", {}, "t", max_step=3)


def test_write_json_atomic_replaces_whole_files(tmp_path):
    p = tmp_path / "x.json"
    write_json_atomic(p, {"a": "é", "p": tmp_path})
    write_json_atomic(p, {"b": 1})
    assert json.loads(p.read_text(encoding="utf-8")) == {"b": 1}
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x.json"]


def test_views_take_the_schema_defaults_and_are_frozen():
    defs = load_schema()["$defs"]
    tc = TrainingConfig.from_dict({"type": "sft", "max_steps": 5})
    common = defs["stage_common"]["properties"]
    for key in ("batch_size", "gradient_accumulation_steps", "grad_clip", "eval_every", "eval_steps", "save_every",
                "keep_last", "save_best_only", "reset_optimizer"):
        assert getattr(tc, key) == common[key]["default"], key
    assert tc.log_every == load_schema()["properties"]["logging"]["properties"]["log_every"]["default"]
    assert TrainingConfig.from_dict({"max_steps": 5}, {"log_every": 3}).log_every == 3
    assert TrainingConfig.from_dict({"max_steps": 5, "log_every": 2}, {"log_every": 3}).log_every == 2
    assert TrainingConfig.from_dict({"max_steps": 5, "grad_clip": None}).grad_clip is None  # explicit null kept
    assert tc.optimizer.name == defs["optimizer_common"]["properties"]["name"]["default"]
    assert tc.scheduler.name == defs["scheduler_common"]["properties"]["name"]["default"]
    lion = OptimizerConfig.from_dict({"name": "lion", "lr": 1e-4})
    assert (lion.lr, lion.beta2, lion.rho) == (1e-4, defs["optimizer_lion"]["properties"]["beta2"]["default"], None)
    sophia = OptimizerConfig.from_dict({"name": "sophia"})
    assert sophia.hessian_update_every == defs["optimizer_sophia"]["properties"]["hessian_update_every"]["default"]
    assert SchedulerConfig.from_dict({"name": "polynomial"}).power == defs["scheduler_polynomial"]["properties"]["power"]["default"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        tc.max_steps = 6
    with pytest.raises(KeyError):
        TrainingConfig.from_dict({"type": "sft"})
