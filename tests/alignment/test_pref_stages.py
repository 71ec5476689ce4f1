"""orpo, kto and the dpo stage's simpo / cpo through the real training loop: a few steps run, each
eval reports a held-out preference accuracy, a run killed mid-stage resumes bitwise, the reference-free
types keep no reference model, LoRA trains only adapters; config errors name the key. Contracts only:
nothing here depends on what a few steps learn."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.stages import stage_class
from llmlab.stages.base import StageContext
from tests.alignment.helpers import ListData, make_ctx, tiny_lm, tiny_tokenizer
from tests.alignment.test_dpo import synthetic_pairs

CASES = {
    "orpo": ("orpo", {"beta": 0.2}),
    "kto": ("kto", {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.2}),
    "kto_lora": ("kto", {"lora": {"preset": "all", "r": 4, "alpha": 8, "dropout": 0.0}}),
    "kto_unpaired": ("kto", {"beta": 0.1}),
    "simpo": ("dpo", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5}),
    "cpo": ("dpo", {"loss_type": "cpo", "beta": 0.1, "cpo_alpha": 1.0}),
}


def _stage(tmp_path, case: str, crash_at: int | None = None):
    stage_type, extra = CASES[case]
    config = {"type": stage_type, "max_steps": 6, "batch_size": 4, "save_every": 2, "eval_every": 3, "log_every": 1,
              "keep_last": 5, "optimizer": {"name": "adamw", "lr": 1e-3}, "scheduler": {"name": "constant"}, **extra}
    recipe = {"seed": 3, "output_dir": str(tmp_path), "model": {}, "stages": {case: config}}
    ctx = StageContext.bare(recipe, case, tiny_tokenizer())

    class Tiny(stage_class(stage_type)):
        def build_model(self):
            model = tiny_lm(0)
            if getattr(self, "reference", None) is not None:
                self.reference.capture(model)
            return model

        def get_batch(self, index, model):
            if index == crash_at:
                raise KeyboardInterrupt("simulated kill")
            return super().get_batch(index, model)

    stage = Tiny(ctx)
    train, held_out = synthetic_pairs(6, 4, seed=0), synthetic_pairs(1, 8, seed=1)
    if case == "kto_unpaired":
        train, held_out = [unpaired(b, i) for i, b in enumerate(train)], [unpaired(b, 7) for b in held_out]
    stage._data = ListData(train, held_out)
    return stage


def unpaired(pair_batch: dict, seed: int) -> dict:
    """A pair batch's 2B rows as unpaired examples (chosen desirable), shuffled, a few dropped: the
    unpaired_preference batch layout."""
    from llmlab.stages.dpo import concat_pairs

    ids, att, labels = concat_pairs(pair_batch, 0)
    B = pair_batch["chosen_input_ids"].shape[0]
    keep = torch.randperm(2 * B, generator=torch.Generator().manual_seed(seed))[: 2 * B - 1]
    return {"input_ids": ids[keep], "attention_mask": att[keep], "labels": labels[keep],
            "desirable": (torch.arange(2 * B) < B)[keep]}


@pytest.mark.parametrize("case", list(CASES))
def test_stage_trains_evaluates_and_resumes_bitwise(tmp_path, case):
    from llmlab.train.loop import train

    full, _ = train(_stage(tmp_path / "a", case), fingerprint="f")
    with pytest.raises(KeyboardInterrupt):
        train(_stage(tmp_path / "b", case, crash_at=4), fingerprint="f")  # dies in step 5, after step 4's checkpoint
    resumed, result = train(_stage(tmp_path / "b", case), fingerprint="f")
    assert result.resumed_from == 4
    a, b = dict(full.named_parameters()), dict(resumed.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    trainable = [n for n, p in full.named_parameters() if p.requires_grad]
    assert trainable and (all("lora_" in n for n in trainable) if "lora" in case else len(trainable) == len(a))
    records = [json.loads(x) for x in (tmp_path / "a" / case / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals][-1] == 6
    for r in evals:
        assert r["eval_loss"] == r["eval_loss"]  # not NaN
        if case == "kto_unpaired":  # no pairs: no pairwise accuracy, but both sides' rewards and the KL
            assert "eval_rewards/accuracies" not in r and {"eval_rewards/margins", "eval_kl"} <= set(r)
        else:
            assert 0.0 <= r["eval_rewards/accuracies"] <= 1.0


def test_reference_free_types_keep_no_reference_model():
    from llmlab.stages.orpo import ORPOStage

    for stage_type, extra in (("dpo", {"loss_type": "simpo"}), ("dpo", {"loss_type": "cpo"})):
        stage = stage_class(stage_type)(make_ctx(stage_type, extra))
        assert stage.reference is None
        stage.build_model = lambda: tiny_lm(0)
        stage.setup(tiny_lm(0))
        assert stage.reference is None
    assert not hasattr(ORPOStage(make_ctx("orpo", {})), "reference")
    assert stage_class("kto")(make_ctx("kto", {})).reference is not None


@pytest.mark.parametrize("config,match", [
    ({"loss_type": "cpo", "rpo_alpha": 1.0}, "rpo_alpha: loss_type cpo weighs its NLL term with cpo_alpha"),
    ({"loss_type": "simpo", "reference_from": "sft"}, "reference_from: loss_type simpo uses no reference"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing does not apply to loss_type ipo"),
    ({"loss_type": "apo_zero", "label_smoothing": 0.1}, "label_smoothing does not apply to loss_type apo_zero"),
    ({"loss_type": "hinge"}, "not one of sigmoid, ipo, apo_zero, apo_down, simpo, cpo"),
])
def test_dpo_loss_type_config_errors(config, match):
    from llmlab.stages.dpo import DPOStage

    with pytest.raises(ValueError, match=match):
        DPOStage(make_ctx("dpo", config))


def test_step0_accuracy_counts_ties_as_one_half():
    from llmlab.losses import preference_accuracy

    assert float(preference_accuracy(torch.zeros(4), torch.zeros(4))) == 0.5
    assert float(preference_accuracy(torch.tensor([1.0, 0.0, -1.0, 2.0]), torch.tensor([0.0, 0.0, 0.0, 3.0]))) \
        == pytest.approx((1 + 0.5 + 0 + 0) / 4)
