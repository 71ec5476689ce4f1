"""``max_time`` (a stage stops at a step boundary with a checkpoint, partial, resumable) and
``threads`` / ``LLMLAB_THREADS``: both change speed or when a run ends, never the weights."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from llmlab.config import TrainingConfig, duration_seconds
from llmlab.fingerprint import stage_fingerprints
from llmlab.commands.run import run_command
from llmlab.session import RunError, run_threads
from llmlab.train import timelimit
from llmlab.train.loop import train
from tests.runner.test_loop import ToyStage, _ctx, _params
from tests.tiny import TINY, write_recipe


@pytest.mark.parametrize("value, seconds", [(None, None), (90, 90.0), (2.5, 2.5), ("01:30:00", 5400.0),
                                            ("1:00:00:05", 86405.0)])
def test_max_time_forms(value, seconds):
    assert duration_seconds(value) == seconds
    cfg = {"type": "pretrain", "max_steps": 3, **({} if value is None else {"max_time": value})}
    assert TrainingConfig.from_dict(cfg).max_time == seconds


def test_max_time_string_of_another_form_is_refused():
    with pytest.raises(ValueError, match="HH:MM:SS"):
        duration_seconds("90s")


def test_max_time_and_threads_enter_no_fingerprint(tmp_path):
    rec = copy.deepcopy(TINY)
    rec["output_dir"] = str(tmp_path / "run")
    order = list(rec["stages"])
    before = stage_fingerprints(rec, order)
    rec["stages"]["pretrain"]["max_time"] = "00:10:00"
    rec["threads"] = 1
    assert stage_fingerprints(rec, order) == before


class _Clock:
    """time.monotonic that advances one second per call."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def test_max_time_stops_at_a_step_boundary_with_a_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    ref_model, ref = train(ToyStage(_ctx(tmp_path / "ref")), fingerprint="fp")
    monkeypatch.setattr(timelimit, "time", SimpleNamespace(monotonic=_Clock()))
    # the clock advances 1 s from the limit's start to each step's check: 2.5 s run out after step 3
    model, result = train(ToyStage(_ctx(tmp_path / "cut", max_time=2.5, log_every=5)), fingerprint="fp")
    assert result.stopped == "max_time" and result.steps == 3
    assert (tmp_path / "cut" / "toy" / "checkpoints" / "step-000003").is_dir()  # save_every is 4: written for the stop
    logged = [json.loads(line) for line in (tmp_path / "cut" / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 3]  # log_every 5: the first step and the stop
    monkeypatch.undo()
    model, result = train(ToyStage(_ctx(tmp_path / "cut")), fingerprint="fp")
    assert result.stopped is None and result.steps == 12 and result.resumed_from == 3
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(ref_model)))


def test_threads_key_wins_over_the_variable():
    assert run_threads(2, env={"LLMLAB_THREADS": "3"}) == 2
    assert run_threads(None, env={"LLMLAB_THREADS": "3"}) == 3
    assert run_threads(None, env={}) is None
    with pytest.raises(RunError, match="LLMLAB_THREADS"):
        run_threads(None, env={"LLMLAB_THREADS": "all"})


def test_a_stopped_stage_is_partial_its_readers_wait_and_the_next_run_finishes_it(tmp_path, monkeypatch):
    rec = copy.deepcopy(TINY)
    rec["stages"] = {"pretrain": {**rec["stages"]["pretrain"], "max_steps": 6, "max_time": 1e-6},
                     "sft": {**rec["stages"]["sft"], "max_steps": 2}}
    path = write_recipe(tmp_path, rec, threads=1)
    monkeypatch.setenv("LLMLAB_CACHE_DIR", str(tmp_path / "cache"))
    from llmlab.train import flops

    monkeypatch.setattr(flops, "measure_peak", lambda *a, **k: 1e11)  # no micro-benchmark in this test
    threads = torch.get_num_threads()
    try:
        assert run_command(path) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "run"
    info = json.loads((run / "pretrain" / "stage.json").read_text())
    assert info["status"] == "stopped" and info["steps"] == 1 and info["threads"] == 1
    assert not (run / "pretrain" / "final").exists() and not (run / "sft").exists()
    records = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if "loss" in r]
    assert train_rec and all(r["mfu"] > 0 and r["flops_per_token"] > 0 for r in train_rec)
    assert run_command(path, overrides=["stages.pretrain.max_time=null"]) == 0  # not semantic: same stage, resumed
    info = json.loads((run / "pretrain" / "stage.json").read_text())
    assert info["status"] == "done" and info["steps"] == 6 and info["resumed_from"] == 1
    assert info["flops"]["mfu"] > 0 and (run / "sft" / "final").is_dir()
