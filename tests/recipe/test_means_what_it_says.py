"""The recipe means what it says (issue 15): each test failed on the code of 2026-11-30."""

from __future__ import annotations

from pathlib import Path

from llmlab.fingerprint import stage_fingerprints, stage_inputs
from llmlab.recipe import load_recipe, stage_order
from tests.tiny import TINY, write_recipe


def test_from_null_trains_from_the_model_section(tmp_path):
    from llmlab.plan import plan_rows

    stages = {k: dict(v) for k, v in TINY["stages"].items()}
    stages["sft"]["from"] = None
    rec, errors = load_recipe(write_recipe(tmp_path, {**TINY, "stages": stages}))
    assert errors == []
    order = stage_order(rec)
    assert stage_inputs(rec, "sft", order)["from"] is None
    assert stage_inputs(rec, "dpo", order)["from"] == "sft"  # the default is still the previous stage
    rows = {r["stage"]: r for r in plan_rows(rec)[0]}
    assert rows["sft"]["from"] == "model" and rows["dpo"]["from"] == "sft"
    # sft no longer depends on pretrain: changing pretrain leaves sft's fingerprint alone
    fp = stage_fingerprints(rec, order)["sft"]["fingerprint"]
    rec["stages"]["pretrain"]["optimizer"]["lr"] = 0.5
    assert stage_fingerprints(rec, order)["sft"]["fingerprint"] == fp


def _short_stages(**steps):
    out = {}
    for name, n in steps.items():
        st = dict(TINY["stages"][name])
        st.update(max_steps=n, save_every=n, eval_every=n, log_every=1)
        out[name] = st
    return out


def test_only_checks_inputs_before_deleting_anything(tmp_path, capsys):
    from llmlab.runner import run_command

    recipe = write_recipe(tmp_path, {**TINY, "stages": _short_stages(pretrain=4, sft=3, dpo=2)})
    assert run_command(recipe) == 0
    dpo = tmp_path / "run" / "dpo"
    finished = sorted(p.relative_to(dpo) for p in dpo.rglob("*"))
    capsys.readouterr()
    # sft's input changes: sft is stale, and dpo reads it
    assert run_command(recipe, overrides=["stages.sft.optimizer.lr=0.0005"], only="dpo") == 1
    out = capsys.readouterr().out
    assert "stage dpo reads stage sft" in out and "stale" in out and "--from sft" in out
    assert "starting over" not in out
    assert sorted(p.relative_to(dpo) for p in dpo.rglob("*")) == finished  # nothing deleted
