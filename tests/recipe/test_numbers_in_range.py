"""Refuse what cannot train (issue 24, item 4): every number finite and in range, seeds below 2^32,
a warm-up that outlasts the stage warned about. Each test failed on the code of 2026-12-06."""

from __future__ import annotations

import copy

import pytest

from llmlab.recipe import load_recipe
from tests.tiny import TINY, write_recipe

QUICKSTART = "recipes/quickstart.yaml"

# every key the issue names, each set to a non-finite value through --set
NON_FINITE = [
    ("stages.sft.optimizer.lr", ".nan"),
    ("model.norm_eps", ".inf"),
    ("stages.pretrain.scheduler.min_lr_ratio", ".nan"),
    ("model.init_std", ".nan"),
    ("stages.sft.optimizer.beta1", ".nan"),
    ("stages.sft.optimizer.beta2", "-.inf"),
    ("stages.sft.optimizer.weight_decay", ".inf"),
    ("stages.sft.grad_clip", ".inf"),
    ("model.rope_theta", ".nan"),
    ("datasets.chat.eval_split", ".nan"),
    ("stages.sft.datasets.chat", ".inf"),
    ("model.init_std", "1e400"),  # beyond a double: YAML reads it as inf
]


@pytest.mark.parametrize("key,value", NON_FINITE)
def test_non_finite_numbers_are_errors(key, value):
    rec, errors = load_recipe(QUICKSTART, [f"{key}={value}"])
    assert rec is None
    mine = [e for e in errors if e.path == key]
    assert len(mine) == 1, errors  # one error per key, not the schema's range message besides
    assert "not a finite number" in mine[0].message
    assert (mine[0].file, mine[0].line) == ("--set", 1)


def test_non_finite_number_in_a_file_points_at_its_line(tmp_path):
    path = write_recipe(tmp_path)
    text = path.read_text().replace("lr: 0.002", "lr: .nan")
    assert text != path.read_text()
    path.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "lr: .nan" in t)
    rec, errors = load_recipe(path)
    assert rec is None
    assert [(e.path, e.line) for e in errors] == [("stages.sft.optimizer.lr", line)]
    assert str(errors[0]).startswith(f"{path}:{line}:")


def test_every_non_finite_number_is_reported_at_once():
    rec, errors = load_recipe(QUICKSTART, [f"{k}={v}" for k, v in NON_FINITE[:6]])
    assert rec is None
    assert sorted(e.path for e in errors) == sorted(k for k, _ in NON_FINITE[:6])


@pytest.mark.parametrize("seed,ok", [(0, True), (2**32 - 1, True), (2**32, False), (2**70, False), (-1, False)])
def test_seed_is_below_two_to_the_32(seed, ok):
    rec, errors = load_recipe(QUICKSTART, [f"seed={seed}"])
    assert (rec is not None) == ok, errors
    if not ok:
        assert [e.path for e in errors] == ["seed"]


def test_integer_beyond_int64_is_an_error():
    rec, errors = load_recipe(QUICKSTART, [f"stages.pretrain.max_steps={2**70}"])
    assert rec is None
    assert [e.path for e in errors] == ["stages.pretrain.max_steps"]
    assert "64-bit" in errors[0].message


@pytest.mark.parametrize("warmup,steps,warned", [(1000, 4, True), (4, 4, True), (3, 4, False), (0, 4, False)])
def test_warmup_that_outlasts_the_stage_is_warned(warmup, steps, warned):
    warnings: list = []
    rec, errors = load_recipe(QUICKSTART, [f"stages.dpo.scheduler.warmup_steps={warmup}", f"stages.dpo.max_steps={steps}"],
                              warnings=warnings)
    assert errors == [] and rec is not None  # a warning: shortening a recipe with --set stays possible
    mine = [w for w in warnings if w.path == "stages.dpo.scheduler.warmup_steps"]
    assert len(mine) == int(warned)
    if warned:
        assert mine[0].severity == "warning" and f"max_steps ({steps})" in mine[0].message


def test_run_prints_the_warmup_warning(tmp_path, capsys):
    from llmlab.commands.run import run_command

    rec = copy.deepcopy(TINY)
    rec["stages"] = {"pretrain": {**rec["stages"]["pretrain"], "max_steps": 1, "eval_every": 1, "save_every": 1}}
    (tmp_path / "run").write_text("a file where the run directory would go: the run stops before training")
    code = run_command(write_recipe(tmp_path, rec))
    assert code == 1
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "warning: stages.pretrain.scheduler.warmup_steps: warmup_steps (4) >= max_steps (1)" in out


def test_shipped_recipes_have_no_warmup_warning():
    import glob

    for path in sorted(glob.glob("recipes/*.yaml")):
        warnings: list = []
        rec, errors = load_recipe(path, warnings=warnings)
        assert errors == [], path
        assert not [w for w in warnings if "warmup_steps" in w.path], path
