"""Ratchets on how llmlab reads the recipe (scripts/count_recipe_reads.py): no default table beside
the schema, and the literal fallbacks (``.get(key, literal)`` on a recipe key) outside llmlab/recipe/
and the string-key reads of recipe dicts outside llmlab/recipe/ and the run-plan builder may only
fall (lower the bounds when you remove some). Issue #25's target for the reads was <= 40."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the count when the bound was last lowered (2026-12-06: 88 at 44ca4b7, 26 after issue #25's first step, 6 once
#: the plan, the runner, the stages and the data read the typed RunPlan, 5 when report.py stopped defaulting stages)
MAX_FALLBACKS = 5

#: string-key reads (2026-12-06: 406 at 44ca4b7, 318 after issue #25's first step, 33 once the plan, the runner,
#: the stages and the data read the typed RunPlan, 30 when `llmlab plan`'s header read the RunPlan)
MAX_READS = 27


def _counter():
    spec = importlib.util.spec_from_file_location("count_recipe_reads", ROOT / "scripts" / "count_recipe_reads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _findings() -> dict[str, list[str]]:
    mod = _counter()
    keys = mod.schema_keys()
    out: dict[str, list[str]] = {"read": [], "fallback": [], "table": []}
    for path in sorted((ROOT / "llmlab").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("llmlab/recipe/") or rel in mod.BUILDER:
            continue
        for kind, line, text in mod.scan(path, keys):
            out[kind].append(f"{rel}:{line}: {text.splitlines()[0] if text else ''}")
    return out


def test_no_default_table_beside_the_schema():
    assert _findings()["table"] == []


def test_literal_fallbacks_only_fall():
    found = _findings()["fallback"]
    assert len(found) <= MAX_FALLBACKS, "a default typed beside the schema; read it from the schema:\n" + "\n".join(found)


def test_string_key_reads_only_fall():
    found = _findings()["read"]
    assert len(found) <= MAX_READS, "read the typed RunPlan / StagePlan instead of the recipe dict:\n" + "\n".join(found)


def test_the_counter_sees_each_kind(tmp_path):
    """The heuristic finds a read, a fallback and a table in a known snippet (so it can fail)."""
    mod = _counter()
    path = tmp_path / "snippet.py"
    path.write_text('X_DEFAULTS = {}\n\n\ndef f(recipe, cfg, batch):\n'
                    '    return recipe["stages"][0], cfg.get("lr", 0.1), batch["input_ids"], cfg.lr\n')
    kinds = sorted(k for k, _, _ in mod.scan(path, mod.schema_keys()))
    assert kinds == ["fallback", "read", "read", "table"]
