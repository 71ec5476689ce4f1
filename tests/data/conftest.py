"""Shared fixtures of the data tests: a small tokenizer trained on the real King James Bible."""

from __future__ import annotations

import copy

import pytest

BASE_RECIPE = {
    "name": "datatest",
    "seed": 1234,
    "tokenizer": {"train": {"datasets": ["bible"], "vocab_size": 1024, "max_documents": 300},
                  "chat_template": "chatml"},
    "model": {"arch": "transformer", "max_seq_len": 128},
    "datasets": {
        "bible": {"builtin": "kjv", "format": "text", "eval_split": 0.02},
        "chat": {"builtin": "chatterbot", "format": "messages", "eval_split": 0.05},
        "chat_pairs": {"builtin": "chatterbot_pairs", "format": "preference", "eval_split": 0.1},
        "prompts": {"builtin": "chatterbot_prompts", "format": "prompt"},
    },
    "stages": {
        "pretrain": {"type": "pretrain", "datasets": {"bible": 1.0}, "seq_len": 128,
                     "batch_size": 8, "max_steps": 10, "eval_steps": 2},
        "sft": {"type": "sft", "datasets": {"chat": 1.0}, "seq_len": 128, "batch_size": 8,
                "max_steps": 10, "eval_steps": 2},
        "dpo": {"type": "dpo", "datasets": {"chat_pairs": 1.0}, "seq_len": 128, "batch_size": 8,
                "max_steps": 10, "eval_steps": 2},
        "grpo": {"type": "grpo", "datasets": {"prompts": 1.0}, "seq_len": 128, "batch_size": 4,
                 "max_steps": 5, "eval_steps": 1, "max_new_tokens": 32},
    },
}


def make_recipe(tmp_path, **overrides) -> dict:
    """A deep copy of BASE_RECIPE with output_dir in ``tmp_path`` and top-level overrides."""
    rec = copy.deepcopy(BASE_RECIPE)
    rec["output_dir"] = str(tmp_path / "run")
    rec.update(overrides)
    return rec


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from llmlab.data.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    return build_tokenizer(make_recipe(out), out / "tokenizer")
