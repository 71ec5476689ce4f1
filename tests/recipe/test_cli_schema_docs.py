"""llmlab validate / schema, the schema itself, the generated docs, and the no-torch guarantee."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from llmlab.recipe import docgen, load_schema
from llmlab.recipe.cli_support import schema_command, validate_command
from llmlab.recipe.schema import SCHEMA_NAME

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
BAD = ROOT / "tests" / "recipes" / "bad"


def test_validate_ok(capsys):
    assert validate_command([QUICKSTART], [], "text") == 0
    assert capsys.readouterr().out.strip() == f"OK {QUICKSTART}"


def test_validate_invalid_prints_every_error(capsys):
    bad = BAD / "d_model_heads.yaml"
    assert validate_command([QUICKSTART, bad], ["stages.sft.optimizer.rho=1"], "text") == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("--set:1:1: error: stages.sft.optimizer.rho: unknown key 'rho'") for line in out), out
    assert any(line.startswith(f"{bad}:9:3: error: model.d_model: d_model (64) must be divisible by n_heads (5)") for line in out), out


def test_validate_json(capsys):
    bad = BAD / "undefined_dataset.yaml"
    assert validate_command([QUICKSTART, bad], [], "json") == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    good, wrong = data["results"]
    assert good == {"file": str(QUICKSTART), "ok": True, "errors": []}
    assert wrong["ok"] is False
    assert {"file", "line", "col", "path", "message"} <= set(wrong["errors"][0])
    assert any(e["path"] == "stages.sft.datasets.chats" and e["line"] == 25 for e in wrong["errors"])


@pytest.mark.parametrize("paths,fmt", [([QUICKSTART], "xml"), ([Path("/no/such/recipe.yaml")], "text"), ([], "text")])
def test_validate_usage_errors(paths, fmt, capsys):
    assert validate_command(paths, [], fmt) == 2
    assert "error:" in capsys.readouterr().err


def test_schema_command_prints_the_schema(capsys):
    assert schema_command() == 0
    assert json.loads(capsys.readouterr().out) == load_schema()


def test_schema_is_valid_2020_12():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def _walk(node, path="#"):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}/{i}")


def test_every_key_has_a_description_and_every_object_is_closed():
    schema = load_schema()
    for path, node in _walk(schema):
        if "/properties/" in path and path.rsplit("/", 2)[-2] == "properties" and "$ref" not in node and "/if/" not in path:
            assert node.get("description"), f"{path} has no description"
        if node.get("type") == "object" and "properties" in node and "/if/" not in path:
            closed = node.get("additionalProperties") is False or node.get("unevaluatedProperties") is False
            dispatch = "allOf" in node  # variants (model, stage, optimizer, scheduler) close each branch
            assert closed or dispatch, f"{path} accepts unknown keys"
    for name, d in schema["$defs"].items():
        if name.split("_")[0] in ("model", "stage", "optimizer", "scheduler") and "_" in name and not name.endswith("_common"):
            assert d["unevaluatedProperties"] is False, name


def test_packaged_schema_copy_matches():
    copy = Path(docgen.__file__).resolve().parent / SCHEMA_NAME
    assert copy.read_text(encoding="utf-8") == (ROOT / "schemas" / SCHEMA_NAME).read_text(encoding="utf-8")


def test_docs_are_up_to_date():
    assert docgen.main(["--check"]) == 0, "run: python -m llmlab.recipe.docgen"
    docs = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    for key in ("d_model", "n_kv_heads", "sliding_window", "min_lr_ratio", "hessian_update_every", "target_modules",
                "reference_from", "mini_batch_size", "max_bad_fraction"):
        assert f"`{key}`" in docs


def test_validate_imports_neither_torch_nor_transformers():
    code = (
        "import sys, json\n"
        "sys.argv = ['llmlab', 'validate', sys.argv[1]]\n"
        "from llmlab.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code, str(QUICKSTART)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "torch": False, "transformers": False}, out.stderr
