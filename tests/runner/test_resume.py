"""Kill test: SIGKILL a run at random moments — during a step, during a checkpoint write, between
stages — rerun it, and reach bitwise the weights of a run that never stopped (CPU, same seed)."""

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
    rec["stages"]["pretrain"].update(max_steps=160, save_every=3, keep_last=2, eval_every=80)
    rec["stages"]["sft"].update(max_steps=40, save_every=3, eval_every=20)
    return write_recipe(d, rec)


def _cmd(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "llmlab.cli", "run", str(recipe)]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def _weights(d: Path, stage: str):
    return load_file(str(d / "run" / stage / "final" / "model.safetensors"))


def _wait(p: subprocess.Popen, cond, timeout=180.0) -> bool:
    """Poll until cond() holds (True) or the process ended (False)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            return False
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ra, rb = _recipe(a), _recipe(b)
    done = subprocess.run(_cmd(ra), env=_env(), cwd=a, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    rng = random.Random(0)
    run = b / "run"

    def ckpts(stage):
        d = run / stage / "checkpoints"
        return [x for x in d.iterdir() if x.name.startswith("step-")] if d.is_dir() else []

    moments = [
        lambda: len(ckpts("pretrain")) >= 1,                 # early in pretraining
        lambda: len(ckpts("pretrain")) >= 2,                 # later: a step or a checkpoint write in flight
        lambda: (run / "sft" / "stage.json").exists(),       # between stages: sft just registered
        lambda: len(ckpts("sft")) >= 1,                      # during sft
    ]
    kills = 0
    for cond in moments:
        p = subprocess.Popen(_cmd(rb), env=_env(), cwd=b, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _wait(p, cond):
            time.sleep(rng.uniform(0.0, 0.4))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
        p.wait(timeout=120)
    final = subprocess.run(_cmd(rb), env=_env(), cwd=b, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    assert kills >= 3
    for stage in ("pretrain", "sft"):
        wa, wb = _weights(a, stage), _weights(b, stage)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert (wa[k] == wb[k]).all(), f"{stage}:{k} differs after kill/resume"
