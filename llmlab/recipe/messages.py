"""Turning jsonschema validation errors into RecipeErrors with plain-English messages."""

from __future__ import annotations

from llmlab.recipe import schema as S
from llmlab.recipe.errors import RecipeError, dotted
from llmlab.stage_specs import NON_TRAINING_TYPES

_EVALUATE_HINT = "; an evaluate stage trains nothing, so {key!r} (a training setting) does not apply"

_TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "object": "a mapping", "array": "a list", "null": "null"}


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _show(value) -> str:
    text = repr(value) if isinstance(value, str) else _yamlish(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _yamlish(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _family_hint(err, key: str, path: tuple) -> str:
    var = S.variant_of(err.schema)
    if not var:
        return ""
    family, current = var
    others = [v for v in S.variants_accepting(family, key) if v != current]
    if family == "stage":
        if current in NON_TRAINING_TYPES:
            return _EVALUATE_HINT.format(key=key) if others else ""
        others = [v for v in others if v not in NON_TRAINING_TYPES]  # never suggest moving a training key there
    if not others:
        return ""
    label = {"stage": "stage type", "optimizer": "optimizer", "scheduler": "scheduler", "model": "model kind"}.get(family, family)
    if family == "model":
        current = {"pretrained": "from_pretrained"}.get(current, f"arch {current}")
        others = [{"pretrained": "from_pretrained"}.get(o, f"arch {o}") for o in others]
        return f"; {key!r} is not valid for {current} models (only for {', '.join(others)})"
    return f"; {key!r} is only valid for {label} {', '.join(others)}, not {current}"


def _keys_of(*def_prefixes: str) -> set[str]:
    defs = S.load_schema()["$defs"]
    out: set[str] = set()
    for name, d in defs.items():
        if any(name == p or name.startswith(p + "_") for p in def_prefixes):
            out.update(S.allowed_keys(d))
    return out


def _nested_hint(err, key: str, path: tuple) -> str:
    """A hint for a key written one level too high, e.g. ``lr`` on a stage (it goes in ``optimizer:``)."""
    var = S.variant_of(err.schema)
    if var is not None and var[0] == "stage" and var[1] in NON_TRAINING_TYPES:
        training = _keys_of("optimizer") | _keys_of("scheduler") | _keys_of("lora")
        return _EVALUATE_HINT.format(key=key) if key in training - {"name", "type"} else ""
    if var and var[0] == "stage":
        homes = {"optimizer": _keys_of("optimizer"), "scheduler": _keys_of("scheduler"), "lora": _keys_of("lora")}
    elif path == ():
        root = S.load_schema()["properties"]
        homes = {"model": _keys_of("model"), "tokenizer": set(root["tokenizer"]["properties"]),
                 "logging": set(root["logging"]["properties"])}
    else:
        return ""
    for home, keys in homes.items():
        if key in keys - {"name", "type", "dropout"}:
            return f"; {key!r} belongs inside {home}: ({dotted(path + (home, key))})"
    return ""


def convert(err, positions, where) -> list[RecipeError]:
    """RecipeErrors for one jsonschema ``ValidationError``.

    ``where(path)`` gives (file, line, col) for a path tuple, falling back to its nearest located ancestor.
    """
    path = tuple(err.absolute_path)
    key = next((p for p in reversed(path) if isinstance(p, str)), "value")
    inst = err.instance
    v = err.validator
    out: list[RecipeError] = []

    def add(p, msg):
        out.append(RecipeError(*where(p), dotted(p), msg))

    if v in ("additionalProperties", "unevaluatedProperties") and isinstance(inst, dict):
        allowed = S.allowed_keys(err.schema)
        for extra in [k for k in inst if k not in allowed]:
            hint = _family_hint(err, extra, path) or _nested_hint(err, extra, path)
            sugg = "" if hint else S.suggest(extra, allowed)
            where_txt = f"in {dotted(path)}" if path else "at the top level"
            tail = "" if (hint or sugg) else f"; expected one of: {', '.join(allowed)}"
            add(path + (extra,), f"unknown key {extra!r} {where_txt}{sugg}{hint}{tail}")
        return out
    if v == "required":
        for missing in [k for k in err.validator_value if isinstance(inst, dict) and k not in inst]:
            desc = S.resolve_ref((err.schema.get("properties") or {}).get(missing, {})).get("description", "")
            out.append(RecipeError(*where(path), dotted(path + (missing,)),
                                   f"missing required key {missing!r}" + (f" ({desc.rstrip('.')})" if desc else "")))
        return out
    if v == "enum":
        allowed = [a for a in err.validator_value]
        shown = ", ".join(_yamlish(a) for a in allowed)
        if err.relative_schema_path and "propertyNames" in err.relative_schema_path:
            add(path + (str(inst),), f"unknown name {inst!r}{S.suggest(inst, allowed)}; expected one of: {shown}")
        else:
            add(path, f"{_show(inst)} is not a valid {key}{S.suggest(inst, allowed)}; expected one of: {shown}")
        return out
    if v == "pattern" and "propertyNames" in err.relative_schema_path:
        add(path + (str(inst),), f"invalid name {inst!r}: use letters, digits, '_', '.' and '-' (not starting with '.' or '-')")
        return out
    if v == "type":
        types = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        expect = " or ".join(_TYPE_NAMES.get(t, t) for t in types)
        add(path, f"expected {expect}, got {_kind(inst)} {_show(inst)}")
        return out
    bounds = {"minimum": "≥", "maximum": "≤", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if v in bounds:
        add(path, f"{_show(inst)} is out of range; expected a value {bounds[v]} {_yamlish(err.validator_value)}")
        return out
    if v == "minItems":
        add(path, f"needs at least {err.validator_value} item(s), got {len(inst)}")
        return out
    if v == "minProperties":
        add(path, f"needs at least {err.validator_value} entr{'y' if err.validator_value == 1 else 'ies'}, got none")
        return out
    if v == "minLength":
        add(path, f"must not be empty, got {_show(inst)}")
        return out
    if v == "uniqueItems":
        add(path, f"items must be unique, got {_show(inst)}")
        return out
    if v == "pattern" and err.validator_value == "^auto$":  # a number or auto (optimizer lr, ...)
        add(path, f"{_show(inst)}: expected a number or auto, got a string")
        return out
    if v == "pattern":
        add(path, f"{_show(inst)} does not have the expected form (pattern {err.validator_value})")
        return out
    add(path, err.message)
    return out
