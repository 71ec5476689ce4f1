"""Two ranks on an unprepared corpus: the tokenizer and token store are prepared before the
process group exists, so a preparation longer than the collective timeout does not fail the run
(no rank waits for it inside a barrier)."""

import json
import subprocess
import sys

import pytest

from tests.runner.test_distributed import ENV, _launch, _recipe
from tests.tiny import write_recipe

pytestmark = pytest.mark.slow

# loaded into every process (sitecustomize): collectives time out after 5 s, and writing a
# token store takes 8 s longer than it does (as a large corpus would)
SLOW_PREPARE_SHORT_TIMEOUT = """
import datetime, os, time
import torch.distributed as _dist
import llmlab.data.store as _store

_init = _dist.init_process_group


def _short(*args, **kwargs):
    kwargs["timeout"] = datetime.timedelta(seconds=5)
    return _init(*args, **kwargs)


_build = _store._build_store_locked


def _slow(path, *args, **kwargs):
    with open(os.environ["SLOW_LOG"], "a") as f:
        f.write(f"{os.environ.get('RANK')} {path}\\n")
    time.sleep(8)
    return _build(path, *args, **kwargs)


_dist.init_process_group = _short
_store._build_store_locked = _slow
"""


def test_two_ranks_prepare_an_unprepared_corpus_longer_than_the_collective_timeout(tmp_path):
    hook, run = tmp_path / "hook", tmp_path / "run"
    hook.mkdir()
    run.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_PREPARE_SHORT_TIMEOUT)
    log = tmp_path / "builds.txt"
    env = {**ENV, "PYTHONPATH": f"{hook}:{ENV['PYTHONPATH']}", "SLOW_LOG": str(log),
           "LLMLAB_TOKEN_STORE": str(tmp_path / "stores")}
    rec = _recipe(("pretrain",), {"distributed": {"strategy": "fsdp"}}, max_steps=2)
    r = subprocess.run([sys.executable, *_launch("torchrun"), "-m", "llmlab.cli", "run", str(write_recipe(run, rec))],
                       cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    builds = log.read_text().splitlines()
    # each store was written once (by one rank, the other waited on its lock), 8 s > the timeout
    assert builds and len(builds) == len({b.split()[1] for b in builds}), builds
    info = json.loads((run / "run" / "pretrain" / "stage.json").read_text())
    assert info["distributed"]["world_size"] == 2 and info["steps"] == 2
