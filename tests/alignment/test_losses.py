"""The loss functions against independent oracles: TRL's trainers (DPO, IPO, Bradley-Terry) on the
same batch and weights, and plain Python loops (GAE, group advantages, whitening)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llmlab import losses
from tests.alignment.helpers import (PAD, make_ctx, preference_batch, tiny_classifier, tiny_lm,
                                     tiny_tokenizer)

PAIRS = [  # (prompt, chosen, rejected) with varied lengths, so padding and shifting both matter
    ([5, 6, 7], [8, 9, 1], [10, 1]),
    ([11], [12, 13, 14, 15, 1], [16, 17, 1]),
    ([18, 19, 20, 21, 22], [23, 1], [24, 25, 26, 27, 28, 1]),
]


def trl_batch(batch: dict) -> dict:
    """Our preference batch -> TRL 1.16's DPO collator format (chosen rows then rejected rows)."""
    from llmlab.stages.dpo import concat_pairs

    ids, att, labels = concat_pairs(batch, PAD)
    return {"input_ids": ids, "attention_mask": att, "completion_mask": (labels != -100).long()}


@pytest.fixture(scope="module")
def trl_dpo():
    """A TRL DPOTrainer over a tiny policy and a *different* tiny reference (so rewards are non-zero)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, ref = tiny_lm(0), tiny_lm(1)
    ds = Dataset.from_dict({"prompt": ["w1"], "chosen": ["w2"], "rejected": ["w3"]})
    args = DPOConfig(output_dir="/tmp/llmlab-trl-dpo", report_to=[], beta=0.1, use_cpu=True,
                     per_device_train_batch_size=2, bf16=False, disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds,
                         processing_class=tiny_tokenizer())
    return trainer, policy, ref


@pytest.mark.parametrize("loss_type,beta,rpo_alpha", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.7, 0.0), ("ipo", 0.1, 0.0),
                                                     ("ipo", 0.5, 0.0), ("sigmoid", 0.1, 0.5), ("sigmoid", 0.3, 2.0),
                                                     ("apo_zero", 0.1, 0.0), ("apo_zero", 0.5, 1.0),
                                                     ("apo_down", 0.3, 0.0)])
def test_dpo_stage_matches_trl(trl_dpo, loss_type, beta, rpo_alpha):
    """Loss, metrics and gradients equal TRL's; rpo_alpha > 0 against TRL 1.16's form of RPO
    (``rpo_alpha`` of older TRL): ``loss_type=[loss_type, "sft"]``, ``loss_weights=[1, rpo_alpha]``."""
    from llmlab.stages.dpo import DPOStage

    trainer, policy, ref = trl_dpo
    trainer.beta, trainer.loss_types, trainer.loss_weights = beta, [loss_type], [1.0]
    if rpo_alpha:
        trainer.loss_types, trainer.loss_weights = [loss_type, "sft"], [1.0, rpo_alpha]
    trainer._metrics["train"].clear()
    batch = preference_batch(PAIRS)

    policy.train()
    trl_loss = trainer.compute_loss(policy, trl_batch(batch))
    trl_grads = torch.autograd.grad(trl_loss, [p for p in policy.parameters()], allow_unused=True)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    stage = DPOStage(make_ctx("dpo", {"beta": beta, "loss_type": loss_type, "rpo_alpha": rpo_alpha}))
    stage.reference.model = ref
    stage.setup(policy)
    loss, metrics = stage.compute_loss(policy, batch)
    grads = torch.autograd.grad(loss, [p for p in policy.parameters()], allow_unused=True)

    assert float(loss.detach()) > 0
    loss, trl_loss = loss.detach(), trl_loss.detach()
    assert abs(float(loss) - float(trl_loss)) < 1e-5 * max(1.0, abs(float(trl_loss)))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert metrics["rewards/margins"] != 0.0  # the reference really differs from the policy
    if rpo_alpha:  # the NLL term is really there: plain DPO + alpha * (chosen-token NLL)
        plain = DPOStage(make_ctx("dpo", {"beta": beta, "loss_type": loss_type}))
        plain.reference.model = ref
        plain.setup(policy)
        with torch.no_grad():
            plain_loss, plain_metrics = plain.compute_loss(policy, batch)
        assert metrics["preference_loss"] == pytest.approx(float(plain_loss))
        assert metrics["nll_loss"] > 0 and metrics["nll_loss"] == pytest.approx(float(plain_metrics["nll_loss"]))
        assert float(loss) == pytest.approx(float(plain_loss) + rpo_alpha * float(metrics["nll_loss"]), rel=1e-6)
    gdiff = 0.0
    for g, tg in zip(grads, trl_grads):
        if tg is not None:
            torch.testing.assert_close(g, tg, atol=1e-6, rtol=1e-4)
            gdiff = max(gdiff, float((g - tg).abs().max()))
    print(f"DPO {loss_type} beta={beta} rpo_alpha={rpo_alpha}: loss {float(loss):.6f} vs TRL {float(trl_loss):.6f}, "
          f"|diff| {abs(float(loss) - float(trl_loss)):.2e}, max |grad diff| {gdiff:.2e}")


def test_dpo_loss_closed_forms():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    h = (pc - rc) - (pr - rr)
    l, cr, rj = losses.dpo_loss(pc, pr, rc, rr, beta=0.2)
    torch.testing.assert_close(l, torch.log1p(torch.exp(-0.2 * h)))
    torch.testing.assert_close(cr, 0.2 * (pc - rc))
    torch.testing.assert_close(rj, 0.2 * (pr - rr))
    # conservative DPO: label smoothing eps mixes in the flipped-label loss
    l_s, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.1)
    torch.testing.assert_close(l_s, 0.9 * torch.log1p(torch.exp(-0.2 * h)) + 0.1 * torch.log1p(torch.exp(0.2 * h)))
    # IPO without length normalisation: squared distance of h to 1/(2 beta)
    l_i, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="ipo")
    torch.testing.assert_close(l_i, (h - 2.5) ** 2)
    # APO-zero (eq. 7): chosen log-ratio pushed up, rejected down, each anchored at 0
    sig = torch.sigmoid
    l_z, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="apo_zero")
    torch.testing.assert_close(l_z, 1 - sig(0.2 * (pc - rc)) + sig(0.2 * (pr - rr)))
    # APO-down (eq. 8): chosen log-ratio down, the margin up
    l_d, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="apo_down")
    torch.testing.assert_close(l_d, sig(0.2 * (pc - rc)) + 1 - sig(0.2 * h))
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="hinge")


def test_sequence_logps_against_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    expected = []
    for b in range(2):
        s = 0.0
        for t in range(1, 5):
            if labels[b, t] != -100:
                s += torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
        expected.append(s)
    torch.testing.assert_close(losses.sequence_logps(logits, labels), torch.tensor(expected))


@pytest.fixture(scope="module")
def trl_reward():
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model = tiny_classifier(0)
    ds = Dataset.from_dict({"chosen": ["w1 w2"], "rejected": ["w3"]})
    args = RewardConfig(output_dir="/tmp/llmlab-trl-rm", report_to=[], use_cpu=True, bf16=False,
                        per_device_train_batch_size=2, disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tiny_tokenizer())
    return trainer, model


def test_reward_stage_matches_trl(trl_reward):
    from llmlab.stages.reward import RewardStage

    trainer, model = trl_reward
    trainer._metrics["train"].clear()
    # the classifier's head starts at zero-ish scale: give it a real spread first
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    batch = preference_batch(PAIRS)
    tb = trl_batch(batch)
    model.train()
    trl_loss = trainer.compute_loss(model, {"input_ids": tb["input_ids"], "attention_mask": tb["attention_mask"]}).detach()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    stage = RewardStage(make_ctx("reward", {}))
    stage.setup(model)
    loss, metrics = stage.compute_loss(model, batch)
    loss = loss.detach()
    assert abs(float(loss) - float(trl_loss)) < 1e-5
    print(f"RM loss {float(loss):.6f} vs TRL {float(trl_loss):.6f}, |diff| {abs(float(loss) - float(trl_loss)):.2e}")
    assert metrics["accuracy"] == pytest.approx(trl_metrics["accuracy"], abs=1e-6)
    assert metrics["margin"] == pytest.approx(trl_metrics["margin"], abs=1e-5)
    assert abs(metrics["margin"]) > 1e-3


def test_bradley_terry_closed_form():
    c, r = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    expected = sum(math.log1p(math.exp(-(a - b))) for a, b in zip(c.tolist(), r.tolist())) / 3
    assert float(losses.bradley_terry_loss(c, r)) == pytest.approx(expected, rel=1e-6)


def reference_gae(rewards, values, lengths, gamma, lam):
    """A direct transcription of Schulman et al. 2016, one episode at a time, in Python floats."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        for t in range(n):
            a, discount = 0.0, 1.0
            for k in range(t, n):
                v_next = values[b][k + 1] if k + 1 < n else 0.0
                delta = rewards[b][k] + gamma * v_next - values[b][k]
                a += discount * delta
                discount *= gamma * lam
            adv[b][t] = a
            ret[b][t] = a + values[b][t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_reference_loop(gamma, lam):
    torch.manual_seed(1)
    B, T = 4, 7
    lengths = [7, 3, 5, 1]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    rewards = torch.randn(B, T, dtype=torch.float64)
    values = torch.randn(B, T, dtype=torch.float64)
    # garbage in the padding must not leak into the valid positions
    rewards_g = rewards.masked_fill(mask == 0, 1e3)
    values_g = values.masked_fill(mask == 0, -1e3)
    adv, ret = losses.gae(rewards_g, values_g, mask, gamma, lam)
    ea, er = reference_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ea, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor(er, dtype=torch.float64))


def test_grpo_advantages_and_whitening():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    a = losses.grpo_advantages(r, 4)
    g0 = torch.tensor([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(a[:4], (g0 - 0.5) / (g0.std() + 1e-4))
    assert torch.all(a[4:] == 0)  # a group of equal rewards carries no signal
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = losses.masked_whiten(x, m)
    vals = w[m.bool()]
    assert abs(float(vals.mean())) < 1e-6 and abs(float(vals.std()) - 1.0) < 1e-4
    assert torch.all(w[~m.bool()] == 0)


def test_clipped_losses_and_kl():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0], [-0.5, -1.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, clipfrac, _ = losses.clipped_policy_loss(logp, old, adv, mask, 0.2)
    ratio = torch.exp(logp.detach() - old)
    # token (0,0): ratio e^0.5 > 1.2 with A>0 -> clipped at 1.2; (0,1): 1; (1,0): 1 (A<0)
    expected = (-1.2 * 1.0 + -1.0 * 1.0 + 1.0 * 1.0) / 3
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(clipfrac) == pytest.approx(1 / 3)
    loss.backward()
    assert logp.grad[0, 0] == 0  # clipped tokens pass no gradient
    assert ratio[1, 1] < 0.2  # the masked token would have changed the mean had it counted
    v = torch.tensor([[0.0, 1.0]])
    vl, vclip = losses.clipped_value_loss(v, torch.tensor([[0.5, 1.0]]), torch.tensor([[2.0, 1.0]]),
                                          torch.tensor([[1, 1]]), 0.2)
    # token 0: unclipped (0-2)^2=4, clipped (0.3-2)^2=2.89 -> max 4 ; token 1: 0
    assert float(vl.detach()) == pytest.approx(0.5 * (4 + 0) / 2)
    lp, rp = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(losses.kl_k1(lp, rp), torch.tensor([0.5, -1.0]))
    assert torch.all(losses.kl_k3(lp, rp) >= 0)
