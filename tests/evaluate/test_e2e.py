"""`llmlab run` with a final evaluate stage: training stages are reused, the evaluate stage writes
results.json and stage.json, prints the comparison table, and is skipped when nothing changed."""

from __future__ import annotations

import json
import shutil

import pytest

from llmlab.runplan import build_run_plan
from tests.evaluate.conftest import FULL
from tests.tiny import write_recipe

pytestmark = [
    pytest.mark.slow,
]


def _strip_seconds(results: dict) -> dict:
    return {m: {ds: {k: v for k, v in met.items() if k != "seconds"} for ds, met in per.items()}
            for m, per in results.items()}


def test_run_command_runs_a_final_evaluate_stage(trained, tmp_path, capsys):
    from llmlab.commands.run import run_command
    from llmlab.stages.evaluate import run_evaluate_stage

    d, resolved = trained
    # the trained stages; the evaluate stage has not run (test_stage.py's fixture may have written a
    # compare/ into the shared run, without the runner's ownership marker)
    shutil.copytree(d / "run", tmp_path / "run", ignore=shutil.ignore_patterns("compare"))
    recipe = write_recipe(tmp_path, FULL, name="full.yaml")
    capsys.readouterr()
    assert run_command(recipe) == 0
    out = capsys.readouterr().out
    for name in ("pretrain", "sft", "dpo"):
        assert f"stage {name}: done" in out  # adding an evaluate stage reruns no training stage
    table = out[out.index("evaluation"):]  # the comparison table: dataset over metric in each header
    header = table[:table.index("┡")]
    assert all(w in header for w in ("bible", "perplexity", "chat_pairs", "reward_accuracy", "nll_loss"))
    assert "…" not in header  # no header cut short
    stage_dir = tmp_path / "run" / "compare"
    results = json.loads((stage_dir / "results.json").read_text())
    info = json.loads((stage_dir / "stage.json").read_text())
    assert info["status"] == "done" and info["type"] == "evaluate" and len(info["fingerprint"]) == 64
    assert not (stage_dir / "final").exists() and not (stage_dir / "checkpoints").exists()

    # the same numbers as the stage function called directly on the original run
    direct = run_evaluate_stage(build_run_plan(resolved), "compare", {n: d / "run" / n for n in resolved["stages"]})
    assert _strip_seconds(results) == _strip_seconds(direct)

    # nothing changed: everything is skipped, results.json untouched
    mtime = (stage_dir / "results.json").stat().st_mtime_ns
    assert run_command(recipe) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") >= 4
    assert (stage_dir / "results.json").stat().st_mtime_ns == mtime

    # editing only the evaluate stage reruns only it
    assert run_command(recipe, overrides=["stages.compare.max_samples=6"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") >= 3
    results = json.loads((stage_dir / "results.json").read_text())
    assert results["dpo"]["bible"]["rows"] == 6
