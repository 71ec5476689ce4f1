"""Bodies of ``llmlab validate`` and ``llmlab schema`` (kept out of cli.py so they stay torch-free)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmlab.recipe.api import load_recipe
from llmlab.recipe.schema import schema_path

FORMATS = ("text", "json")


def validate_command(paths: list[Path], overrides: list[str], fmt: str) -> int:
    """Validate every recipe in ``paths`` with the ``--set`` ``overrides``; print every error.

    Text format: one ``FILE:LINE:COL: error: path: message`` line per error, ``OK FILE`` per valid
    recipe. JSON format: ``{"ok": bool, "results": [{"file", "ok", "errors": [...]}]}``.

    Returns:
        0 when every recipe is valid, 1 when any is invalid, 2 on a usage error (unknown format,
        missing file, no recipe given).
    """
    if fmt not in FORMATS:
        print(f"error: --format must be one of {', '.join(FORMATS)}, got {fmt!r}", file=sys.stderr)
        return 2
    if not paths:
        print("error: give at least one recipe file", file=sys.stderr)
        return 2
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        for p in missing:
            print(f"error: {p}: no such recipe file", file=sys.stderr)
        return 2
    results = []
    for p in paths:
        warnings: list = []
        _, errors = load_recipe(p, overrides, warnings=warnings)
        result = {"file": str(p), "ok": not errors, "errors": [e.to_dict() for e in errors]}
        if warnings:  # only recipes that name code have warnings (see llmlab.recipe.codeuse)
            result["warnings"] = [w.to_dict() for w in warnings]
        results.append(result)
        if fmt == "text":
            for w in warnings:
                print(w)
            if errors:
                for e in errors:
                    print(e)
                print(f"{p}: {len(errors)} error{'s' if len(errors) != 1 else ''}", file=sys.stderr)
            else:
                print(f"OK {p}")
    ok = all(r["ok"] for r in results)
    if fmt == "json":
        print(json.dumps({"ok": ok, "results": results}, indent=2))
    return 0 if ok else 1


def schema_command() -> int:
    """Print the recipe JSON Schema to stdout. Returns 0."""
    sys.stdout.write(schema_path().read_text(encoding="utf-8"))
    return 0
