"""RewardStage: builds a num_labels=1 classifier from a causal LM, learns the preference, and its
final/ loads with AutoModelForSequenceClassification and feeds `reward: {from: STAGE}`."""

from __future__ import annotations

import pytest
import torch

from tests.alignment.helpers import ListData, make_ctx, tiny_lm
from tests.alignment.test_dpo import synthetic_pairs, train_until
from tests.numerics import learning_note


def test_reward_stage_learns_and_final_loads(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from llmlab.rl.rewards import RewardFunction, Rollout
    from llmlab.stages.reward import RewardStage, reward_scores

    tiny_lm(0).save_pretrained(tmp_path / "sft" / "final")
    ctx = make_ctx("reward", {}, tmp_path, name="rm")
    ctx.init_path = tmp_path / "sft" / "final"
    stage = RewardStage(ctx)
    model = stage.build_model()
    assert type(model).__name__.endswith("ForSequenceClassification") and model.config.num_labels == 1
    assert model.config.pad_token_id == 0
    # the body is the causal LM's
    torch.testing.assert_close(model.model.embed_tokens.weight, tiny_lm(0).model.embed_tokens.weight)
    stage.setup(model)
    stage._data = ListData(synthetic_pairs(8, 8, seed=0), synthetic_pairs(2, 16, seed=1))

    before = stage.evaluate(model, stage.eval_batches())
    _, after, steps = train_until(stage, model, lambda m, _: m["eval_accuracy"] >= 0.9 and m["eval_margin"] > 0.5,
                                  90, lr=3e-3)
    print(f"reward held-out accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}, margin "
          f"{after['eval_margin']:.3f} after {steps} steps")
    assert after["eval_accuracy"] >= 0.9 and after["eval_margin"] > 0.5, learning_note(
        f"held-out preference not learnt in {steps} steps: {after}")
    assert after["eval_accuracy"] > before["eval_accuracy"] and after["eval_loss"] < before["eval_loss"]

    model.save_pretrained(tmp_path / "rm" / "final")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final").eval()
    model.eval()
    batch = stage.eval_batches()[0]
    ids, att = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(loaded, ids, att), reward_scores(model, ids, att))

    # and as a reward source of an RL stage: GOOD completions outscore BAD ones
    rctx = make_ctx("ppo", {}, tmp_path, stage_paths={"rm": tmp_path / "rm"})
    fn = RewardFunction([{"from": "rm"}], rctx)
    prompt = torch.tensor([[0, 5, 40], [0, 5, 40]])
    pmask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    comp = torch.tensor([[4, 7, 9, 1], [40, 50, 60, 1]])
    r = fn(Rollout(prompt, pmask, comp, torch.ones_like(comp), [[], []], ["", ""]))
    assert r[0] > r[1]


def test_reward_stage_needs_a_language_model():
    from llmlab.stages.reward import RewardStage

    with pytest.raises(ValueError, match="from"):
        RewardStage(make_ctx("reward", {})).build_model()
