"""early_stopping: the rule on a given sequence of eval losses, and end to end with a scripted
eval_loss (the real evaluation runs; only its eval_loss is replaced by a value per step): the stage
stops after ``patience`` evaluations without an improvement of more than ``min_delta``, final/
holds the best checkpoint's weights, stage.json says so, and a stage killed mid-way resumes with
its patience counter and ends bitwise where an uninterrupted one does."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from llmlab.commands.run import run_command
from llmlab.train.checkpointer import Checkpointer, plateau_update
from llmlab.train.evaluator import Evaluator
from tests.tiny import TINY, write_recipe


def _stop_index(losses, patience, min_delta):
    """(index of the evaluation that stops, index of the best) under plateau_update."""
    best, bad, best_i = math.inf, 0, None
    for i, loss in enumerate(losses):
        improved, bad = plateau_update(best, bad, loss, min_delta)
        if improved:
            best, best_i = loss, i
        if bad >= patience:
            return i, best_i
    return None, best_i


@pytest.mark.parametrize("losses,patience,min_delta,expected", [
    ([5, 4, 3, 3.5, 3.6, 3.7], 3, 0.0, (5, 2)),       # three rises in a row after the minimum
    ([5, 4, 3, 3.5, 2.9, 3.7, 3.8], 2, 0.0, (6, 4)),  # a new best resets the counter
    ([5, 4, 3.95, 3.92, 3.91], 3, 0.1, (4, 1)),       # falls smaller than min_delta are no improvement
    ([5, 4, 3, 2, 1], 1, 0.0, (None, 4)),              # always improving: never stops
    ([5, float("nan"), float("nan")], 2, 0.0, (2, 0)),  # NaN never improves
])
def test_the_rule_stops_after_patience_evaluations_without_improvement(losses, patience, min_delta, expected):
    assert _stop_index(losses, patience, min_delta) == expected


#: scripted eval_loss by step (eval_every 2): best at step 4; 6 and 10 rise; 8 falls by less than
#: min_delta 0.1: with patience 3 the stage stops at step 10 of 20
LOSSES = {0: 5.0, 2: 4.0, 4: 3.5, 6: 3.6, 8: 3.45, 10: 3.7}
PATIENCE, MIN_DELTA, STOP, BEST = 3, 0.1, 10, 4


@pytest.fixture
def scripted_eval(monkeypatch):
    real_log, real_run = Evaluator.log, Evaluator.run

    def log(self, model, step, metrics):
        self._scripted_step = step
        return real_log(self, model, step, metrics)

    def run(self, model):
        out = real_run(self, model)
        out["eval_loss"] = LOSSES.get(self._scripted_step, 9.0)
        return out

    monkeypatch.setattr(Evaluator, "log", log)
    monkeypatch.setattr(Evaluator, "run", run)


def _recipe(d, **extra):
    rec = copy.deepcopy(TINY)
    rec["stages"] = {"sft": rec["stages"]["sft"]}
    rec["stages"]["sft"].update(max_steps=20, eval_every=2, save_every=4, keep_last=1,
                                early_stopping={"patience": PATIENCE, "min_delta": MIN_DELTA}, **extra)
    return write_recipe(d, rec)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_the_stage_stops_with_the_best_checkpoint_as_final(tmp_path, scripted_eval):
    recipe = _recipe(tmp_path, sample_prompts=["Hello"], sample_every=100)
    assert run_command(recipe) == 0
    stage = tmp_path / "run" / "sft"
    info = json.loads((stage / "stage.json").read_text())
    assert info["status"] == "done"
    assert info["steps"] == STOP and info["max_steps"] == 20
    assert info["early_stopping"] == {"stopped_at": STOP, "best_step": BEST, "best_eval_loss": LOSSES[BEST],
                                      "patience": PATIENCE, "min_delta": MIN_DELTA}
    records = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == STOP
    assert [r["step"] for r in records if "samples" in r] == [0, STOP]  # the last step samples too
    best = stage / "checkpoints" / f"step-{BEST:06d}"
    assert best.is_dir()  # kept through keep_last=1
    final, kept = _weights(stage / "final"), _weights(best)
    assert final.keys() == kept.keys()
    for k in kept:
        assert torch.equal(final[k], kept[k]), k
    # and not the last step's weights (the stage trained on past the best)
    last = _weights(stage / "checkpoints" / f"step-{STOP:06d}")
    assert any(not torch.equal(final[k], last[k]) for k in kept)
    # plan says so, and a second run finds it done
    from llmlab.recipe import load_recipe_or_raise
    from llmlab.runplan import build_run_plan

    plan = build_run_plan(load_recipe_or_raise(recipe, env={}))
    assert plan.status("sft") == ("done", f"early stopped at step {STOP} of 20; final/ holds step {BEST}")
    assert run_command(recipe) == 0
    assert json.loads((stage / "stage.json").read_text())["finished_at"] == info["finished_at"]


class _Killed(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,bad_evals", [(8, 2), (STOP, PATIENCE)])
def test_a_killed_stage_resumes_with_its_patience_counter(tmp_path, scripted_eval, monkeypatch, kill_at, bad_evals):
    """Killed right after the step-8 checkpoint (2 evaluations without improvement): the rerun
    resumes there and stops at step 10, as the uninterrupted run does, with the same weights.
    Killed right after the checkpoint of the stopping step (before stage.json says done): the rerun
    trains no further step."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert run_command(_recipe(a)) == 0

    real_save = Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        if step == kill_at:
            assert self.bad_evals == bad_evals
            raise _Killed

    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "save", save_then_die)
        assert run_command(_recipe(b)) == 1  # the run reports the failure; checkpoints are kept
    ckpt = b / "run" / "sft" / "checkpoints" / f"step-{kill_at:06d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["bad_evals"] == bad_evals and state["best_step"] == BEST
    assert run_command(_recipe(b)) == 0
    ia, ib = (json.loads((d / "run" / "sft" / "stage.json").read_text()) for d in (a, b))
    assert ib["resumed_from"] == kill_at and ib["steps"] == ia["steps"] == STOP
    assert ia["early_stopping"] == ib["early_stopping"]
    wa, wb = _weights(a / "run" / "sft" / "final"), _weights(b / "run" / "sft" / "final")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
