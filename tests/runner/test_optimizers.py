"""Every optimizer and schedule trains the shrunken quick-start pretrain stage below its start."""

import copy
import json

import pytest
import torch

from llmlab.commands.run import run_command
from tests.numerics import learning_note
from tests.tiny import TINY, write_recipe

pytestmark = pytest.mark.slow

CASES = [
    ({"name": "adamw", "lr": 5e-3}, {"name": "cosine", "warmup_steps": 3}),
    ({"name": "adafactor", "lr": 3e-2}, {"name": "linear", "warmup_steps": 3}),
    ({"name": "lion", "lr": 1e-3}, {"name": "polynomial", "warmup_steps": 3, "power": 2.0}),
    ({"name": "sophia", "lr": 1e-2, "rho": 0.04, "hessian_update_every": 5}, {"name": "none"}),
    ({"name": "muon", "lr": 2e-2, "momentum": 0.95}, {"name": "cosine", "warmup_steps": 0}),
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("optim")


@pytest.mark.parametrize("opt,sched", CASES, ids=[c[0]["name"] for c in CASES])
def test_optimizer_and_schedule_lower_eval_loss(base_dir, opt, sched):
    rec = copy.deepcopy(TINY)
    rec["stages"] = {"pretrain": rec["stages"]["pretrain"]}
    rec["stages"]["pretrain"].update(optimizer=opt, scheduler=sched, max_steps=25, eval_every=25, save_every=25)
    d = base_dir / opt["name"]
    d.mkdir()
    assert run_command(write_recipe(d, rec)) == 0
    info = json.loads((d / "run" / "pretrain" / "stage.json").read_text())
    first, last = info["first_eval"]["eval_loss"], info["last_eval"]["eval_loss"]
    print(f"{opt['name']}/{sched['name']}: eval loss {first:.4f} -> {last:.4f}")
    assert last < first - 0.1, learning_note(f"{opt} {sched}: eval loss {first:.4f} -> {last:.4f}")


def test_save_best_only_keeps_the_best_eval_weights(tmp_path):
    from safetensors.torch import load_file

    rec = copy.deepcopy(TINY)
    rec["stages"] = {"pretrain": rec["stages"]["pretrain"]}
    # a learning rate far too high: the eval loss rises again after its early minimum
    rec["stages"]["pretrain"].update(max_steps=30, eval_every=5, save_every=100, keep_last=1, save_best_only=True,
                                     optimizer={"name": "adamw", "lr": 0.2}, scheduler={"name": "none"})
    assert run_command(write_recipe(tmp_path, rec)) == 0
    stage = tmp_path / "run" / "pretrain"
    evals = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    best = min((r for r in evals if r["step"] > 0), key=lambda r: r["eval_loss"])
    ckpt = stage / "checkpoints" / f"step-{best['step']:06d}"
    assert ckpt.is_dir()  # the best checkpoint survives keep_last=1
    final = load_file(str(stage / "final" / "model.safetensors"))
    kept = load_file(str(ckpt / "model.safetensors"))
    for k, v in kept.items():
        assert torch.equal(final[k], v), k
