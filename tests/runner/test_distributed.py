"""Two processes on CPU (gloo) under torchrun and accelerate launch: the same training as one
process with the same global batch (gradient accumulation 2)."""

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


def _free_port() -> int:
    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def _recipe(stages=("pretrain",), top: dict | None = None, per_stage: dict | None = None, **stage) -> dict:
    """TINY with ``stages`` only, each updated with ``stage`` (and ``per_stage[name]``), on CPU in
    fp32, plus ``top`` keys."""
    rec = copy.deepcopy(TINY)
    rec["stages"] = {k: rec["stages"][k] for k in stages}
    for name, cfg in rec["stages"].items():
        cfg.update({"log_every": 1, "eval_every": 100, "save_every": 100, "batch_size": 4, **stage})
        cfg.update((per_stage or {}).get(name, {}))
    rec["device"], rec["precision"] = "cpu", "fp32"
    rec.update(copy.deepcopy(top or {}))
    return rec


def _launch(launcher: str) -> list[str]:
    """The python arguments that start two processes on this machine under ``launcher``."""
    port = str(_free_port())
    return {
        "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                     "--master_port", port],
        # accelerate launch --multi_gpu runs torch.distributed.run; without a GPU it trains on gloo
        "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                       "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port],
    }[launcher]


def _one_and_two(tmp_path: Path, launcher: str, stages=("pretrain",), top: dict | None = None,
                 per_stage: dict | None = None, **stage) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Train TINY's ``stages`` once in one process with gradient accumulation 2 and once in two
    processes (``launcher``: torchrun or accelerate) without; ``top``: extra recipe keys (e.g.
    ``distributed``). Returns (single dir, multi dir, the two-process run)."""
    env = ENV
    rec = _recipe(stages, top, per_stage, **stage)
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    one = copy.deepcopy(rec)
    for cfg in one["stages"].values():
        cfg["gradient_accumulation_steps"] = 2  # global batch 2 × 4, same micro-batches
    r1 = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(write_recipe(single, one))],
                        cwd=single, env=env, capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = subprocess.run([sys.executable, *_launch(launcher), "-m", "llmlab.cli", "run", str(write_recipe(multi, rec))],
                        cwd=multi, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    return single, multi, r2


def test_torchrun_two_processes_match_single_process(tmp_path):
    single, multi, r2 = _one_and_two(tmp_path, "torchrun", max_steps=6)
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
    """Weights after 4 steps are byte-equal to one process with gradient accumulation 2."""
    from safetensors.torch import load_file

    single, multi, _ = _one_and_two(tmp_path, "accelerate", max_steps=4)
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
    single, multi, _ = _one_and_two(tmp_path, "torchrun", max_steps=6, optimizer={
        "name": "sophia", "lr": 1e-2, "rho": 0.04, "hessian_update_every": 2})
    a, b = _losses(single), _losses(multi)
    assert len(a) == len(b) == 6
    assert b[-1] < b[0]  # it trains
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-3, (a, b)


def test_accelerate_launch_that_started_one_process_is_called_out():
    # what accelerate's simple launcher leaves (num_processes 2, no --multi_gpu) against a real
    # multi-process launch, torchrun and a plain run
    from llmlab.console import single_process_launch_warning

    simple = {"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert "started ONE process" in single_process_launch_warning(simple)
    assert single_process_launch_warning({**simple, "WORLD_SIZE": "2", "RANK": "0"}) is None
    assert single_process_launch_warning({"ACCELERATE_USE_CPU": "False"}) is None  # asked for one
    assert single_process_launch_warning({"MASTER_PORT": "1", "WORLD_SIZE": "2", "RANK": "1"}) is None
    assert single_process_launch_warning({}) is None
