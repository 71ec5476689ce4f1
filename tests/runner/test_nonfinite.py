"""A diverging run never writes a non-finite checkpoint, and names a finite one (issue 16 item 3)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmlab.commands.run import run_command
from llmlab.train.errors import is_cpu_out_of_memory
from tests.tiny import TINY, write_recipe


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_divergence_names_a_finite_checkpoint_and_saves_no_nan(tmp_path, capsys, grad_clip):
    stage = {**TINY["stages"]["pretrain"], "max_steps": 8, "save_every": 1, "eval_every": 100, "log_every": 1,
             "grad_clip": grad_clip, "optimizer": {"name": "adamw", "lr": 1.0e30},
             "scheduler": {"name": "constant"}}
    recipe = write_recipe(tmp_path, {**TINY, "stages": {"pretrain": stage}}, precision="fp32")
    assert run_command(recipe) == 1
    out = capsys.readouterr().out
    assert "not finite" in out or "is nan" in out or "is inf" in out, out
    named = re.search(r"the last good checkpoint is\s+(\S+)", out, re.I)
    assert named, out
    checkpoints = sorted((tmp_path / "run" / "pretrain" / "checkpoints").glob("step-*"))
    for ckpt in checkpoints:  # every checkpoint on disk is finite
        weights = load_file(ckpt / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt.name
    if named.group(1) != "none":
        assert Path(named.group(1)) in checkpoints


def test_cpu_out_of_memory_is_recognised():
    try:
        torch.empty(1 << 62, dtype=torch.uint8)
    except RuntimeError as e:
        assert is_cpu_out_of_memory(e), str(e)
    else:  # pragma: no cover - a machine with 4 EiB of memory
        pytest.skip("the allocation succeeded")
    assert not is_cpu_out_of_memory(RuntimeError("shape mismatch"))
