"""Structural checks on the llmlab package: no import cycles.

The import graph is read with ``ast`` (nothing is imported), counting every ``import llmlab...`` and
``from llmlab... import`` anywhere in a module, lazy imports inside functions included: a lazy import
hides a cycle from Python but not from a reader. Importing a submodule also imports its parent
packages, so those count as edges too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "llmlab"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module name -> the llmlab modules it imports (anywhere in the file, parents included)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(known(a.name) for a in node.names if a.name.split(".")[0] == "llmlab")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "llmlab":
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in files else known(node.module))
        for d in [d for d in deps if d]:
            parts = d.split(".")
            deps.update(".".join(parts[:i]) for i in range(2, len(parts)))
        graph[mod] = {d for d in deps if d and d != mod and not mod.startswith(d + ".")}
    return graph


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph with modules collapsed to llmlab's subpackages (llmlab.stages, llmlab.rl, ...)."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    out: dict[str, set[str]] = {}
    for a, deps in graph.items():
        out.setdefault(top(a), set()).update(top(d) for d in deps if top(d) != top(a) and d != "llmlab")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycles_between_subpackages():
    assert cycles(package_graph(import_graph())) == []


# -- the stage spec registry -----------------------------------------------------------------------
def _schema():
    import json

    return json.loads((ROOT.parent / "schemas" / "recipe.schema.json").read_text())


def test_schema_stage_types_equal_the_registry_and_the_implementations():
    import importlib

    from llmlab.stage_specs import STAGE_SPECS
    from llmlab.stages import stage_class

    schema = _schema()
    types = schema["$defs"]["stage_common"]["properties"]["type"]["enum"]
    assert types == list(STAGE_SPECS)
    assert sorted(k[len("stage_"):] for k in schema["$defs"] if k.startswith("stage_") and k != "stage_common") \
        == sorted(STAGE_SPECS)
    modules = {p.stem for p in (ROOT / "stages").glob("*.py")}
    for t, spec in STAGE_SPECS.items():
        cls = stage_class(t)
        assert cls.type == t, (t, cls)
        module = spec.implementation.partition(":")[0]
        assert importlib.import_module(module).__file__.startswith(str(ROOT / "stages")), module
        assert module.rsplit(".", 1)[1] in modules


def _schema_props(schema: dict, node: dict) -> dict:
    """Property name -> property schema of a section, through $ref and allOf (an independent walk)."""
    out: dict = _schema_props(schema, _lookup(schema, node["$ref"])) if "$ref" in node else {}
    for part in node.get("allOf", []):
        out.update(_schema_props(schema, part))
    for k, v in node.get("properties", {}).items():
        while "$ref" in v and "default" not in v:
            v = _lookup(schema, v["$ref"])
        out[k] = v
    return out


def _lookup(schema: dict, ref: str) -> dict:
    node = schema
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_each_spec_agrees_with_its_schema_section():
    from llmlab.recipe.schema import stage_defaults
    from llmlab.stage_specs import STAGE_SPECS

    schema = _schema()
    formats = set(schema["$defs"]["dataset"]["properties"]["format"]["enum"])
    for t, spec in STAGE_SPECS.items():
        props = _schema_props(schema, schema["$defs"][f"stage_{t}"])
        assert set(spec.formats) <= formats, t
        if spec.samples_key:
            assert spec.samples_key in props, t
        if spec.generates:
            assert "max_new_tokens" in props, t
        if spec.trains:
            assert {"from", "max_steps", "optimizer", "scheduler"} <= set(props), t
        else:
            assert "models" in props and "max_steps" not in props, t
        # the defaults code falls back on are the schema's, key for key (none typed a second time)
        defaults = stage_defaults(t)
        for k, v in props.items():
            if isinstance(v.get("default"), dict):  # an object's default is completed by its own keys' defaults
                assert defaults[k].items() >= v["default"].items(), (t, k)
            elif v.get("default") is not None:
                assert defaults[k] == v["default"], (t, k)
    assert stage_defaults("grpo")["group_size"] == 4


def test_plan_falls_back_on_the_schema_defaults():
    from types import SimpleNamespace

    from llmlab.config import TrainingConfig
    from llmlab.plan import stage_tokens
    from llmlab.stage_params import params_of
    from llmlab.stage_specs import stage_spec

    def stage(cfg):  # the typed parts of a StagePlan that plan reads, from a bare section
        return SimpleNamespace(spec=stage_spec(cfg["type"]), training=TrainingConfig.from_dict(cfg),
                               params=params_of(cfg["type"], cfg))

    bare = {"type": "grpo", "max_steps": 2, "batch_size": 3, "seq_len": 0}
    assert stage_tokens(stage(bare)) == stage_tokens(stage({**bare, "group_size": 4, "max_new_tokens": 32})) \
        == 2 * 3 * 4 * 32
    dpo = {"type": "dpo", "max_steps": 2, "batch_size": 3, "seq_len": 10}
    assert stage_tokens(stage(dpo)) == 2 * 3 * 2 * 10
