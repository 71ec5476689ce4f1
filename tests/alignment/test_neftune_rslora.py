"""NEFTune on the sft stage against transformers' hook (the one TRL uses), and rsLoRA's scaling
through peft."""

from __future__ import annotations

import pytest
import torch

from tests.alignment.helpers import make_ctx, tiny_lm


def test_neftune_noise_equals_transformers_hook_in_training_and_is_off_in_eval():
    from transformers.integrations.neftune import neftune_post_forward_hook

    from llmlab.stages.lm import SFTStage

    alpha = 5.0
    ids = torch.randint(3, 64, (2, 7))
    ours, theirs, clean = tiny_lm(0), tiny_lm(0), tiny_lm(0)
    SFTStage(make_ctx("sft", {"neftune_alpha": alpha})).setup(ours)
    emb = theirs.get_input_embeddings()
    emb.neftune_noise_alpha = alpha
    emb.register_forward_hook(neftune_post_forward_hook)
    for m in (ours, theirs, clean):
        m.train()
    torch.manual_seed(123)
    a = ours.get_input_embeddings()(ids)
    torch.manual_seed(123)
    b = theirs.get_input_embeddings()(ids)
    c = clean.get_input_embeddings()(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    bound = alpha / (7 * 32) ** 0.5
    assert 0 < float((a - c).abs().max()) <= bound * (1 + 1e-6)
    # the logits see the noise in training, not in evaluation
    torch.manual_seed(1)
    assert not torch.equal(ours(ids).logits, clean(ids).logits)
    ours.eval(), clean.eval()
    assert torch.equal(ours(ids).logits, clean(ids).logits)
    # no alpha: no hook
    plain = tiny_lm(0).train()
    SFTStage(make_ctx("sft", {})).setup(plain)
    assert torch.equal(plain.get_input_embeddings()(ids), c)


@pytest.mark.parametrize("rslora", [False, True])
def test_rslora_scales_by_alpha_over_sqrt_r(rslora):
    from llmlab.models.build import apply_lora

    model = apply_lora(tiny_lm(0), {"preset": "all", "r": 4, "alpha": 8, "use_rslora": rslora})
    layers = [m for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)
              and "default" in m.scaling]
    assert layers
    assert {m.scaling["default"] for m in layers} == {8 / 4 ** 0.5 if rslora else 8 / 4}
