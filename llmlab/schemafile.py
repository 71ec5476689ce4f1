"""The recipe JSON Schema file and its defaults: loading, ``$ref`` resolution and
:func:`fill_defaults`, the one path by which a default reaches a value (pure Python; imports
nothing from llmlab, so any package may use it: :mod:`llmlab.recipe.schema` re-exports it).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import jsonschema
from jsonschema import Draft202012Validator

SCHEMA_NAME = "recipe.schema.json"


def schema_path() -> Path:
    """Where the schema is read from: ``schemas/`` at the repository root (editable installs and
    checkouts), else the copy shipped inside the package (``llmlab/recipe/recipe.schema.json``)."""
    repo = Path(__file__).resolve().parents[1] / "schemas" / SCHEMA_NAME
    if repo.is_file():
        return repo
    return Path(__file__).resolve().parent / "recipe" / SCHEMA_NAME


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    """The recipe JSON Schema as a dict (cached).

    Raises:
        FileNotFoundError: neither the repository nor the packaged copy exists.
    """
    return json.loads(schema_path().read_text(encoding="utf-8"))


def resolve_ref(node: dict) -> dict:
    """Follow a local ``$ref`` (``#/$defs/...``) chain to the schema it names."""
    root = load_schema()
    seen = 0
    while isinstance(node, dict) and "$ref" in node and set(node) - {"description"} == {"$ref"} and seen < 20:
        node = _lookup(root, node["$ref"])
        seen += 1
    return node


def _lookup(root: dict, ref: str) -> dict:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $refs are supported, got {ref!r}")
    node = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _prop_order(node: dict) -> list[str]:
    out: list[str] = []
    if "$ref" in node:
        out.extend(_prop_order(_lookup(load_schema(), node["$ref"])))
    out.extend(k for k in node.get("properties", {}) if k not in out)
    return out


def fill_defaults(node: dict, instance) -> None:
    """Fill, in place, every absent key of ``instance`` that has a non-null ``default`` in ``node``,
    descending into objects, ``additionalProperties`` maps, arrays of objects, ``$ref``, ``allOf``
    and the ``then``/``else`` branch whose ``if`` matches; keys of closed objects are put in schema
    order. Keys whose default is null stay absent (see docs/architecture.md). Wrong-typed values are
    left alone."""
    if not isinstance(node, dict):
        return
    if "$ref" in node:
        fill_defaults(_lookup(load_schema(), node["$ref"]), instance)
    if isinstance(instance, dict):
        props = node.get("properties", {})
        for key, sub in props.items():
            sub_r = resolve_ref(sub)
            if key not in instance and isinstance(sub_r, dict) and sub_r.get("default") is not None:
                instance[key] = copy.deepcopy(sub_r["default"])
        for key, sub in props.items():
            if key in instance:
                fill_defaults(sub, instance[key])
        addl = node.get("additionalProperties")
        if isinstance(addl, dict):
            for key, value in instance.items():
                if key not in props:
                    fill_defaults(addl, value)
        for sub in node.get("allOf", []):
            fill_defaults(sub, instance)
        if "if" in node:
            try:
                ok = _validator_of(node["if"]).is_valid(instance)
            except jsonschema.exceptions.SchemaError:  # pragma: no cover
                ok = False
            branch = node.get("then") if ok else node.get("else")
            if branch is not None:
                fill_defaults(branch, instance)
        if node.get("unevaluatedProperties") is False or node.get("additionalProperties") is False:
            order = _prop_order(node)
            keys = [k for k in order if k in instance] + [k for k in instance if k not in order]
            items = [(k, instance.pop(k)) for k in keys]
            instance.update(items)
    elif isinstance(instance, list) and isinstance(node.get("items"), dict):
        for item in instance:
            fill_defaults(node["items"], item)



#: id(schema node) -> (node, its validator): built once per ``if`` of the schema, not per recipe key
_NODE_VALIDATORS: dict = {}


def _validator_of(node: dict):
    """A validator for a sub-schema (an ``if``), cached while the node lives (the node is kept)."""
    hit = _NODE_VALIDATORS.get(id(node))
    if hit is None or hit[0] is not node:
        hit = _NODE_VALIDATORS[id(node)] = (node, Draft202012Validator(node))
    return hit[1]


def schema_filled(ref: str, section: dict | None, nulls: bool = False) -> dict:
    """A deep copy of a recipe ``section`` with the schema's defaults at ``ref`` filled in
    (:func:`fill_defaults`: keys whose default is null stay absent). With ``nulls``, every key whose
    schema default is an explicit null is present as None (also in the nested sections present),
    so code and cache keys see the same keys whether or not the recipe gave them. For code that is
    also handed a bare section (a model or LoRA section alone, in tests and helpers); a resolved
    recipe is already filled."""
    out = copy.deepcopy(dict(section or {}))
    fill_defaults({"$ref": ref}, out)
    if nulls:
        _fill_nulls(resolve_ref(load_schema() if ref == "#" else _lookup(load_schema(), ref)), out)
    return out


def top_level(recipe: dict, key: str):
    """``recipe[key]``, or the schema's default of top-level ``key`` when ``recipe`` (a bare dict in
    a test or helper) lacks it; a resolved recipe has every top-level key whose default is not null.

    Raises:
        KeyError: the schema has no top-level ``key``.
    """
    if key in recipe:
        return recipe[key]
    return resolve_ref(load_schema()["properties"][key]).get("default")


def _fill_nulls(node: dict, instance: dict) -> None:
    for key, sub in (node.get("properties") or {}).items():
        sub = resolve_ref(sub)
        if key not in instance and "default" in sub and sub["default"] is None:
            instance[key] = None
        elif isinstance(instance.get(key), dict) and sub.get("properties"):
            _fill_nulls(sub, instance[key])
