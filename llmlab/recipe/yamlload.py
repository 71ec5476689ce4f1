"""Safe YAML loading that remembers where every key came from.

PyYAML's SafeLoader composes the node graph; we construct plain Python values from it ourselves so
that every mapping key and list item gets its (file, line, col), and so that duplicate keys are
reported instead of silently keeping the last one.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from llmlab.recipe.errors import RecipeError, dotted

#: path tuple -> (file, line, col), 1-based
Positions = dict


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader whose floats and booleans follow YAML 1.2: ``1e-5`` is a number (PyYAML 1.1 needs
    ``1.0e-5``) and only true/false are booleans (``no``, ``on``, ``yes`` stay strings)."""


RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _ch in list(RecipeLoader.yaml_implicit_resolvers):
    RecipeLoader.yaml_implicit_resolvers[_ch] = [
        (tag, rx) for tag, rx in RecipeLoader.yaml_implicit_resolvers[_ch]
        if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")
    ]
# YAML 1.2 booleans: only true/false, so `dedup: no` or `split: on` stay strings
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _pos(file: str, node: yaml.Node) -> tuple[str, int, int]:
    return (file, node.start_mark.line + 1, node.start_mark.column + 1)


def _build(loader, node, path, file, positions, errors):
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict = {}
        first_line: dict = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                errors.append(RecipeError(*_pos(file, key_node), dotted(path), f"keys must be plain strings, got {key!r}"))
                continue
            if not isinstance(key, str):
                key = str(key) if not isinstance(key, bool) else str(key).lower()
            sub = path + (key,)
            if key in out:
                errors.append(RecipeError(*_pos(file, key_node), dotted(sub),
                                          f"duplicate key {key!r} (first defined on line {first_line[key]}); "
                                          "YAML would silently keep only the last one"))
            first_line.setdefault(key, key_node.start_mark.line + 1)
            positions[sub] = _pos(file, key_node)
            out[key] = _build(loader, value_node, sub, file, positions, errors)
        return out
    if isinstance(node, yaml.SequenceNode):
        out_list = []
        for i, item in enumerate(node.value):
            positions[path + (i,)] = _pos(file, item)
            out_list.append(_build(loader, item, path + (i,), file, positions, errors))
        return out_list
    return loader.construct_object(node, deep=True)


def load_yaml(text: str, file: str, positions: Positions | None = None) -> tuple[object, Positions, list[RecipeError]]:
    """Parse ``text`` (the content of ``file``) safely.

    Returns (value, positions, errors). ``positions`` maps key-path tuples to (file, line, col);
    the root is ``()``. On a syntax error the value is None and the error carries its position.
    """
    positions = {} if positions is None else positions
    errors: list[RecipeError] = []
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, positions, errors
        positions[()] = _pos(file, node)
        value = _build(loader, node, (), file, positions, errors)
    except yaml.MarkedYAMLError as exc:
        # point at the construct that was left open (context) when there is one, else at the problem
        open_construct = bool(exc.context and exc.context.startswith("while") and exc.context_mark)
        mark = exc.context_mark if open_construct else (exc.problem_mark or exc.context_mark)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        msg = ": ".join(x for x in (exc.context, exc.problem) if x) or str(exc)
        pm = exc.problem_mark
        if open_construct and pm and (pm.line, pm.column) != (exc.context_mark.line, exc.context_mark.column):
            msg += f" (at line {pm.line + 1}, column {pm.column + 1})"
        errors.append(RecipeError(file, line, col, "", f"YAML syntax error: {msg}"))
        return None, positions, errors
    except yaml.YAMLError as exc:  # pragma: no cover - non-marked errors are rare
        errors.append(RecipeError(file, 1, 1, "", f"YAML error: {exc}"))
        return None, positions, errors
    finally:
        loader.dispose()
    return value, positions, errors


def parse_scalar(text: str):
    """Parse a ``--set`` value or an environment substitution as YAML (``1e-5`` → float, ``[a, b]`` → list).

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    if text == "":
        return ""
    return yaml.load(text, Loader=RecipeLoader)  # RecipeLoader is a SafeLoader


def read_file(path: Path) -> str:
    """Read a recipe file as UTF-8 text."""
    return Path(path).read_text(encoding="utf-8")
