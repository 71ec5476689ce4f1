"""benchmarks/gpu_check.sh, the first-contact GPU check: its shell is valid, and its CPU dry run
runs every Python part (the same code a GPU run takes, at tiny sizes) to a passing result."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-S", "error", str(SCRIPT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real check would run")
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--cpu-dry-run" in r.stderr


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_passes_every_part(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run", "--out", str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"throughput", "packed", "qlora", "mamba2", "fsdp1"}
    assert all(p["dry_run"] and p.get("ok", True) for p in summary.values()), summary
    t = summary["throughput"]
    assert t["steps"] == 3 and t["tokens_per_s"] > 0 and 0 < t["mfu"] < 1
    # packed and padded documents give the same loss (no flash-attn on CPU: the masked path)
    assert summary["packed"]["kernel"].startswith("sdpa") and summary["packed"]["packed_vs_padded_bf16"] < 0.02
    assert summary["qlora"]["final_is_merged"]
    assert summary["fsdp1"]["module"].startswith("FSDP") and summary["fsdp1"]["gathered_tensors"] > 0
    assert "pretrain (" in r.stdout and "0 part(s) failed" in r.stdout
