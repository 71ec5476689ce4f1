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
