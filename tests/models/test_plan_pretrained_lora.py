"""`plan` counts LoRA's trainable parameters on a from_pretrained checkpoint like peft does (not all)."""

from __future__ import annotations

import copy

import pytest
import torch

from llmlab.plan import plan_rows
from llmlab.recipe import load_recipe
from tests.tiny import TINY, write_recipe


@pytest.mark.parametrize("lora", [{"preset": "all", "r": 4}, {"preset": "minimal", "r": 2},
                                  {"preset": "custom", "target_modules": ["o_proj"], "r": 8}])
def test_plan_trainable_under_lora_for_a_pretrained_checkpoint(tmp_path, lora):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmlab.models.build import apply_lora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    rec = copy.deepcopy(TINY)
    rec["model"] = {"from_pretrained": str(ckpt)}
    rec["stages"] = {"sft": {**TINY["stages"]["sft"], "lora": lora}}
    rec["tokenizer"] = {"train": {**TINY["tokenizer"]["train"], "datasets": ["chat"]}, "chat_template": "chatml"}
    rec["datasets"] = {"chat": TINY["datasets"]["chat"]}
    resolved, errors = load_recipe(write_recipe(tmp_path, rec))
    assert not errors, errors
    rows, facts = plan_rows(resolved)
    total = sum(p.numel() for p in model.parameters())
    expected = sum(p.numel() for p in apply_lora(model, {"alpha": 16, **lora}).parameters() if p.requires_grad)
    assert facts["params"] == total
    assert rows[0]["trainable"] == expected and 0 < expected < total
