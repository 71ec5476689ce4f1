"""torchrun --nproc_per_node 2 on CPU (gloo): the loss curve matches one process with the same global batch."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import TINY, write_recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _losses(d: Path) -> list[float]:
    lines = [json.loads(x) for x in (d / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_torchrun_two_processes_match_single_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    rec = copy.deepcopy(TINY)
    rec["stages"] = {"pretrain": rec["stages"]["pretrain"]}
    rec["stages"]["pretrain"].update(max_steps=6, log_every=1, eval_every=100, save_every=100, batch_size=4)
    rec["device"] = "cpu"
    rec["precision"] = "fp32"
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    one = copy.deepcopy(rec)
    one["stages"]["pretrain"]["gradient_accumulation_steps"] = 2  # global batch 2 × 4, same micro-batches
    r1 = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(write_recipe(single, one))],
                        cwd=single, env=env, capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_addr", "127.0.0.1", "--master_port", str(port),
                         "-m", "llmlab.cli", "run", str(write_recipe(multi, rec))],
                        cwd=multi, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    a, b = _losses(single), _losses(multi)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-3, (a, b)
    # only rank 0 reports: one stage line and one summary table, not one per process
    assert r2.stdout.count("▶ stage pretrain") == 1, r2.stdout[-3000:]
    assert r2.stdout.count("llmlab run →") == 1, r2.stdout[-3000:]
    info = json.loads((multi / "run" / "pretrain" / "stage.json").read_text())
    assert info["distributed"] == {"world_size": 2, "strategy": "MULTI_CPU", "backend": "gloo"}
    assert "processes: 2 (MULTI_CPU, gloo)" in r2.stdout
    solo = json.loads((single / "run" / "pretrain" / "stage.json").read_text())
    assert solo["distributed"]["world_size"] == 1 and solo["distributed"]["backend"] is None


def test_accelerate_launch_two_processes_on_cpu_match_single_process(tmp_path):
    """accelerate launch --multi_gpu runs torch.distributed.run; without a GPU accelerate trains on
    gloo (MULTI_CPU). Weights after 4 steps equal one process with gradient accumulation 2."""
    from safetensors.torch import load_file

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    rec = copy.deepcopy(TINY)
    rec["stages"] = {"pretrain": rec["stages"]["pretrain"]}
    rec["stages"]["pretrain"].update(max_steps=4, log_every=1, eval_every=100, save_every=100, batch_size=4)
    rec["device"], rec["precision"] = "cpu", "fp32"
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    one = copy.deepcopy(rec)
    one["stages"]["pretrain"]["gradient_accumulation_steps"] = 2
    r1 = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(write_recipe(single, one))],
                        cwd=single, env=env, capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r2 = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                         "--main_process_port", str(port), "-m", "llmlab.cli", "run", str(write_recipe(multi, rec))],
                        cwd=multi, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    info = json.loads((multi / "run" / "pretrain" / "stage.json").read_text())
    assert info["distributed"]["world_size"] == 2
    a = load_file(single / "run" / "pretrain" / "final" / "model.safetensors")
    b = load_file(multi / "run" / "pretrain" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, worst  # byte-equal


def test_sophia_under_ddp_trains_like_one_process(tmp_path):
    """Sophia's Hessian steps run backward(create_graph=True), which DDP's gradient hooks cannot
    take; llmlab averages gradients and Hessian estimates itself (issue 14 item 3)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    rec = copy.deepcopy(TINY)
    rec["stages"] = {"pretrain": rec["stages"]["pretrain"]}
    rec["stages"]["pretrain"].update(max_steps=6, log_every=1, eval_every=100, save_every=100, batch_size=4,
                                     optimizer={"name": "sophia", "lr": 1e-2, "rho": 0.04, "hessian_update_every": 2})
    rec["device"], rec["precision"] = "cpu", "fp32"
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    one = copy.deepcopy(rec)
    one["stages"]["pretrain"]["gradient_accumulation_steps"] = 2
    r1 = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(write_recipe(single, one))],
                        cwd=single, env=env, capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_addr", "127.0.0.1", "--master_port", str(port),
                         "-m", "llmlab.cli", "run", str(write_recipe(multi, rec))],
                        cwd=multi, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    a, b = _losses(single), _losses(multi)
    assert len(a) == len(b) == 6
    assert b[-1] < b[0]  # it trains
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-3, (a, b)
