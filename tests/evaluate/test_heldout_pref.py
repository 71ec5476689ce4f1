"""One held-out definition for orpo, kto and reward stages too: each stage's last eval record equals
``llmlab eval`` of its saved final/ weights on the stage's held-out pairs, to 1e-4 in fp32.

A shrunken quick-start (pretrain → sft, then orpo, kto, dpo with loss_type simpo and cpo, and reward from sft; real data, fp32) trains a few
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
    from llmlab.commands.run import run_command

    rec = copy.deepcopy(TINY)
    rec["precision"] = "fp32"
    dpo = rec["stages"].pop("dpo")
    rec["stages"]["orpo"] = {**dpo, "type": "orpo", "beta": 0.3, "from": "sft"}
    rec["stages"]["kto"] = {**dpo, "type": "kto", "beta": 0.2, "undesirable_weight": 1.5, "from": "sft"}
    rec["stages"]["simpo"] = {**dpo, "loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.3, "rpo_alpha": 0.5,
                              "from": "sft"}
    rec["stages"]["cpo"] = {**dpo, "loss_type": "cpo", "beta": 0.2, "cpo_alpha": 0.7, "from": "sft"}
    rec["stages"]["rm"] = {k: v for k, v in dpo.items() if k != "beta"} | {"type": "reward", "from": "sft"}
    for name, steps in (("pretrain", 2), ("sft", 2), ("orpo", 2), ("kto", 2), ("simpo", 2), ("cpo", 2), ("rm", 2)):
        rec["stages"][name].update(max_steps=steps, eval_every=steps, save_every=steps, log_every=1,
                                   eval_steps=EVAL_STEPS)
    d = tmp_path_factory.mktemp("heldout_pref")
    assert run_command(write_recipe(d, rec)) == 0
    return d / "run"


def _last_eval(run_dir, stage: str) -> dict:
    recs = [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "eval_loss" in r][-1]


def _llmlab_eval(run_dir, stage: str, tmp_path) -> dict:
    from llmlab.commands.inference import eval_command

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
    assert ev["eval_truncated"] == rep["truncated"]
    for key, theirs in (("loss", "loss"), ("kl", "kl"), ("rewards/margins", "reward_margin"),
                        ("rewards/chosen", "chosen_reward"), ("rewards/rejected", "rejected_reward")):
        assert ev[f"eval_{key}"] == pytest.approx(rep[theirs], abs=1e-4), key
    assert ev["eval_rewards/accuracies"] == pytest.approx(rep["reward_accuracy"], abs=1e-9)
    first = json.loads((run_dir / "kto" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0  # the policy is its reference: z_0 = 0, every reward 0, each loss 1/2 its weight
    assert first["eval_kl"] == 0.0 and first["eval_rewards/accuracies"] == 0.5
    assert first["eval_loss"] == pytest.approx((0.5 * 1.0 + 0.5 * 1.5) / 2, abs=1e-6)


@pytest.mark.parametrize("stage", ["simpo", "cpo"])
def test_reference_free_dpo_eval_is_llmlab_eval_on_the_pairs(run_dir, tmp_path, stage):
    ev, rep = _last_eval(run_dir, stage), _llmlab_eval(run_dir, stage, tmp_path)
    assert "reference" not in rep and rep["loss_type"] == stage  # the stage's settings, no reference loaded
    assert ev["eval_examples"] == rep["pairs"] > 0
    for key in ("loss", "preference_loss", "nll_loss"):
        assert ev[f"eval_{key}"] == pytest.approx(rep[key], abs=1e-4), key
    assert ev["eval_rewards/margins"] == pytest.approx(rep["reward_margin"], abs=1e-4)
    assert ev["eval_rewards/accuracies"] == pytest.approx(rep["reward_accuracy"], abs=1e-9)


def test_reward_eval_is_llmlab_eval_on_the_pairs(run_dir, tmp_path):
    ev, rep = _last_eval(run_dir, "rm"), _llmlab_eval(run_dir, "rm", tmp_path)
    assert rep["reward_model"] is True
    assert ev["eval_examples"] == ev["eval_heldout_examples"] == rep["pairs"] > 0
    assert ev["eval_truncated"] == rep["truncated"]
    assert ev["eval_loss"] == pytest.approx(rep["loss"], abs=1e-4)
    assert ev["eval_margin"] == pytest.approx(rep["reward_margin"], abs=1e-4)
    assert ev["eval_accuracy"] == pytest.approx(rep["reward_accuracy"], abs=1e-9)


def test_kto_unpaired_heldout_is_the_loss_of_the_whole_set_as_one_batch():
    """On unpaired rows the held-out reference point is taken over the whole held-out set: the numbers
    do not depend on the scoring batch size and equal the training loss of one batch holding every row."""
    from types import SimpleNamespace

    import torch

    from llmlab.data.pipeline import HeldOut
    from llmlab.losses import IGNORE_INDEX
    from llmlab.stages.kto import KTOStage
    from tests.alignment.helpers import PAD, VOCAB, make_ctx, pad_rows, tiny_lm

    stage = KTOStage(make_ctx("kto", {"beta": 0.3, "desirable_weight": 1.0, "undesirable_weight": 2.0}))
    stage.reference.capture(tiny_lm(0))  # a reference other than the policy: rewards and z_0 not 0
    stage.reference.setup(tiny_lm(0), "cpu")
    policy = tiny_lm(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(7):
        p, c = (torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
                for lo, hi in ((2, 6), (2, 8)))
        rows.append((p + c, [False] * len(p) + [True] * len(c), i % 3 != 0))
    held = HeldOut("unpaired", rows, 9)
    outs = []
    for bs in (1, 3, 8):
        stage._data = SimpleNamespace(batch_size=bs)
        outs.append(stage.evaluate_heldout(policy, held))
    for out in outs[1:]:
        assert out.keys() == outs[0].keys()
        for k in out:
            assert out[k] == pytest.approx(outs[0][k], abs=1e-6), k  # fp32 forwards of other paddings
    ev = outs[0]
    assert (ev["eval_examples"], ev["eval_heldout_examples"], ev["eval_truncated"]) == (7, 9, 0)
    assert "eval_rewards/accuracies" not in ev  # unpaired rows: no pairs
    assert ev["eval_kl"] > 0  # (not clamped: the comparison below covers z_0)
    batch = {"input_ids": pad_rows([ids for ids, _, _ in rows], PAD),
             "attention_mask": pad_rows([[1] * len(ids) for ids, _, _ in rows], 0),
             "labels": pad_rows([[t if f else IGNORE_INDEX for t, f in zip(ids, fl)] for ids, fl, _ in rows],
                                IGNORE_INDEX),
             "desirable": torch.tensor([d for _, _, d in rows])}
    with torch.no_grad():
        loss, metrics = stage.compute_loss(policy, batch)
    assert ev["eval_loss"] == pytest.approx(float(loss), abs=1e-5)
    assert ev["eval_kl"] == pytest.approx(float(metrics["kl"]), abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert ev[f"eval_{k}"] == pytest.approx(float(metrics[k]), abs=1e-4), k
