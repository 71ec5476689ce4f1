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

#: Bounds that keep a hostile recipe from exhausting memory or the stack. Real recipes are a few
#: kilobytes, a few levels deep and a few hundred values; these are orders of magnitude above that.
MAX_RECIPE_BYTES = 1 << 20  # a recipe file larger than 1 MiB is refused before it is parsed
MAX_DEPTH = 64  # mappings/lists nested deeper than this are refused (PyYAML composes recursively)
MAX_VALUES = 100_000  # values after alias expansion ("billion laughs" bombs expand exponentially)


class _TooManyValues(Exception):
    """Raised inside :func:`_build` when alias expansion exceeds :data:`MAX_VALUES`."""

    def __init__(self, node: yaml.Node):
        super().__init__()
        self.node = node


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


if getattr(yaml, "__with_libyaml__", False):
    class _RecipeCLoader(yaml.cyaml.CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        """:class:`RecipeLoader`'s rules on libyaml's parser (the same nodes, ~10x faster). Used for
        the first try only: on any error the pure-Python :class:`RecipeLoader` parses again, so
        every message and position a user sees comes from one parser."""

        def __init__(self, stream):
            yaml.cyaml.CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _RecipeCLoader.yaml_implicit_resolvers = RecipeLoader.yaml_implicit_resolvers
    _LOADERS: tuple = (_RecipeCLoader, RecipeLoader)
else:  # pragma: no cover - PyYAML built without libyaml
    _LOADERS = (RecipeLoader,)


def _pos(file: str, node: yaml.Node) -> tuple[str, int, int]:
    return (file, node.start_mark.line + 1, node.start_mark.column + 1)


def _build(loader, node, path, file, positions, errors, budget):
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooManyValues(node)
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
            out[key] = _build(loader, value_node, sub, file, positions, errors, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        out_list = []
        for i, item in enumerate(node.value):
            positions[path + (i,)] = _pos(file, item)
            out_list.append(_build(loader, item, path + (i,), file, positions, errors, budget))
        return out_list
    return loader.construct_object(node, deep=True)


def load_yaml(text: str, file: str, positions: Positions | None = None) -> tuple[object, Positions, list[RecipeError]]:
    """Parse ``text`` (the content of ``file``) safely.

    Returns (value, positions, errors). ``positions`` maps key-path tuples to (file, line, col);
    the root is ``()``. On a syntax error the value is None and the error carries its position.
    """
    positions = {} if positions is None else positions
    too_deep = _depth_error(text, file)
    if too_deep is not None:
        return None, positions, [too_deep]
    if len(_LOADERS) > 1:
        try:  # libyaml first; any problem (syntax, characters, limits) is reported by the Python parser
            fast_positions: Positions = {}
            value, errors = _compose(_LOADERS[0], text, file, fast_positions, [])
        except Exception:  # noqa: BLE001 - parsed again below, where each problem gets its message
            pass
        else:
            positions.update(fast_positions)
            return value, positions, errors
    errors: list[RecipeError] = []
    try:
        value, errors = _compose(RecipeLoader, text, file, positions, errors)
    except _TooManyValues as exc:
        errors.append(RecipeError(*_pos(file, exc.node), "",
                                  f"the recipe expands to more than {MAX_VALUES:,} values; YAML aliases (*name) "
                                  "that repeat a large block many times are refused"))
        return None, positions, errors
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, other controls)
        line, col = _line_col(text, exc.position)
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        errors.append(RecipeError(file, line, col, "", f"character U+{code:04X} is not allowed in YAML"))
        return None, positions, errors
    except yaml.MarkedYAMLError as exc:
        # point at the construct that was left open (context) when there is one, else at the problem
        open_construct = bool(exc.context and exc.context.startswith("while") and exc.context_mark)
        mark = exc.context_mark if open_construct else (exc.problem_mark or exc.context_mark)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        msg = ": ".join(x for x in (exc.context, exc.problem) if x) or str(exc)
        pm = exc.problem_mark
        if open_construct and pm and (pm.line, pm.column) != (exc.context_mark.line, exc.context_mark.column):
            msg += f" (at line {pm.line + 1}, column {pm.column + 1})"
        errors.append(RecipeError(file, line, col, "", f"YAML syntax error: {msg}{_syntax_hint(text, exc)}"))
        return None, positions, errors
    except yaml.YAMLError as exc:  # pragma: no cover - non-marked errors are rare
        errors.append(RecipeError(file, 1, 1, "", f"YAML error: {exc}"))
        return None, positions, errors
    return value, positions, errors


def _compose(loader_cls, text: str, file: str, positions: Positions, errors: list) -> tuple[object, list]:
    """``(value, errors)`` of ``text`` composed by ``loader_cls`` (None for an empty document);
    ``errors`` gets the duplicate and non-string keys. YAML problems are raised."""
    loader = loader_cls(text)  # the reader refuses non-printable characters here
    try:
        node = loader.get_single_node()
        if node is None:
            return None, errors
        positions[()] = _pos(file, node)
        return _build(loader, node, (), file, positions, errors, [MAX_VALUES]), errors
    finally:
        loader.dispose()


def _syntax_hint(text: str, exc: yaml.MarkedYAMLError) -> str:
    """A hint for a syntax error whose cause is a common slip, else ''. Today: an unquoted
    ``${VAR}`` inside a flow mapping or list (``{lr: ${LR}}``), where YAML reads ``{`` as a
    nested mapping."""
    lines = text.splitlines()
    for mark in (exc.problem_mark, exc.context_mark):
        if mark is not None and mark.line < len(lines):
            line = lines[mark.line]
            if re.search(r"[\[{][^\]}]*\$\{", line):
                return ' (hint: inside {...} or [...], quote ${VAR}: {lr: "${LR}"})'
    return ""


def _line_col(text: str, index: int) -> tuple[int, int]:
    """1-based (line, column) of character ``index`` in ``text``."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _depth_error(text: str, file: str) -> RecipeError | None:
    """An error at the first mapping/list nested deeper than :data:`MAX_DEPTH`, else None.

    Scans the parser's events (iterative, unlike PyYAML's recursive composer, which would hit
    Python's recursion limit on 10,000-deep nesting). Syntax errors are left to the composer.
    """
    for loader_cls in _LOADERS:  # libyaml first: a problem it has is looked at again by the Python parser
        depth = 0
        try:
            for event in yaml.parse(text, Loader=loader_cls):
                if isinstance(event, yaml.CollectionStartEvent):
                    depth += 1
                    if depth > MAX_DEPTH:
                        m = event.start_mark
                        return RecipeError(file, m.line + 1, m.column + 1, "",
                                           f"mappings/lists are nested more than {MAX_DEPTH} levels deep")
                elif isinstance(event, yaml.CollectionEndEvent):
                    depth -= 1
        except yaml.YAMLError:
            continue
        return None
    return None


def parse_scalar(text: str):
    """Parse a ``--set`` value or an environment substitution as YAML (``1e-5`` → float, ``[a, b]`` → list).

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    if text == "":
        return ""
    return yaml.load(text, Loader=RecipeLoader)  # RecipeLoader is a SafeLoader


def read_file(path: Path, display: str | None = None) -> tuple[str | None, list[RecipeError]]:
    """Read a recipe file as UTF-8 text, refusing files over :data:`MAX_RECIPE_BYTES`.

    Returns:
        ``(text, [])``, or ``(None, [error])`` for a file that is too large or not UTF-8 (the error
        names the line and column of the first bad byte).

    Raises:
        OSError: the file cannot be read.
    """
    display = display or str(path)
    size = Path(path).stat().st_size
    if size > MAX_RECIPE_BYTES:
        return None, [RecipeError(display, 1, 1, "", f"the recipe is {size:,} bytes; recipes are limited to "
                                                     f"{MAX_RECIPE_BYTES:,} bytes (put data in data files, not the recipe)")]
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        return None, [RecipeError(display, line, col, "",
                                  f"byte 0x{data[exc.start]:02x} is not valid UTF-8; save the recipe as UTF-8")]
