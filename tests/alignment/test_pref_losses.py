"""ORPO, SimPO, CPO and KTO against TRL 1.16 as the oracle: on the same batch and weights, the stage's
loss, its metrics and its gradients equal TRL's (``ORPOTrainer``, ``CPOTrainer`` with ``loss_type``
sigmoid / simpo, ``KTOTrainer``)."""

from __future__ import annotations

import functools

import pytest
import torch

from llmlab import losses
from tests.alignment.helpers import PAD, make_ctx, preference_batch, tiny_lm, tiny_tokenizer
from tests.alignment.test_losses import PAIRS

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def _orpo_cpo_batch(batch: dict) -> dict:
    """Our preference batch is already TRL's ORPO / CPO collated format (chosen_* / rejected_*)."""
    return {k: v for k, v in batch.items()}


def _grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def _assert_grads_equal(grads, trl_grads) -> float:
    worst = 0.0
    n = 0
    for g, tg in zip(grads, trl_grads):
        if tg is not None:
            torch.testing.assert_close(g, tg, atol=1e-6, rtol=1e-4)
            worst = max(worst, float((g - tg).abs().max()))
            n += 1
    assert n > 0
    return worst


def _trainer(kind: str, **config):
    pytest.importorskip("trl")
    from datasets import Dataset

    policy = tiny_lm(0)
    common = dict(output_dir=f"/tmp/llmlab-trl-{kind}", report_to=[], use_cpu=True, bf16=False,
                  per_device_train_batch_size=2, disable_tqdm=True, **config)
    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer as T
        args = ORPOConfig(**common)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer as T
        args = CPOConfig(**common)
    ds = Dataset.from_dict({"prompt": ["w1"], "chosen": ["w2"], "rejected": ["w3"]})
    return T(model=policy, args=args, train_dataset=ds, processing_class=tiny_tokenizer()), policy


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_stage_matches_trl(beta):
    from llmlab.stages.orpo import ORPOStage

    trainer, policy = _trainer("orpo", beta=beta)
    batch = preference_batch(PAIRS)
    policy.train()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(policy, _orpo_cpo_batch(batch))
    trl_grads = _grads(trl_loss, policy)

    stage = ORPOStage(make_ctx("orpo", {"beta": beta}))
    loss, metrics = stage.compute_loss(policy, batch)
    grads = _grads(loss, policy)
    assert float(loss) == pytest.approx(float(trl_loss), rel=1e-6)
    for name in METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], abs=1e-5), name
    worst = _assert_grads_equal(grads, trl_grads)
    print(f"ORPO beta={beta}: loss {float(loss):.6f} vs TRL {float(trl_loss):.6f}, max |grad diff| {worst:.2e}")


@pytest.mark.parametrize("loss_type,beta,alpha,gamma,smoothing", [
    ("cpo", 0.1, 1.0, 0.5, 0.0), ("cpo", 0.5, 0.0, 0.5, 0.1), ("simpo", 2.0, 0.0, 0.5, 0.0),
    ("simpo", 0.1, 0.5, 1.2, 0.0), ("simpo", 2.5, 0.0, 0.3, 0.2)])
def test_simpo_cpo_match_trl(loss_type, beta, alpha, gamma, smoothing):
    """The dpo stage's reference-free loss types against TRL's CPOTrainer (``loss_type`` sigmoid is
    CPO, simpo is SimPO); the NLL weight is ``cpo_alpha`` for cpo and ``rpo_alpha`` for simpo."""
    from llmlab.stages.dpo import DPOStage

    trainer, policy = _trainer("cpo", beta=beta, loss_type="sigmoid" if loss_type == "cpo" else "simpo",
                               cpo_alpha=alpha, simpo_gamma=gamma, label_smoothing=smoothing)
    batch = preference_batch(PAIRS)
    policy.train()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(policy, _orpo_cpo_batch(batch))
    trl_grads = _grads(trl_loss, policy)

    cfg = {"beta": beta, "loss_type": loss_type, "label_smoothing": smoothing, "simpo_gamma": gamma,
           ("cpo_alpha" if loss_type == "cpo" else "rpo_alpha"): alpha}
    stage = DPOStage(make_ctx("dpo", cfg))
    assert stage.reference is None  # reference-free: no model loaded
    stage.setup(policy)
    loss, metrics = stage.compute_loss(policy, batch)
    grads = _grads(loss, policy)
    assert float(loss) == pytest.approx(float(trl_loss), rel=1e-6)
    for name in METRICS:
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], abs=1e-5), name
    if alpha:
        assert float(metrics["nll_loss"]) == pytest.approx(trl_metrics["nll_loss"], abs=1e-5)
    worst = _assert_grads_equal(grads, trl_grads)
    print(f"{loss_type} beta={beta} alpha={alpha} gamma={gamma}: loss {float(loss):.6f} vs TRL "
          f"{float(trl_loss):.6f}, max |grad diff| {worst:.2e}")


@functools.lru_cache(maxsize=None)
def trl_kto(ref_seed: int):
    """A TRL KTOTrainer over a tiny policy and a *different* tiny reference (rewards are non-zero).
    On PAIRS the batch KL estimate is negative (clamped to 0) for reference seed 1 and positive
    (0.0125) for seed 5."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    policy, ref = tiny_lm(0), tiny_lm(ref_seed)
    ds = Dataset.from_dict({"prompt": ["w1", "w4"], "completion": ["w2", "w3"], "label": [True, False]})
    args = KTOConfig(output_dir="/tmp/llmlab-trl-kto", report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=2, disable_tqdm=True)
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tiny_tokenizer())
    return trainer, policy, ref


def test_mismatched_rows_pair_each_prompt_with_the_previous_completion():
    from llmlab.stages.kto import mismatched_rows
    from llmlab.stages.dpo import concat_pairs

    ids, att, labels = concat_pairs(preference_batch(PAIRS), PAD)
    kl_ids, kl_att, kl_labels = mismatched_rows(ids, att, labels, PAD)
    examples = [(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS]  # desirable rows, then undesirable
    for j, (prompt, _) in enumerate(examples):
        completion = examples[j - 1][1]
        n = len(prompt) + len(completion)
        assert kl_ids[j, :n].tolist() == prompt + completion
        assert kl_labels[j, :n].tolist() == [-100] * len(prompt) + completion
        assert kl_att[j].tolist() == [1] * n + [0] * (kl_att.shape[1] - n)
        assert set(kl_labels[j, n:].tolist()) <= {-100}


@pytest.mark.parametrize("ref_seed,beta,desirable_weight,undesirable_weight", [
    (1, 0.1, 1.0, 1.0), (1, 0.5, 1.0, 1.33), (5, 2.0, 0.7, 1.0), (5, 0.1, 1.0, 1.0)])
def test_kto_stage_matches_trl(ref_seed, beta, desirable_weight, undesirable_weight):
    """Each pair is one desirable and one undesirable example; the KL reference point comes from the
    same mismatched rows in both (TRL's collator rotates completions by one within the batch)."""
    from llmlab.stages.dpo import concat_pairs
    from llmlab.stages.kto import KTOStage, mismatched_rows

    pytest.importorskip("trl")
    trainer, policy, ref = trl_kto(ref_seed)
    trainer.beta, trainer.desirable_weight, trainer.undesirable_weight = beta, desirable_weight, undesirable_weight
    trainer._metrics["train"].clear()
    batch = preference_batch(PAIRS)
    ids, att, labels = concat_pairs(batch, PAD)
    kl_ids, kl_att, kl_labels = mismatched_rows(ids, att, labels, PAD)
    trl_batch = {"input_ids": ids, "attention_mask": att, "completion_mask": (labels != -100).long(),
                 "KL_input_ids": kl_ids, "KL_attention_mask": kl_att, "KL_completion_mask": (kl_labels != -100).long(),
                 "label": torch.tensor([True] * len(PAIRS) + [False] * len(PAIRS))}
    policy.train()
    trl_loss = trainer.compute_loss(policy, trl_batch)
    trl_grads = _grads(trl_loss, policy)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    stage = KTOStage(make_ctx("kto", {"beta": beta, "desirable_weight": desirable_weight,
                                      "undesirable_weight": undesirable_weight}))
    stage.reference.model = ref
    stage.setup(policy)
    loss, metrics = stage.compute_loss(policy, batch)
    grads = _grads(loss, policy)
    assert float(loss) == pytest.approx(float(trl_loss), rel=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert float(metrics["rewards/margins"]) != 0.0
    assert (float(metrics["kl"]) > 0.01) == (ref_seed == 5)  # both sides of the clamp are covered
    worst = _assert_grads_equal(grads, trl_grads)
    print(f"KTO beta={beta} lambda_D={desirable_weight} lambda_U={undesirable_weight}: loss {float(loss):.6f} vs "
          f"TRL {float(trl_loss):.6f}, kl {float(metrics['kl']):.4f}, max |grad diff| {worst:.2e}")


def test_kto_stage_matches_trl_on_unpaired_rows():
    """Unpaired rows with unbalanced labels (3 desirable, 2 undesirable) in TRL's own batch layout."""
    from tests.alignment.helpers import pad_rows

    pytest.importorskip("trl")
    from llmlab.stages.kto import KTOStage, mismatched_rows

    trainer, policy, ref = trl_kto(5)
    trainer.beta, trainer.desirable_weight, trainer.undesirable_weight = 0.3, 1.0, 1.5
    trainer._metrics["train"].clear()
    rows = [([5, 6, 7], [8, 9, 1], True), ([11], [12, 13, 14, 15, 1], False), ([18, 19], [23, 1], True),
            ([20, 21, 22], [24, 25, 26, 1], True), ([30, 31], [32, 1], False)]
    batch = {"input_ids": pad_rows([p + c for p, c, _ in rows], PAD),
             "attention_mask": pad_rows([[1] * (len(p) + len(c)) for p, c, _ in rows], 0),
             "labels": pad_rows([[-100] * len(p) + c for p, c, _ in rows], -100),
             "desirable": torch.tensor([d for _, _, d in rows])}
    kl_ids, kl_att, kl_labels = mismatched_rows(batch["input_ids"], batch["attention_mask"], batch["labels"], PAD)
    trl_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                 "completion_mask": (batch["labels"] != -100).long(), "KL_input_ids": kl_ids,
                 "KL_attention_mask": kl_att, "KL_completion_mask": (kl_labels != -100).long(),
                 "label": batch["desirable"]}
    policy.train()
    trl_loss = trainer.compute_loss(policy, trl_batch)
    trl_grads = _grads(trl_loss, policy)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    stage = KTOStage(make_ctx("kto", {"beta": 0.3, "undesirable_weight": 1.5}))
    stage.reference.model = ref
    stage.setup(policy)
    loss, metrics = stage.compute_loss(policy, batch)
    assert float(loss) == pytest.approx(float(trl_loss), rel=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert "rewards/accuracies" not in metrics  # no pairs, no pairwise accuracy
    _assert_grads_equal(_grads(loss, policy), trl_grads)
