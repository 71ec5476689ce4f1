"""The recipe JSON Schema: loading, validation into RecipeErrors, and filling in defaults."""

from __future__ import annotations

import copy
import difflib
import functools

from jsonschema import Draft202012Validator

# the schema file and its defaults live in a leaf module (no llmlab import), so that packages the
# recipe package imports (llmlab.models) can read the defaults too; re-exported here
from llmlab.schemafile import SCHEMA_NAME, _lookup, fill_defaults, load_schema, resolve_ref, schema_path  # noqa: F401


@functools.lru_cache(maxsize=1)
def validator() -> Draft202012Validator:
    """A Draft 2020-12 validator for the recipe schema (cached)."""
    return Draft202012Validator(load_schema())


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
