"""The recipe JSON Schema: loading, validation into RecipeErrors, and filling in defaults."""

from __future__ import annotations

import copy
import difflib
import functools
import json
from pathlib import Path

import jsonschema
from jsonschema import Draft202012Validator

SCHEMA_NAME = "recipe.schema.json"


def schema_path() -> Path:
    """Where the schema is read from: ``schemas/`` at the repository root (editable installs and
    checkouts), else the copy shipped inside the package (``llmlab/recipe/recipe.schema.json``)."""
    import llmlab

    repo = Path(llmlab.__file__).resolve().parents[1] / "schemas" / SCHEMA_NAME
    if repo.is_file():
        return repo
    return Path(__file__).resolve().parent / SCHEMA_NAME


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    """The recipe JSON Schema as a dict (cached).

    Raises:
        FileNotFoundError: neither the repository nor the packaged copy exists.
    """
    return json.loads(schema_path().read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def validator() -> Draft202012Validator:
    """A Draft 2020-12 validator for the recipe schema (cached)."""
    return Draft202012Validator(load_schema())


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


def allowed_keys(node: dict) -> list[str]:
    """Every property name a (sub)schema declares, through ``$ref`` and ``allOf`` (not if/then)."""
    root = load_schema()
    keys: list[str] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, dict):
            continue
        if "$ref" in n:
            stack.append(_lookup(root, n["$ref"]))
        keys.extend(k for k in n.get("properties", {}) if k not in keys)
        stack.extend(n.get("allOf", []))
    return keys


def variant_of(node: dict) -> tuple[str, str] | None:
    """For a per-variant definition (``stage_dpo``, ``optimizer_sophia``, ``model_mamba2``), its
    (family, variant) names; None for any other schema node."""
    for name, d in load_schema()["$defs"].items():
        if d is node and "_" in name and name.split("_", 1)[1] != "common":
            fam, var = name.split("_", 1)
            return fam, var
    return None


def variants_accepting(family: str, key: str) -> list[str]:
    """The variants of ``family`` (e.g. the stage types) whose definition allows ``key``."""
    out = []
    for name, d in load_schema()["$defs"].items():
        if name.startswith(family + "_") and not name.endswith("_common") and key in allowed_keys(d):
            out.append(name.split("_", 1)[1])
    return out


def suggest(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    choices = [str(c) for c in choices if c is not None]
    match = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if not match:
        lowered = {c.lower(): c for c in choices}
        if str(word).lower() in lowered:
            match = [lowered[str(word).lower()]]
    return f" (did you mean {match[0]!r}?)" if match else ""


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
_NODE_VALIDATORS: dict[int, tuple[dict, Draft202012Validator]] = {}


def _validator_of(node: dict) -> Draft202012Validator:
    """A validator for a sub-schema (an ``if``), cached while the node lives (the node is kept)."""
    hit = _NODE_VALIDATORS.get(id(node))
    if hit is None or hit[0] is not node:
        hit = _NODE_VALIDATORS[id(node)] = (node, Draft202012Validator(node))
    return hit[1]


@functools.lru_cache(maxsize=None)
def _stage_defaults(stage_type: str) -> dict:
    defaults: dict = {"type": stage_type}
    fill_defaults({"$ref": f"#/$defs/stage_{stage_type}"}, defaults)
    return defaults


def stage_defaults(stage_type: str) -> dict:
    """The schema's defaults of a stage of ``stage_type`` (``$defs/stage_<type>``, shared keys
    included; keys whose default is null absent): the one place a stage key's default is written.

    Raises:
        KeyError: the schema has no ``stage_<type>`` section.
    """
    if f"stage_{stage_type}" not in load_schema()["$defs"]:
        raise KeyError(f"the recipe schema has no stage type {stage_type!r}")
    return copy.deepcopy(_stage_defaults(stage_type))
