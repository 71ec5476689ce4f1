"""DPOStage behaviour: the three kinds of reference model, frozen weights, and learning."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.alignment.helpers import ListData, make_ctx, preference_batch, tiny_lm
from tests.numerics import learning_note

GOOD = list(range(3, 33))   # chosen completions use these tokens
BAD = list(range(33, 64))   # rejected completions use these


def synthetic_pairs(n_batches: int, batch_size: int, seed: int) -> list[dict]:
    """Pairs whose chosen completion is drawn from GOOD tokens and rejected from BAD tokens."""
    g = torch.Generator().manual_seed(seed)

    def draw(pool, k):
        return [pool[i] for i in torch.randint(0, len(pool), (k,), generator=g).tolist()]

    batches = []
    for _ in range(n_batches):
        pairs = []
        for _ in range(batch_size):
            prompt = draw(GOOD + BAD, int(torch.randint(2, 6, (1,), generator=g)))
            pairs.append((prompt, draw(GOOD, int(torch.randint(2, 6, (1,), generator=g))) + [1],
                          draw(BAD, int(torch.randint(2, 6, (1,), generator=g))) + [1]))
        batches.append(preference_batch(pairs))
    return batches


def train(stage, model, steps: int, lr: float = 1e-3, opt=None, start: int = 0) -> list[float]:
    """``steps`` AdamW steps on the stage's batches ``start ..``; the per-step losses."""
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    out = []
    for i in range(start, start + steps):
        loss, _ = stage.compute_loss(model, stage.get_batch(i, model))
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


def train_until(stage, model, reached, max_steps: int, lr: float = 1e-3, every: int = 10):
    """Train until ``reached(held-out metrics, losses so far)`` (checked every ``every`` steps) or ``max_steps``.

    What a tiny model learns in a fixed number of steps depends on the CPU's floating-point paths, so
    the learning tests stop at a measured margin instead. Returns (losses, metrics, steps taken).
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: list[float] = []
    while True:
        losses += train(stage, model, every, opt=opt, start=len(losses))
        metrics = stage.evaluate(model, stage.eval_batches())
        if reached(metrics, losses) or len(losses) >= max_steps:
            return losses, metrics, len(losses)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_raises_heldout_reward_accuracy(loss_type):
    from llmlab.stages.dpo import DPOStage

    policy = tiny_lm(0)
    stage = DPOStage(make_ctx("dpo", {"beta": 0.1, "loss_type": loss_type}))
    stage._data = ListData(synthetic_pairs(8, 8, seed=0), synthetic_pairs(2, 16, seed=1))
    stage.setup(policy)  # no build_model: the reference is a frozen copy of these starting weights
    ref_before = copy.deepcopy(stage.reference.model.state_dict())

    before = stage.evaluate(policy, stage.eval_batches())
    losses, after, steps = train_until(
        stage, policy, lambda m, _: m["eval_rewards/accuracies"] >= 0.9 and m["eval_rewards/margins"] > 0.1, 90)
    print(f"dpo {loss_type}: held-out accuracy {after['eval_rewards/accuracies']:.3f}, margin "
          f"{after['eval_rewards/margins']:.3f} after {steps} steps")

    # at the start the policy is its reference: implicit rewards are exactly 0, every pair a tie (one half)
    assert before["eval_rewards/margins"] == 0.0 and before["eval_rewards/accuracies"] == 0.5
    if loss_type == "sigmoid":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert after["eval_rewards/accuracies"] >= 0.9 and after["eval_rewards/margins"] > 0.1, learning_note(
        f"held-out preference not learnt in {steps} steps: {after}")
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_logps/rejected"] < before["eval_logps/rejected"]
    # the reference never moved and takes no gradient
    for k, v in stage.reference.model.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    assert not any(p.requires_grad for p in stage.reference.model.parameters())


def test_dpo_lora_reference_is_base_with_adapters_disabled():
    from llmlab.models.build import apply_lora
    from llmlab.stages.dpo import DPOStage

    base = tiny_lm(0)
    base_copy = copy.deepcopy(base)
    lora = {"preset": "all", "r": 4, "alpha": 8, "dropout": 0.0}
    stage = DPOStage(make_ctx("dpo", {"beta": 0.1, "lora": lora}))
    stage.reference.capture(base)  # what build_model does: under LoRA no copy is taken
    assert stage.reference.model is None
    policy = apply_lora(base, lora)
    stage._data = ListData(synthetic_pairs(4, 8, seed=0), synthetic_pairs(1, 16, seed=1))
    stage.setup(policy)
    assert stage.reference.use_disabled_adapter and stage.reference.model is None

    def reached(m, losses):
        return m["eval_rewards/accuracies"] >= 0.8 and losses[-1] < losses[0] - 0.02

    losses, after, steps = train_until(stage, policy, reached, 45, lr=3e-2, every=5)
    print(f"dpo lora: held-out accuracy {after['eval_rewards/accuracies']:.3f} after {steps} steps, "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # adapters start as a no-op
    # (a tiny random model's logits are small and its lm_head is frozen under LoRA: the loss moves
    # slowly, but the held-out preference is learned)
    assert after["eval_rewards/accuracies"] >= 0.8, learning_note(f"held-out preference not learnt: {after}")
    assert losses[-1] < losses[0] - 0.02, learning_note(f"training loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    # only adapter weights received gradients; the reference equals the untouched base model
    trained = [n for n, p in policy.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    batch = stage.eval_batches()[0]
    from llmlab.stages.dpo import concat_pairs, model_logits

    ids, att, _ = concat_pairs(batch, 0)
    ref_logits = stage.reference.logits(policy, ids, att)
    torch.testing.assert_close(ref_logits, model_logits(base_copy, ids, att))
    with torch.no_grad():
        assert not torch.allclose(model_logits(policy, ids, att), ref_logits)  # the policy did move


def test_dpo_reference_from_stage_and_starting_weights(tmp_path):
    from llmlab.stages.dpo import DPOStage

    tiny_lm(0).save_pretrained(tmp_path / "sft" / "final")
    tiny_lm(1).save_pretrained(tmp_path / "other" / "final")
    paths = {"sft": tmp_path / "sft", "other": tmp_path / "other"}

    # default: the policy's starting weights, captured in build_model (before any checkpoint load)
    ctx = make_ctx("dpo", {}, tmp_path, stage_paths=paths)
    ctx.init_path = tmp_path / "sft" / "final"
    stage = DPOStage(ctx)
    policy = stage.build_model()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)  # as if a checkpoint had been loaded into the policy
    stage.setup(policy)
    for (n, p), q in zip(tiny_lm(0).named_parameters(), stage.reference.model.parameters()):
        assert torch.equal(p, q), n

    # reference_from: that stage's final/ weights
    ctx = make_ctx("dpo", {"reference_from": "other"}, tmp_path, stage_paths=paths)
    ctx.init_path = tmp_path / "sft" / "final"
    stage = DPOStage(ctx)
    stage.setup(stage.build_model())
    for (n, p), q in zip(tiny_lm(1).named_parameters(), stage.reference.model.parameters()):
        assert torch.equal(p, q), n
    assert not stage.reference.model.training

    ctx = make_ctx("dpo", {"reference_from": "nope"}, tmp_path, stage_paths=paths)
    ctx.init_path = tmp_path / "sft" / "final"
    with pytest.raises(ValueError, match="reference_from"):
        DPOStage(ctx).build_model()


def test_dpo_config_errors():
    from llmlab.stages.dpo import DPOStage

    with pytest.raises(ValueError, match="loss_type"):
        DPOStage(make_ctx("dpo", {"loss_type": "hinge"}))
