"""Failures while failing: torn metrics lines, unwritable or odd output dirs (issue 16 item 8)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from llmlab.metricsfile import read_records
from llmlab.runguard import run_lock
from llmlab.commands.run import _write_error_log, run_command
from tests.tiny import TINY, write_recipe

SHORT = {**TINY, "stages": {"pretrain": {**TINY["stages"]["pretrain"], "max_steps": 10, "save_every": 5,
                                         "eval_every": 5, "log_every": 1}}}


def test_torn_last_line_is_dropped_and_a_bad_middle_line_is_named(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_records(p)] == [1, 2]
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_records(p)
    assert read_records(tmp_path / "absent.jsonl") == []


def test_resume_and_report_survive_a_torn_metrics_line(tmp_path, capsys):
    from llmlab.report import report_command

    recipe = write_recipe(tmp_path, SHORT)
    assert run_command(recipe, until="pretrain") == 0
    stage = tmp_path / "run" / "pretrain"
    metrics = stage / "metrics.jsonl"
    # the kill came during the write of step 8's record, after the checkpoint of step 5
    lines = metrics.read_text().splitlines()
    cut = next(i for i, ln in enumerate(lines) if json.loads(ln).get("step") == 8)
    metrics.write_text("\n".join(lines[:cut]) + "\n" + lines[cut][:9])
    info = json.loads((stage / "stage.json").read_text())
    info["status"] = "running"
    (stage / "stage.json").write_text(json.dumps(info))
    import shutil

    shutil.rmtree(stage / "final")
    for ckpt in (stage / "checkpoints").iterdir():  # only step 5's checkpoint existed at the kill
        if ckpt.is_dir() and ckpt.name != "step-000005":
            shutil.rmtree(ckpt)
    assert report_command(tmp_path / "run", tmp_path / "r.png") == 0
    assert run_command(recipe) == 0  # resumes from step 5 without a JSON error
    steps = [r["step"] for r in read_records(metrics) if "loss" in r and "eval_loss" not in r]
    assert steps == list(range(1, 11)), steps
    capsys.readouterr()


def test_a_done_run_is_rechecked_without_writing(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path, SHORT)
    assert run_command(recipe) == 0
    resolved = tmp_path / "run" / "recipe.resolved.yaml"
    before = resolved.stat().st_mtime_ns
    real_open = os.open

    def read_only_lock(path, flags, *a):  # what a read-only mount answers
        if str(path).endswith(".llmlab.lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", read_only_lock)
    assert run_command(recipe) == 0
    assert resolved.stat().st_mtime_ns == before
    assert "skipped" in capsys.readouterr().out


def test_output_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    recipe = write_recipe(tmp_path, SHORT)
    (tmp_path / "run").write_text("not a directory")
    assert run_command(recipe) == 1
    out = capsys.readouterr().out
    assert "error: File exists" in out and str(tmp_path / "run") in out
    assert "Traceback" not in out


def test_error_log_goes_elsewhere_when_the_run_dir_cannot_take_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        where = _write_error_log(blocker / "run")
    try:
        assert where.parent != blocker and "RuntimeError: boom" in where.read_text()
    finally:
        where.unlink()
    with run_lock(tmp_path / "ok"):
        pass
