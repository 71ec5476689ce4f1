"""``group_by_length``: micro-batches of similar length, the same examples per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from llmlab.data.pipeline import build_stage_data, group_by_length
from tests.data.conftest import make_recipe


def test_group_by_length_only_reorders_and_sorts_inside_groups():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=1003)
    perm = rng.permutation(1003)
    out = group_by_length(perm, lengths, 4, np.random.default_rng(1))
    assert sorted(out.tolist()) == list(range(1003))  # every example once
    group = 50 * 4
    for start in range(0, 1003, group):  # each group holds the same examples as before
        assert sorted(out[start:start + group].tolist()) == sorted(perm[start:start + group].tolist())
    spread = [np.ptp(lengths[out[i:i + 4]]) for i in range(0, 1000, 4)]
    random_spread = [np.ptp(lengths[perm[i:i + 4]]) for i in range(0, 1000, 4)]
    assert np.mean(spread) < 0.2 * np.mean(random_spread)
    # the batch order inside a group is random, not longest first
    firsts = [lengths[out[i]] for i in range(0, 200, 4)]
    assert firsts != sorted(firsts, reverse=True)


def _padding(data, steps: int) -> float:
    real = total = 0
    for i in range(steps):
        for k, v in data.train_batch(i).items():
            if k.endswith("attention_mask"):
                real += int(v.sum())
                total += v.numel()
    return 1 - real / total


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_grouped_batches_pad_less_and_cover_the_same_epoch(tmp_path, tokenizer, stage):
    plain = make_recipe(tmp_path)
    grouped = make_recipe(tmp_path)
    grouped["stages"][stage]["group_by_length"] = True
    a = build_stage_data(plain, stage, tokenizer)
    b = build_stage_data(grouped, stage, tokenizer)
    n = a.num_train_examples
    assert b.num_train_examples == n
    steps = -(-n // a.batch_size)  # the last batch runs into the second epoch: cut at n
    ia = np.concatenate([a.train_indices(i) for i in range(steps)])[:n]
    ib = np.concatenate([b.train_indices(i) for i in range(steps)])[:n]
    assert sorted(ia.tolist()) == sorted(ib.tolist()) == list(range(n))  # each example once per epoch
    assert not np.array_equal(ia, ib)
    assert _padding(b, 20) < 0.7 * _padding(a, 20)
    again = build_stage_data(grouped, stage, tokenizer)  # a pure function of seed and index
    assert np.array_equal(again.train_indices(7), b.train_indices(7))


def test_group_by_length_is_refused_on_pretrain(tmp_path):
    from llmlab.recipe import load_recipe
    from tests.tiny import write_recipe

    rec = make_recipe(tmp_path)
    rec["stages"]["pretrain"]["group_by_length"] = True
    _, errors = load_recipe(write_recipe(tmp_path, rec))
    assert any("group_by_length" in str(e) and "pretrain" in str(e) for e in errors), errors
