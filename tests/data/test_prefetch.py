"""Batches built ahead by DataLoader workers are the batches the loop would build itself."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from llmlab.data.pipeline import build_stage_data
from llmlab.data.prefetch import BatchPrefetcher, auto_num_workers, step_indices
from tests.data.conftest import make_recipe


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_step_indices_follow_the_loops_rule():
    # micro-batch m of step s on rank r of w: (s * gas + m) * w + r
    assert step_indices(2, 4, 2, 2, 1) == [9, 11, 13, 15]
    assert step_indices(0, 3, 1, 1, 0) == [0, 1, 2]
    assert step_indices(5, 5, 4, 8, 3) == []


def test_auto_workers_are_none_on_cpu_and_leave_a_core_per_process_on_gpu():
    assert auto_num_workers(torch.device("cpu"), cpus=64) == 0
    assert auto_num_workers(torch.device("cuda"), world=1, cpus=16) == 4
    assert auto_num_workers(torch.device("cuda"), world=8, cpus=16) == 1
    assert auto_num_workers(torch.device("cuda"), world=8, cpus=8) == 0


def test_workers_return_the_same_batches_in_order_and_out_of_order(tmp_path, tokenizer):
    recipe = make_recipe(tmp_path)
    for stage in ("pretrain", "sft", "dpo"):
        data = build_stage_data(recipe, stage, tokenizer)
        calls: list[int] = []

        def direct(i, data=data, calls=calls):
            calls.append(i)
            return data.train_batch(i)

        indices = step_indices(0, 6, 2, 1, 0)
        pre = BatchPrefetcher(data.train_batch, indices, direct, num_workers=2, prefetch_factor=2)
        try:
            for i in indices[:5]:
                assert _same(pre.get(i), data.train_batch(i)), (stage, i)
            assert calls == []  # all five came from the workers
            # a jump (e.g. a resumed loop asking again) is served directly, then prefetching goes on
            assert _same(pre.get(9), data.train_batch(9))
            assert calls == [9]
            assert _same(pre.get(10), data.train_batch(10)) and _same(pre.get(11), data.train_batch(11))
            assert calls == [9]
            assert _same(pre.get(500), data.train_batch(500)) and calls == [9, 500]  # not in the plan
        finally:
            pre.close()


def test_without_workers_get_is_the_direct_call():
    seen = []
    pre = BatchPrefetcher(lambda i: {"i": i}, [0, 1], lambda i: seen.append(i) or {"i": -i}, num_workers=0)
    assert pre.get(1) == {"i": -1} and seen == [1] and not pre.active
    assert not BatchPrefetcher(None, [0], lambda i: {}, num_workers=4).active  # online stages


def test_training_with_dataloader_workers_gives_identical_weights(tmp_path, monkeypatch):
    """A pretrain and an SFT stage with 2 DataLoader workers per process on the CPU end with the
    same bytes as without workers (and the run reads the keys from the recipe)."""
    from tests.tiny import TINY, write_recipe
    from llmlab.commands.run import run_command
    import copy

    rec = copy.deepcopy(TINY)
    rec["stages"] = {"pretrain": {**rec["stages"]["pretrain"], "max_steps": 6, "save_every": 3, "eval_every": 3},
                     "sft": {**rec["stages"]["sft"], "max_steps": 4, "gradient_accumulation_steps": 2}}
    started = []  # (stage type, workers) of every prefetch start: proof the workers really ran
    real_start = BatchPrefetcher._start
    monkeypatch.setattr(BatchPrefetcher, "_start",
                        lambda self, pos: started.append(self.num_workers) or real_start(self, pos))
    weights = []
    for workers in (0, 2):
        d = tmp_path / f"w{workers}"
        d.mkdir()
        path = write_recipe(d, rec, dataloader_num_workers=workers, dataloader_prefetch_factor=3)
        assert run_command(path) == 0
        weights.append({s: load_file(str(d / "run" / s / "final" / "model.safetensors")) for s in ("pretrain", "sft")})
        assert started == ([] if workers == 0 else [2, 2])  # one start per stage, none without workers
    for s in ("pretrain", "sft"):
        a, b = weights[0][s], weights[1][s]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), s
