"""One run per directory, and deletes only of what llmlab wrote (issue 16 items 1 and 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmlab.runguard import LOCK_NAME, RunLockedError, run_lock
from llmlab.commands.run import run_command
from tests.tiny import TINY, write_recipe

PRETRAIN_ONLY = {**TINY, "stages": {"pretrain": {**TINY["stages"]["pretrain"], "max_steps": 40, "log_every": 1}}}


def test_second_run_on_a_live_directory_fails_at_once_and_the_first_loses_nothing(tmp_path):
    recipe = write_recipe(tmp_path, PRETRAIN_ONLY)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    first = subprocess.Popen([sys.executable, "-m", "llmlab.cli", "run", str(recipe)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "pretrain" / "metrics.jsonl").is_file():  # the first run is training
            assert first.poll() is None, first.stdout.read()
            assert time.time() < deadline
            time.sleep(0.1)
        # pause the first run (it keeps its lock) so the second meets it alive however slow this machine is
        os.kill(first.pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            second = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(recipe), "--set",
                                     "stages.pretrain.optimizer.lr=0.003"], env=env, capture_output=True, text=True)
            waited = time.perf_counter() - t0
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 1
        said = second.stdout + second.stderr
        assert "in use by another llmlab run" in said and f"pid {first.pid}" in said, said
        assert waited < 60  # no training, no tokenizer: it stops at the lock
        assert first.wait(timeout=300) == 0, first.stdout.read()
    finally:
        if first.poll() is None:
            first.kill()
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    train_steps = sorted({r["step"] for r in records if "loss" in r and "eval_loss" not in r})
    assert train_steps == list(range(1, 41)), train_steps
    stage = json.loads((out / "pretrain" / "stage.json").read_text())
    assert stage["status"] == "done"
    assert not (out / "error.log").exists()


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    # a process that takes the lock and is SIGKILLed while holding it
    code = ("import os, sys; from pathlib import Path; from llmlab.runguard import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True)
    assert proc.returncode == -9
    left = json.loads((run_dir / LOCK_NAME).read_text())
    said = []
    with run_lock(run_dir, announce=said.append):
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            with run_lock(run_dir):
                pass
    assert said and f"pid {left['pid']}" in said[0] and "no longer running" in said[0]
    with run_lock(run_dir):  # released on exit
        pass


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    with run_lock(tmp_path):
        monkeypatch.setenv("RANK", "1")
        with run_lock(tmp_path):  # another rank of the same launch: no lock of its own
            pass


def test_force_never_deletes_a_folder_llmlab_did_not_write(tmp_path, capsys):
    recipe = write_recipe(tmp_path, PRETRAIN_ONLY)
    user_dir = tmp_path / "run" / "pretrain"
    user_dir.mkdir(parents=True)
    (user_dir / "thesis.tex").write_text("years of work")
    assert run_command(recipe, force=True) == 1
    assert (user_dir / "thesis.tex").read_text() == "years of work"
    said = capsys.readouterr().out
    assert "llmlab did not write" in said and "pretrain/" in said


def test_cache_is_a_reserved_stage_name(tmp_path):
    from llmlab.recipe import load_recipe

    stages = {"cache": {**TINY["stages"]["pretrain"]}}
    _, errors = load_recipe(write_recipe(tmp_path, {**TINY, "stages": stages}))
    assert any(e.path == "stages.cache" for e in errors), errors


# -- memory check before a stage trains ------------------------------------------------------------

PARTS = {"weights": 2 << 30, "grads": 2 << 30, "optimizer": 4 << 30, "activations": 1 << 30}


def test_memory_shortfall_only_when_the_estimate_exceeds_what_is_free():
    from llmlab.runguard import memory_shortfall

    assert memory_shortfall("pretrain", PARTS, "cpu", free=10 << 30) is None  # 9 GiB fits in 10
    said = memory_shortfall("pretrain", PARTS, "cpu", free=8 << 30)
    assert said.startswith("stage pretrain: its planned peak training memory, 9.00 GiB")
    assert "8.00 GiB this machine has available" in said and "optimizer 4.00" in said
    assert "gradient_checkpointing" in said and "batch_size" in said
    assert memory_shortfall("pretrain", None, "cpu", free=0) is None  # unknown (from_pretrained): no claim


def test_processes_of_one_machine_share_its_ram():
    from llmlab.runguard import memory_shortfall

    # 2 CPU processes x 9 GiB do not fit in 10 GiB of RAM; on GPUs each process has its own device
    said = memory_shortfall("sft", PARTS, "cpu", processes_here=2, free=10 << 30)
    assert "18.00 GiB (2 processes x 9.00 GiB" in said
    assert memory_shortfall("sft", PARTS, "cuda", processes_here=2, free=10 << 30) is None


def test_run_warns_before_a_stage_that_will_not_fit_and_still_trains(tmp_path, monkeypatch, capsys):
    import llmlab.runguard as runguard
    from llmlab.plan import model_params, stage_memory, vocab_size_for
    from llmlab.recipe import load_recipe

    recipe = write_recipe(tmp_path, {**PRETRAIN_ONLY, "stages": {"pretrain": {**PRETRAIN_ONLY["stages"]["pretrain"],
                                                                            "max_steps": 2}}})
    monkeypatch.setattr(runguard, "free_memory", lambda device: (1 << 20, "this machine has available"))
    assert run_command(recipe) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "warning: stage pretrain: its planned peak training memory" in said
    assert "0.00 GiB this machine has available" in said
    # the figure is plan's own estimate for this stage (one source for both)
    rec, _ = load_recipe(recipe, [])
    vocab = vocab_size_for(rec)
    _, parts = stage_memory(rec, "pretrain", model_params(rec, vocab), vocab)
    assert f"{sum(parts.values()) / 2 ** 30:.2f} GiB" in said
    monkeypatch.setattr(runguard, "free_memory", lambda device: (1 << 40, "this machine has available"))
    assert run_command(recipe, overrides=["stages.pretrain.max_steps=3"]) == 0
    assert "planned peak training memory" not in capsys.readouterr().out
