"""One held-out definition for orpo, kto and reward stages too: each stage's last eval record equals
``llmlab eval`` of its saved final/ weights on the stage's held-out pairs, to 1e-4 in fp32.

A shrunken quick-start (pretrain → sft, then orpo, kto and reward from sft; real data, fp32) trains a few
steps. Two computations on the same weights and rows: they agree whatever the steps learned.
"""

from __future__ import annotations

import copy
import json

import pytest

from tests.tiny import TINY, write_recipe

EVAL_STEPS = 100  # × batch_size 8: more than the held-out split, so each stage covers all of it


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from llmlab.runner import run_command

    rec = copy.deepcopy(TINY)
    rec["precision"] = "fp32"
    dpo = rec["stages"].pop("dpo")
    rec["stages"]["orpo"] = {**dpo, "type": "orpo", "beta": 0.3, "from": "sft"}
    rec["stages"]["kto"] = {**dpo, "type": "kto", "beta": 0.2, "undesirable_weight": 1.5, "from": "sft"}
    rec["stages"]["rm"] = {k: v for k, v in dpo.items() if k != "beta"} | {"type": "reward", "from": "sft"}
    for name, steps in (("pretrain", 2), ("sft", 2), ("orpo", 2), ("kto", 2), ("rm", 2)):
        rec["stages"][name].update(max_steps=steps, eval_every=steps, save_every=steps, log_every=1,
                                   eval_steps=EVAL_STEPS)
    d = tmp_path_factory.mktemp("heldout_pref")
    assert run_command(write_recipe(d, rec)) == 0
    return d / "run"


def _last_eval(run_dir, stage: str) -> dict:
    recs = [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "eval_loss" in r][-1]


def _llmlab_eval(run_dir, stage: str, tmp_path) -> dict:
    from llmlab.inference.commands import eval_command

    out = tmp_path / f"{stage}.json"
    assert eval_command(run_dir, dataset="chat_pairs", stage=stage, output=out, limit=EVAL_STEPS * 8) == 0
    return json.loads(out.read_text())


def test_orpo_eval_is_llmlab_eval_on_the_pairs(run_dir, tmp_path):
    ev, rep = _last_eval(run_dir, "orpo"), _llmlab_eval(run_dir, "orpo", tmp_path)
    assert "reference" not in rep and rep["loss_type"] == "orpo" and rep["beta"] == 0.3  # the stage's settings
    assert ev["eval_examples"] == ev["eval_heldout_examples"] == rep["pairs"] > 0
    assert ev["eval_truncated"] == rep["truncated"]
    for key, theirs in (("loss", "loss"), ("nll_loss", "nll_loss"), ("preference_loss", "preference_loss"),
                        ("log_odds_ratio", "log_odds_ratio"), ("rewards/margins", "reward_margin")):
        assert ev[f"eval_{key}"] == pytest.approx(rep[theirs], abs=1e-4), key
    assert ev["eval_loss"] == pytest.approx(ev["eval_nll_loss"] + ev["eval_preference_loss"], abs=1e-9)
    assert ev["eval_rewards/accuracies"] == pytest.approx(rep["reward_accuracy"], abs=1e-9)


def test_kto_eval_is_llmlab_eval_on_the_pairs(run_dir, tmp_path):
    ev, rep = _last_eval(run_dir, "kto"), _llmlab_eval(run_dir, "kto", tmp_path)
    assert rep["reference"].endswith("sft/final") and rep["loss_type"] == "kto" and rep["beta"] == 0.2
    assert ev["eval_examples"] == ev["eval_heldout_examples"] == rep["pairs"] > 0
    for key, theirs in (("loss", "loss"), ("kl", "kl"), ("rewards/margins", "reward_margin"),
                        ("rewards/chosen", "chosen_reward"), ("rewards/rejected", "rejected_reward")):
        assert ev[f"eval_{key}"] == pytest.approx(rep[theirs], abs=1e-4), key
    assert ev["eval_rewards/accuracies"] == pytest.approx(rep["reward_accuracy"], abs=1e-9)
    first = json.loads((run_dir / "kto" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0  # the policy is its reference: z_0 = 0, every reward 0, each loss 1/2 its weight
    assert first["eval_kl"] == 0.0 and first["eval_rewards/accuracies"] == 0.5
    assert first["eval_loss"] == pytest.approx((0.5 * 1.0 + 0.5 * 1.5) / 2, abs=1e-6)


def test_reward_eval_is_llmlab_eval_on_the_pairs(run_dir, tmp_path):
    ev, rep = _last_eval(run_dir, "rm"), _llmlab_eval(run_dir, "rm", tmp_path)
    assert rep["reward_model"] is True
    assert ev["eval_examples"] == ev["eval_heldout_examples"] == rep["pairs"] > 0
    assert ev["eval_truncated"] == rep["truncated"]
    assert ev["eval_loss"] == pytest.approx(rep["loss"], abs=1e-4)
    assert ev["eval_margin"] == pytest.approx(rep["reward_margin"], abs=1e-4)
    assert ev["eval_accuracy"] == pytest.approx(rep["reward_accuracy"], abs=1e-9)
