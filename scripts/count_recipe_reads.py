"""Count how the code outside ``llmlab/recipe/`` reads the resolved recipe as a plain dict, and how many
defaults it types a second time beside the schema (issue #25's measures).

Usage::

    python scripts/count_recipe_reads.py [--by-file] [--list]

The heuristic (static, on the AST of every ``llmlab/**/*.py``):

- **String-key read**: ``X["key"]`` or ``X.get("key", ...)`` (also ``.setdefault`` / ``.pop``)
  where ``"key"`` is a property name declared anywhere in the recipe schema and the receiver ``X``
  looks like a recipe section: its name (a variable, the attribute of ``self.config`` /
  ``ctx.recipe``, or the start of a chain ``recipe["stages"][name]``) is one of :data:`RECIPE_NAMES`,
  or ``X`` is itself a string-key read (each key of a chain counts once). Reads of batches, rows,
  stage.json records or metrics have other receivers and keys and are not counted. A typed object
  (``plan.model.d_model``) is an attribute access, never counted.
- **Literal fallback**: ``X.get("key", LITERAL)`` or ``_get(X, "key", LITERAL)`` with a string key
  from the schema and a literal (number, string, bool, tuple/list/dict display) as the default, on
  any receiver: a default written a second time beside the schema.
- **Default table**: a module-level assignment to a name ending in ``_DEFAULTS`` (a dict of defaults
  that shadows the schema's).

The typed layer that turns the resolved dict into objects (:data:`BUILDER`: llmlab/runplan.py and
the modules it is made of) reads the dict by design, like llmlab/recipe/; its reads are printed
on their own line and are not part of the headline count.

It over- and under-counts at the edges (a local named ``cfg`` that holds something else; a recipe
section bound to an unlisted name), so compare numbers of this script with each other, not with
another tool's.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the modules that build the typed run plan from the resolved dict: the plan itself, the typed
#: sections it is made of (specs, stage params, the training/distributed/dataloader views of
#: config.py, each built from its section by a ``from_dict``), the schema's defaults, and the
#: fingerprints, which hash the resolved sections key for key so that they stay byte-identical
#: (llmlab/fingerprint.py; computed once, in build_run_plan, and kept on each StagePlan)
BUILDER = frozenset({"llmlab/runplan.py", "llmlab/specs.py", "llmlab/stage_params.py", "llmlab/schemafile.py",
                     "llmlab/config.py", "llmlab/fingerprint.py"})

#: names that hold the resolved recipe or one of its sections in llmlab's code
RECIPE_NAMES = frozenset({
    "recipe", "rec", "resolved", "doc", "cfg", "config", "stage_cfg", "src_cfg", "dep_cfg", "model_cfg", "mcfg",
    "tok", "tok_cfg", "tokenizer_cfg", "train_cfg", "ds", "ds_cfg", "dataset", "spec", "lora", "lora_cfg",
    "st", "section", "opt", "opt_cfg", "optimizer", "sched", "scheduler", "logging", "log_cfg", "model_section",
    "stage", "stages", "datasets", "filters", "filt", "reward", "r", "m", "gen", "generation", "distributed",
    "params", "settings", "train", "data_cfg", "ev", "eval_cfg",
})


def schema_keys() -> set[str]:
    """Every property name declared anywhere in the recipe schema."""
    schema = json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())
    keys: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            keys.update((node.get("properties") or {}).keys())
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return keys


def _receiver_name(node: ast.AST) -> str | None:
    """The name a receiver is known by: ``x`` → x, ``self.config`` → config, ``f(...)`` → None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value is not None
    if isinstance(node, (ast.Tuple, ast.List, ast.Dict, ast.Set)):
        return True
    return isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant)


class Counter_(ast.NodeVisitor):
    """Collects (kind, line, text) findings of one module."""

    def __init__(self, keys: set[str], source: str):
        self.keys, self.source = keys, source
        self.found: list[tuple[str, int, str]] = []
        self._reads: set[int] = set()  # ids of nodes counted as reads (chains)

    def _key_read(self, node: ast.AST) -> str | None:
        """The schema key ``node`` reads from a recipe-like receiver, else None."""
        if isinstance(node, ast.Subscript):
            sl = node.slice
            if isinstance(sl, ast.Constant) and isinstance(sl.value, str) and sl.value in self.keys:
                if self._recipe_like(node.value):
                    return sl.value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("get", "setdefault", "pop") and node.args:
            a0 = node.args[0]
            if isinstance(a0, ast.Constant) and isinstance(a0.value, str) and a0.value in self.keys:
                if self._recipe_like(node.func.value):
                    return a0.value
        return None

    def _recipe_like(self, recv: ast.AST) -> bool:
        if isinstance(recv, ast.BoolOp):  # (cfg.get("lora") or {})
            return any(self._recipe_like(v) for v in recv.values)
        if self._key_read(recv) is not None:
            return True
        if isinstance(recv, ast.Subscript):  # recipe["stages"][name]
            return self._recipe_like(recv.value)
        return _receiver_name(recv) in RECIPE_NAMES

    def visit_Subscript(self, node):
        key = self._key_read(node)
        if key is not None and isinstance(node.ctx, ast.Load):
            self.found.append(("read", node.lineno, ast.get_source_segment(self.source, node) or key))
        self.generic_visit(node)

    def visit_Call(self, node):
        key = self._key_read(node)
        if key is not None and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            self.found.append(("read", node.lineno, ast.get_source_segment(self.source, node) or key))
        func_name = _receiver_name(node.func)
        # literal fallbacks: X.get("key", LITERAL) / _get(X, "key", LITERAL)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and len(node.args) == 2:
            a0, a1 = node.args
            if isinstance(a0, ast.Constant) and a0.value in self.keys and _is_literal(a1):
                self.found.append(("fallback", node.lineno, ast.get_source_segment(self.source, node) or ""))
        elif func_name == "_get" and len(node.args) == 3:
            a1, a2 = node.args[1], node.args[2]
            if isinstance(a1, ast.Constant) and a1.value in self.keys and _is_literal(a2):
                self.found.append(("fallback", node.lineno, ast.get_source_segment(self.source, node) or ""))
        self.generic_visit(node)


def scan(path: Path, keys: set[str]) -> list[tuple[str, int, str]]:
    """Findings of one file: ``(kind, line, source text)``; kind is read | fallback | table."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    c = Counter_(keys, source)
    c.visit(tree)
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name) and t.id.endswith("_DEFAULTS"):
                c.found.append(("table", node.lineno, t.id))
    return c.found


def main(argv=None) -> int:
    """Print the counts; 0."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--by-file", action="store_true", help="per-file counts of string-key reads")
    ap.add_argument("--list", action="store_true", help="every finding, file:line")
    args = ap.parse_args(argv)
    keys = schema_keys()
    totals: Counter = Counter()
    per_file: Counter = Counter()
    for path in sorted((ROOT / "llmlab").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        inside = rel.startswith("llmlab/recipe/")
        for kind, line, text in scan(path, keys):
            if rel in BUILDER:
                totals[(kind, "builder")] += 1
                continue
            totals[(kind, inside)] += 1
            if kind == "read" and not inside:
                per_file[rel] += 1
            if args.list and not inside:
                print(f"{rel}:{line}: {kind}: {text.splitlines()[0] if text else ''}")
    out_reads = totals[("read", False)]
    print(f"string-key reads of recipe dicts outside llmlab/recipe/: {out_reads} "
          f"in {len(per_file)} files (inside llmlab/recipe/: {totals[('read', True)]}; "
          f"in the run-plan builder {', '.join(sorted(BUILDER))}: {totals[('read', 'builder')]})")
    print(f"literal fallbacks (.get(key, literal), _get(cfg, key, literal)) outside llmlab/recipe/: "
          f"{totals[('fallback', False)]}")
    print(f"default tables (*_DEFAULTS) outside llmlab/recipe/: {totals[('table', False)]}")
    if args.by_file:
        for rel, n in per_file.most_common():
            print(f"  {n:4d}  {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
