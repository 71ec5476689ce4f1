"""Fixtures for the evaluate-stage tests: a tiny trained run (pretrain → sft → dpo, a few steps each on
real data) and the same recipe with a final ``compare`` evaluate stage."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny import TINY, write_recipe

#: TINY, shortened to a few steps per stage, plus a prompt dataset
SMALL = copy.deepcopy(TINY)
for _name, _steps in (("pretrain", 10), ("sft", 5), ("dpo", 3)):
    SMALL["stages"][_name].update(max_steps=_steps, eval_every=_steps, save_every=_steps)
SMALL["datasets"]["prompts"] = {"builtin": "chatterbot_prompts", "format": "prompt", "eval_split": 0.1,
                                "max_samples": 200}

#: the evaluate stage appended to SMALL
COMPARE = {"type": "evaluate", "datasets": {"bible": 1, "chat": 1, "chat_pairs": 1, "prompts": 1},
           "reference_from": "sft", "max_samples": 12, "num_samples": 2, "max_new_tokens": 8}

#: SMALL with the compare stage last
FULL = copy.deepcopy(SMALL)
FULL["stages"]["compare"] = copy.deepcopy(COMPARE)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core runner they thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """``(dir, resolved)``: ``dir/run`` holds the trained SMALL run; ``dir/full.yaml`` is FULL (same
    output directory) and ``resolved`` its resolved recipe."""
    from llmlab.recipe import load_recipe_or_raise
    from llmlab.commands.run import run_command

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = tmp_path_factory.mktemp("evaluate")
        assert run_command(write_recipe(d, SMALL, name="train.yaml")) == 0
        full = write_recipe(d, FULL, name="full.yaml")
        return d, load_recipe_or_raise(full)
    finally:
        torch.set_num_threads(before)
