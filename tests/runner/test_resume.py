"""Kill test: SIGKILL a run at random moments, rerun it, and reach bitwise the weights of a run that
never stopped (CPU, same seed)."""

import copy
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.tiny import TINY, write_recipe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _recipe(d: Path) -> Path:
    rec = copy.deepcopy(TINY)
    rec["stages"] = {k: rec["stages"][k] for k in ("pretrain", "sft")}
    rec["stages"]["pretrain"].update(max_steps=60, save_every=4, keep_last=2, eval_every=30)
    rec["stages"]["sft"].update(max_steps=16, save_every=4, eval_every=8)
    return write_recipe(d, rec)


def _cmd(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "llmlab.cli", "run", str(recipe)]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def _weights(d: Path, stage: str):
    return load_file(str(d / "run" / stage / "final" / "model.safetensors"))


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ra, rb = _recipe(a), _recipe(b)
    done = subprocess.run(_cmd(ra), env=_env(), cwd=a, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    rng = random.Random(0)
    kills = 0
    for attempt in range(8):
        p = subprocess.Popen(_cmd(rb), env=_env(), cwd=b, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if attempt < 4:
            # wait until training has started (some checkpoints exist or the tokenizer is built), then kill
            time.sleep(rng.uniform(5.0, 9.0))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
            p.wait(timeout=60)
            continue
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
        break
    assert kills >= 2
    assert "continuing" in out or "skipped" in out
    for stage in ("pretrain", "sft"):
        wa, wb = _weights(a, stage), _weights(b, stage)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert (wa[k] == wb[k]).all(), f"{stage}:{k} differs after kill/resume"
