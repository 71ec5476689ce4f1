"""``epochs:`` resolves into ``max_steps`` = ceil(epochs × training rows / global batch), and
behaves as max_steps does for fingerprints (raising it extends the stage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmlab.fingerprint import stage_fingerprints
from llmlab.recipe import dump_resolved, load_recipe

ROWS = 30  # training rows of the local dataset (eval_split 0: all of them train)

RECIPE = """\
name: ep
tokenizer:
  train: {{datasets: [chat], vocab_size: 300}}
model:
  arch: transformer
  d_model: 32
  n_layers: 1
  n_heads: 2
  max_seq_len: 32
datasets:
  chat: {{path: chat.jsonl, format: messages}}
stages:
  sft:
    type: sft
    datasets: {{chat: 1.0}}
    batch_size: 4
    gradient_accumulation_steps: 2
{extra}"""


def _recipe(tmp_path: Path, extra: str) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(ROWS)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(extra=extra))
    return path


def _load(path: Path, *overrides):
    resolved, errors = load_recipe(path, list(overrides), env={})
    return resolved, [str(e) for e in errors]


@pytest.mark.parametrize("epochs,world,steps", [(2, 1, 8), (1, 1, 4), (0.5, 1, 2), (3, 2, 6)])
def test_epochs_become_the_steps_of_that_many_passes(tmp_path, monkeypatch, epochs, world, steps):
    """30 rows, 4 × 2 × world examples per step: ceil(epochs × 30 / (8 × world)) steps."""
    monkeypatch.chdir(tmp_path)  # the default output_dir is relative to it
    monkeypatch.setenv("WORLD_SIZE", str(world))
    resolved, errors = _load(_recipe(tmp_path, f"    epochs: {epochs}\n"))
    assert errors == []
    assert resolved["stages"]["sft"]["max_steps"] == steps
    assert resolved["stages"]["sft"]["epochs"] == epochs
    # sizing reads the data but writes nothing into the run directory (`llmlab run` refuses a
    # directory llmlab did not make)
    assert not Path(resolved["output_dir"]).exists()


def test_the_resolved_recipe_with_both_keys_loads_again(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    resolved, _ = _load(_recipe(tmp_path, "    epochs: 2\n"))
    again = tmp_path / "recipe.resolved.yaml"
    again.write_text(dump_resolved(resolved))
    reloaded, errors = _load(again)
    assert errors == []
    assert reloaded["stages"]["sft"]["max_steps"] == 8


def test_epochs_and_max_steps_that_disagree_are_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    resolved, errors = _load(_recipe(tmp_path, "    epochs: 2\n    max_steps: 5\n"))
    assert resolved is None
    assert any("max_steps 5 disagrees with epochs 2 (8 steps over 30 examples)" in e for e in errors), errors


def test_a_stage_without_steps_or_epochs_is_an_error(tmp_path):
    resolved, errors = _load(_recipe(tmp_path, ""))
    assert resolved is None
    assert any("give the stage's length: max_steps" in e for e in errors), errors


def test_epochs_are_not_hashed_but_the_steps_they_mean_are(tmp_path, monkeypatch):
    """Like max_steps: raising epochs keeps the fingerprint (the stage is extended) and changes the
    output fingerprint that later stages hash; epochs giving the same steps as max_steps hash alike."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = _recipe(tmp_path, "    epochs: 1\n")
    fps = {}
    for name, over in (("e1", "stages.sft.epochs=1"), ("e2", "stages.sft.epochs=2")):
        resolved, errors = _load(path, over)
        assert errors == []
        fps[name] = stage_fingerprints(resolved, ["sft"])["sft"]
    steps8, _ = _load(_recipe(tmp_path, "    max_steps: 8\n"))
    fps["s8"] = stage_fingerprints(steps8, ["sft"])["sft"]
    assert fps["e1"]["fingerprint"] == fps["e2"]["fingerprint"] == fps["s8"]["fingerprint"]
    assert fps["e1"]["output"] != fps["e2"]["output"]
    assert fps["e2"]["output"] == fps["s8"]["output"]


def test_early_stopping_is_hashed_with_the_eval_cadence(tmp_path):
    """early_stopping changes where the stage ends and which weights final/ holds; with it, so do
    eval_every and eval_steps. Without it they stay out of the fingerprint."""
    path = _recipe(tmp_path, "    max_steps: 8\n    eval_datasets: {chat: 1.0}\n")

    def fp(*overrides):
        resolved, errors = _load(path, *overrides)
        assert errors == []
        return stage_fingerprints(resolved, ["sft"])["sft"]["fingerprint"]

    plain = fp()
    assert fp("stages.sft.eval_every=3") == plain
    es = fp("stages.sft.early_stopping.patience=2")
    assert es != plain
    assert fp("stages.sft.early_stopping.patience=3") != es
    assert fp("stages.sft.early_stopping.patience=2", "stages.sft.eval_every=3") != es


def test_plan_shows_the_steps_epochs_mean_for_its_world_size(tmp_path, monkeypatch, capsys):
    from llmlab.commands.recipe import plan_command

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # the table on one line per row
    path = _recipe(tmp_path, "    epochs: 2\n")
    for world, steps in ((1, 8), (2, 4)):
        assert plan_command(path, fmt="json", world_size=world) == 0
        row = json.loads(capsys.readouterr().out)["rows"][0]
        assert (row["steps"], row["epochs"]) == (steps, 2)
    assert plan_command(path) == 0
    assert "8 (2 epochs)" in capsys.readouterr().out
