"""``distributed.async_checkpoint: true`` (FSDP, 2 gloo processes): the step loop goes on while
a checkpoint's shards are written, a kill during that write leaves the previous checkpoint
intact, and the resumed run reaches bitwise the weights of a run that never stopped."""

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.runner.test_distributed import ENV, _launch, _recipe
from tests.tiny import write_recipe

pytestmark = pytest.mark.slow

ASYNC = {"distributed": {"strategy": "fsdp", "async_checkpoint": True}}

# loaded into every process of the blocked run (sitecustomize): the DCP writer of checkpoint
# step 4 never finishes, as a slow disk would not before the kill
BLOCK_STEP_4 = """
import time
from torch.distributed.checkpoint import filesystem as _fs

_write = _fs.FileSystemWriter.write_data


def _blocked(self, plan, planner):
    if "step-000004" in str(self.path):
        time.sleep(3600)
    return _write(self, plan, planner)


_fs.FileSystemWriter.write_data = _blocked
"""


def _steps_logged(d: Path) -> list[int]:
    path = d / "run" / "pretrain" / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    return [r["step"] for r in rows if "loss" in r]


def _kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker under it."""
    tree = psutil.Process(p.pid).children(recursive=True)
    for proc in [psutil.Process(p.pid), *tree]:
        proc.kill()
    p.wait()
    psutil.wait_procs(tree, timeout=30)


def test_kill_during_async_save_keeps_previous_checkpoint_and_resume_is_bitwise(tmp_path):
    from llmlab.train import checkpoint as ck

    rec = _recipe(("pretrain",), ASYNC, max_steps=8, save_every=2, keep_last=5)
    a, b, hook = tmp_path / "a", tmp_path / "b", tmp_path / "hook"
    for d in (a, b, hook):
        d.mkdir()
    (hook / "sitecustomize.py").write_text(BLOCK_STEP_4)

    def cmd(d: Path) -> list[str]:
        return [sys.executable, *_launch("torchrun"), "-m", "llmlab.cli", "run", str(write_recipe(d, rec))]

    done = subprocess.run(cmd(a), cwd=a, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ckpts = a / "run" / "pretrain" / "checkpoints"
    assert [c.name for c in ck.list_checkpoints(ckpts)] == [f"step-00000{s}" for s in (2, 4, 6, 8)]
    assert all(ck.verify(c) is None for c in ck.list_checkpoints(ckpts))

    blocked = {**ENV, "PYTHONPATH": f"{hook}:{ENV['PYTHONPATH']}"}
    p = subprocess.Popen(cmd(b), cwd=b, env=blocked, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()  # the loop trains step 5 while step 4's shards are still being written
        while 5 not in _steps_logged(b) and p.poll() is None and time.time() - t0 < 240:
            time.sleep(0.05)
        assert p.poll() is None, "the run ended before it could be killed"
        assert 5 in _steps_logged(b), "step 5 did not run while checkpoint 4 was in flight"
    finally:
        _kill_tree(p)
    ckpts = b / "run" / "pretrain" / "checkpoints"
    assert [c.name for c in ck.list_checkpoints(ckpts)] == ["step-000002"]
    assert ck.verify(ckpts / "step-000002") is None
    assert list(ckpts.glob(".tmp-step-000004-*")), "checkpoint 4 was not in flight"
    again = subprocess.run(cmd(b), cwd=b, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    info = json.loads((b / "run" / "pretrain" / "stage.json").read_text())
    assert info["resumed_from"] == 2 and info["distributed"]["strategy"] == "FSDP"
    assert not list(ckpts.glob(".tmp-*"))  # the killed write's leftovers are pruned
    x = load_file(a / "run" / "pretrain" / "final" / "model.safetensors")
    y = load_file(b / "run" / "pretrain" / "final" / "model.safetensors")
    assert x.keys() == y.keys()
    assert max(float((x[k] - y[k]).abs().max()) for k in x) == 0.0
