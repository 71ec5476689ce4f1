"""Fingerprints: what changes a stage's identity, and what only reruns downstream."""

import copy
import json

import pytest

from llmlab.fingerprint import stage_fingerprints, stage_status
from llmlab.runner import RunError, select_stages
from tests.tiny import TINY


def _recipe(tmp_path):
    rec = copy.deepcopy(TINY)
    rec["output_dir"] = str(tmp_path / "run")
    prev = None
    for name, s in rec["stages"].items():  # as resolution fills it: the previous stage (null: the model)
        s.setdefault("from", prev)
        prev = name
    return rec


def test_changing_one_stage_changes_it_and_downstream_only(tmp_path):
    rec = _recipe(tmp_path)
    order = list(rec["stages"])
    before = stage_fingerprints(rec, order)
    rec["stages"]["sft"]["optimizer"]["lr"] = 1e-4
    after = stage_fingerprints(rec, order)
    assert before["pretrain"]["fingerprint"] == after["pretrain"]["fingerprint"]
    assert before["sft"]["fingerprint"] != after["sft"]["fingerprint"]
    assert before["dpo"]["fingerprint"] != after["dpo"]["fingerprint"]


def test_logging_cadence_does_not_change_fingerprints_but_max_steps_reaches_downstream(tmp_path):
    rec = _recipe(tmp_path)
    order = list(rec["stages"])
    before = stage_fingerprints(rec, order)
    rec["stages"]["pretrain"]["log_every"] = 1
    rec["stages"]["pretrain"]["save_every"] = 3
    assert stage_fingerprints(rec, order) == before
    rec["stages"]["pretrain"]["max_steps"] = 80  # an extension: same stage, new output
    after = stage_fingerprints(rec, order)
    assert after["pretrain"]["fingerprint"] == before["pretrain"]["fingerprint"]
    assert after["sft"]["fingerprint"] != before["sft"]["fingerprint"]


def test_local_data_content_is_part_of_the_fingerprint(tmp_path):
    rec = _recipe(tmp_path)
    data = tmp_path / "extra.jsonl"
    data.write_text('{"text": "a"}\n')
    rec["datasets"]["extra"] = {"path": str(data), "format": "text"}
    rec["stages"]["pretrain"]["datasets"] = {"bible": 1.0, "extra": 1.0}
    order = list(rec["stages"])
    fp1 = stage_fingerprints(rec, order)["pretrain"]["fingerprint"]
    data.write_text('{"text": "b"}\n')
    assert stage_fingerprints(rec, order)["pretrain"]["fingerprint"] != fp1


def test_status_done_extend_stale_partial(tmp_path):
    rec = _recipe(tmp_path)
    order = list(rec["stages"])
    fps = stage_fingerprints(rec, order)
    d = tmp_path / "run" / "pretrain"
    assert stage_status(d, fps["pretrain"], 40)[0] == "pending"
    (d / "checkpoints" / "step-000010").mkdir(parents=True)
    assert stage_status(d, fps["pretrain"], 40) == ("partial", "at step 10")
    (d / "stage.json").write_text(json.dumps({"status": "done", "fingerprint": fps["pretrain"]["fingerprint"],
                                              "parts": fps["pretrain"]["parts"], "max_steps": 40}))
    assert stage_status(d, fps["pretrain"], 40) == ("partial", "final/ is missing; at step 10")  # killed while saving
    (d / "final").mkdir()
    (d / "final" / "config.json").write_text("{}")
    assert stage_status(d, fps["pretrain"], 40)[0] == "done"
    assert stage_status(d, fps["pretrain"], 60) == ("extend", "continues from step 40 to 60")
    rec["stages"]["pretrain"]["optimizer"]["lr"] = 1e-4
    status, why = stage_status(d, stage_fingerprints(rec, order)["pretrain"], 40)
    assert status == "stale" and "optimizer.lr" in why and "0.01" in why


def test_select_stages():
    order = ["pretrain", "sft", "dpo"]
    assert select_stages(order, None, "sft", None) == (["sft", "dpo"], {"sft", "dpo"})
    assert select_stages(order, None, None, "sft") == (["pretrain", "sft"], set())
    assert select_stages(order, "dpo", None, None) == (["dpo"], set())
    with pytest.raises(RunError, match="no such stage"):
        select_stages(order, "rlhf", None, None)


def test_a_key_added_later_keeps_old_fingerprints_at_its_default_and_counts_when_set():
    """Keys the schema gained after runs were fingerprinted (fingerprint.ADDED_KEYS) are left out
    while they hold their default, so finished runs stay done; set to another value they count."""
    from llmlab.fingerprint import ADDED_KEYS, _semantic_config

    base = {"type": "dpo", "beta": 0.1, "lora": {"r": 8, "use_dora": False, "use_rslora": False}}
    assert "simpo_gamma" in ADDED_KEYS["stage_dpo"] and "use_dora" in ADDED_KEYS["lora"]
    at_default = _semantic_config({**base, "simpo_gamma": 0.5, "cpo_alpha": 1.0})
    assert at_default == {"type": "dpo", "beta": 0.1, "lora": {"r": 8}}
    assert _semantic_config({**base, "simpo_gamma": 1.0})["simpo_gamma"] == 1.0
    changed = _semantic_config({**base, "lora": {"r": 8, "use_dora": True, "use_rslora": False}})
    assert changed["lora"] == {"r": 8, "use_dora": True}
