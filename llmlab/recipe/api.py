"""Load, validate and resolve a recipe: the one entry point the rest of llmlab uses.

    resolved, errors = load_recipe("recipes/quickstart.yaml", overrides=["stages.sft.optimizer.lr=1e-5"])

Pipeline: safe YAML with positions → ``extends`` (recursive) → ``--set`` overrides → ``${VAR}``
substitution → JSON Schema → defaults → semantic checks → absolute paths. Nothing here imports torch.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from llmlab.recipe import messages, semantic
from llmlab.recipe import schema as S
from llmlab.recipe.errors import RecipeError, dotted
from llmlab.recipe.codeuse import ALLOW_FLAG, code_uses
from llmlab.secrets import mask_secrets
from llmlab.recipe.yamlload import load_yaml, parse_scalar, read_file
from llmlab.stage_specs import STAGE_SPECS

SET_FILE = "--set"
_ENV_RE = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class RecipeLoadError(Exception):
    """Raised by :func:`load_recipe_or_raise` when a recipe has errors; ``errors`` holds them."""

    def __init__(self, errors: list[RecipeError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def _display(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:  # pragma: no cover - other drive on Windows
        return str(path)
    return str(path) if rel.startswith("..") else rel


# ----------------------------------------------------------------- extends


def _kind_changed(path: tuple, base: dict, over: dict) -> bool:
    """Whether ``over`` switches the variant of ``base`` (then it replaces it instead of merging)."""
    if path == ("model",):
        def kind(m):
            return m.get("arch") if "arch" in m else ("pretrained" if "from_pretrained" in m else None)
        return kind(over) is not None and kind(base) is not None and kind(over) != kind(base)
    if len(path) == 2 and path[0] == "stages":
        return "type" in over and "type" in base and over["type"] != base["type"]
    if len(path) == 3 and path[0] == "stages" and path[2] in ("optimizer", "scheduler"):
        return "name" in over and "name" in base and over["name"] != base["name"]
    return False


def _null_deletes(path: tuple) -> bool:
    """Whether ``KEY: null`` in a child recipe deletes an inherited ``KEY`` of the mapping at
    ``path`` (as Helm and Kustomize merges do): a dataset definition, a stage, or a dataset of a
    stage's training mixture. Elsewhere null keeps its meaning (``from: null``: the model section)."""
    return path in (("datasets",), ("stages",)) or (len(path) == 3 and path[0] == "stages" and path[2] == "datasets")


def merge(base, over, path: tuple = ()):
    """Deep-merge ``over`` onto ``base``: mappings merge key by key (so stages merge by name and new
    stages are appended in order), everything else — lists included — is replaced. A mapping whose
    variant changes (model arch, stage type, optimizer or scheduler name) is replaced whole.
    ``NAME: null`` removes an inherited dataset, stage or mixture entry (:func:`_null_deletes`)."""
    if isinstance(base, dict) and isinstance(over, dict) and not _kind_changed(path, base, over):
        out = dict(base)
        for k, v in over.items():
            if v is None and _null_deletes(path) and k in base:
                del out[k]
                continue
            out[k] = merge(base[k], v, path + (k,)) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _walk_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_paths(v, path + (i,))


def _load_tree(file: Path, errors: list, dirs: dict, chain: tuple, display: str | None = None,
               broken: list | None = None):
    """``(doc, positions)`` of ``file`` with its ``extends`` chain merged in. A base that cannot be
    loaded (missing, a cycle, unreadable, not a mapping) is reported once and appended to ``broken``:
    the returned doc then lacks the base's keys, so callers skip the checks that need them."""
    broken = [] if broken is None else broken
    display = display or _display(file)
    dirs[display] = file.parent
    try:
        text, read_errors = read_file(file, display)
    except OSError as exc:
        errors.append(RecipeError(display, 1, 1, "", f"cannot read recipe: {exc.strerror or exc}"))
        return None, {}
    if text is None:
        errors.extend(read_errors)
        return None, {}
    doc, pos, errs = load_yaml(text, display)
    errors.extend(errs)
    if errs and doc is None:
        return None, pos
    if doc is None:
        errors.append(RecipeError(display, 1, 1, "", "the recipe is empty; expected a mapping with name, tokenizer, model, datasets and stages"))
        return None, pos
    if not isinstance(doc, dict):
        errors.append(RecipeError(display, *pos.get((), (display, 1, 1))[1:], "", f"a recipe must be a mapping of keys, got {type(doc).__name__}"))
        return None, pos
    ext = doc.get("extends")
    if isinstance(ext, str) and ext:
        target = (file.parent / os.path.expanduser(ext)).resolve()
        where = pos.get(("extends",), (display, 1, 1))
        if target in chain or target == file:
            errors.append(RecipeError(*where, "extends", f"{ext!r} extends itself (cycle: {' → '.join(p.name for p in chain + (file, target))})"))
            broken.append(target)
        elif not target.is_file():
            errors.append(RecipeError(*where, "extends", f"base recipe {ext!r} not found (looked for {target})"))
            broken.append(target)
        else:
            base, bpos = _load_tree(target, errors, dirs, chain + (file,), broken=broken)
            if isinstance(base, dict):
                base.pop("extends", None)
                merged = merge(base, doc)
                mpos = {p: pos.get(p) or bpos.get(p) for p in _walk_paths(merged)}
                mpos[()] = pos.get(())
                return merged, {p: v for p, v in mpos.items() if v}
            broken.append(target)
    return doc, pos


# ----------------------------------------------------------------- --set


def apply_overrides(doc: dict, positions: dict, overrides: Iterable[str], errors: list) -> None:
    """Apply ``a.b.c=VALUE`` overrides in place (VALUE parsed as YAML). Stages and datasets are
    addressed by name (``stages.sft.optimizer.lr=1e-5``); list items by index. Errors point at
    ``--set`` as the file and the override's 1-based index as the line."""
    for i, item in enumerate(overrides, 1):
        loc = (SET_FILE, i, 1)
        if "=" not in item:
            errors.append(RecipeError(*loc, "", f"expected KEY=VALUE (e.g. stages.sft.optimizer.lr=1e-5), got {item!r}"))
            continue
        key, raw = item.split("=", 1)
        parts: list = [p for p in key.strip().split(".")]
        if not key.strip() or any(p == "" for p in parts):
            errors.append(RecipeError(*loc, "", f"invalid key {key!r} in {item!r}; expected a dotted path like stages.sft.optimizer.lr"))
            continue
        try:
            value = parse_scalar(raw)
        except yaml.YAMLError as exc:
            errors.append(RecipeError(*loc, key, f"value {raw!r} is not valid YAML: {getattr(exc, 'problem', exc)}"))
            continue
        node, path, ok = doc, (), True
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    errors.append(RecipeError(*loc, dotted(path), f"{part!r} is not an index of this list (0..{len(node) - 1})"))
                    ok = False
                    break
                part = int(part)
            elif isinstance(node, dict):
                if part not in node:
                    if depth == 1 and path[0] in ("stages", "datasets"):
                        errors.append(RecipeError(*loc, dotted(path + (part,)), f"no {path[0][:-1]} named {part!r}{S.suggest(part, node)}; "
                                                  f"defined: {', '.join(node) or 'none'}"))
                        ok = False
                        break
                    node[part] = {}
                    positions[path + (part,)] = loc  # a key the override created: errors about it point at --set
            else:
                errors.append(RecipeError(*loc, dotted(path), f"cannot set {key!r}: {dotted(path)} is not a mapping"))
                ok = False
                break
            node, path = node[part], path + (part,)
        if not ok:
            continue
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                errors.append(RecipeError(*loc, dotted(path), f"{last!r} is not an index of this list (0..{len(node) - 1})"))
                continue
            last = int(last)
        elif not isinstance(node, dict):
            errors.append(RecipeError(*loc, dotted(path), f"cannot set {key!r}: {dotted(path)} is not a mapping"))
            continue
        node[last] = value
        target = path + (last,)
        for p in [p for p in positions if p[:len(target)] == target]:
            del positions[p]
        for p in _walk_paths(value, target):
            positions[p] = loc


# ----------------------------------------------------------------- ${VAR}


def substitute_env(value, env: Mapping[str, str], path: tuple, where, errors: list, unresolved: set | None = None):
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string (``$${`` is a literal ``${``).
    A string that is exactly one placeholder is parsed as YAML, so ``lr: ${LR:-1e-4}`` is a number.
    Paths whose variable is missing are added to ``unresolved`` (their follow-on errors are dropped)."""
    unresolved = set() if unresolved is None else unresolved
    if isinstance(value, dict):
        return {k: substitute_env(v, env, path + (k,), where, errors, unresolved) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env, path + (i,), where, errors, unresolved) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def repl(m):
        if m.group(1):
            return "${" + m.group(2) + (":-" + m.group(3) if m.group(3) is not None else "") + "}"
        name, default = m.group(2), m.group(3)
        if name in env:
            return env[name]
        if default is not None:
            return default
        errors.append(RecipeError(*where(path), dotted(path), f"environment variable {name!r} is not set and has no default (write ${{{name}:-DEFAULT}})"))
        unresolved.add(path)
        return m.group(0)

    whole = _ENV_RE.fullmatch(value)
    out = _ENV_RE.sub(repl, value)
    if whole and not whole.group(1):
        try:
            parsed = parse_scalar(out)
        except yaml.YAMLError:
            return out
        if parsed is None or isinstance(parsed, (bool, int, float, str)):
            return parsed
    return out


# ----------------------------------------------------------------- resolution


def _fill_computed(doc: dict) -> None:
    """Defaults that depend on other keys (the schema cannot express them). An evaluate stage gets
    ``models`` (every earlier stage that trains a language model) and none of the training
    defaults, and is skipped when a later stage's ``from`` defaults to the previous stage."""
    m = doc.get("model")
    if isinstance(m, dict) and m.get("arch") == "transformer":
        h = m.get("n_heads")
        if "n_kv_heads" not in m and isinstance(h, int):
            m["n_kv_heads"] = h
        kv = m.get("n_kv_heads")
        if "attention_type" not in m and isinstance(h, int) and isinstance(kv, int):
            m["attention_type"] = "mha" if kv == h else ("mqa" if kv == 1 else "gqa")
        d = m.get("d_model")
        if m.get("d_ff") is None and isinstance(d, int):
            m["d_ff"] = 64 * math.ceil(8 * d / 3 / 64) if m.get("activation") == "swiglu" else 4 * d
    log_every = (doc.get("logging") or {}).get("log_every", 10) if isinstance(doc.get("logging"), dict) else 10
    stages = doc.get("stages")
    if isinstance(stages, dict):
        prev = None
        trained: list = []  # earlier stages that train a language model (evaluate's default models)
        for name, st in stages.items():
            if not isinstance(st, dict):
                prev = name
                continue
            spec = STAGE_SPECS.get(st.get("type"))
            if spec is not None and not spec.trains:
                # trains nothing: none of the training defaults, and never the next stage's `from`
                if "models" not in st:
                    st["models"] = list(trained)
                continue
            if spec is None or spec.language_model:
                trained.append(name)
            if "from" not in st and prev is not None:
                st["from"] = prev
            if "seq_len" not in st and isinstance(m, dict) and "arch" in m and isinstance(m.get("max_seq_len"), int):
                st["seq_len"] = m["max_seq_len"]
            st.setdefault("log_every", log_every)
            if spec is not None and spec.generates and "mini_batch_size" not in st and "batch_size" in st:
                st["mini_batch_size"] = st["batch_size"]
            prev = name


def _local_or_hub(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(value))
    if value.startswith(("./", "../", "/", "~")) or p.is_absolute():
        return str((base / p).resolve())
    candidate = base / p
    return str(candidate.resolve()) if candidate.exists() else value


def _absolutize(doc: dict, positions: dict, dirs: dict) -> None:
    cwd = Path.cwd()

    def base_of(path):
        f = positions.get(path, (None,))[0]
        return dirs.get(f, cwd)

    for name, ds in (doc.get("datasets") or {}).items():
        if isinstance(ds.get("path"), str):
            ds["path"] = str((base_of(("datasets", name, "path")) / os.path.expanduser(ds["path"])).resolve())
    for section in ("tokenizer", "model"):
        sec = doc.get(section) or {}
        if isinstance(sec.get("from_pretrained"), str):
            sec["from_pretrained"] = _local_or_hub(sec["from_pretrained"], base_of((section, "from_pretrained")))
    for sname, st in (doc.get("stages") or {}).items():
        for i, r in enumerate(st.get("reward") or []):
            if isinstance(r, dict) and isinstance(r.get("model"), str):
                r["model"] = _local_or_hub(r["model"], base_of(("stages", sname, "reward", i, "model")))
    if isinstance(doc.get("token_store"), str):
        doc["token_store"] = str((base_of(("token_store",)) / os.path.expanduser(doc["token_store"])).resolve())
    if isinstance(doc.get("output_dir"), str):
        doc["output_dir"] = str((base_of(("output_dir",)) / os.path.expanduser(doc["output_dir"])).resolve())
    else:
        doc["output_dir"] = str((cwd / "runs" / str(doc.get("name", "recipe"))).resolve())


def _reorder(doc: dict) -> dict:
    order = [k for k in S.load_schema()["properties"] if k in doc]
    return {k: doc[k] for k in order} | {k: v for k, v in doc.items() if k not in order}


# ----------------------------------------------------------------- requires


def _requires_error(doc: dict, positions: dict, display: str) -> RecipeError | None:
    """The error for a ``requires:`` that this llmlab does not satisfy or that is not a requirement
    on llmlab, else None (also when ``requires`` is absent or not a string: the schema reports that).
    A PEP 440 requirement (``llmlab>=0.2``, ``llmlab>=0.2,<0.4``); pre-releases count."""
    spec = doc.get("requires")
    if not isinstance(spec, str) or not spec.strip():
        return None
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import Version

    from llmlab import __version__

    where = positions.get(("requires",), (display, 1, 1))
    try:
        req = Requirement(spec)
    except InvalidRequirement as exc:
        return RecipeError(*where, "requires", f"{spec!r} is not a version requirement ({exc}); "
                                               "write e.g. \"llmlab>=0.2\"")
    if req.name.lower() != "llmlab" or req.extras or req.url or req.marker:
        return RecipeError(*where, "requires", f"{spec!r} must name llmlab and its versions only, e.g. \"llmlab>=0.2\"")
    if req.specifier.contains(Version(__version__), prereleases=True):
        return None
    wanted = ", ".join(f"{s.operator} {s.version}" for s in sorted(req.specifier, key=str))
    return RecipeError(*where, "requires", f"this recipe needs llmlab {wanted}; you have {__version__} "
                                           f"(pip install 'llmlab{req.specifier}'); the rest of the recipe was not checked")


# ----------------------------------------------------------------- public API


def load_recipe(path, overrides: Iterable[str] = (), env: Mapping[str, str] | None = None,
                allow_code: bool | None = None, warnings: list | None = None, check_files: bool = True,
                world_size: int | None = None) -> tuple[dict | None, list[RecipeError]]:
    """Load, validate and resolve the recipe at ``path``.

    Args:
        path: the recipe file.
        overrides: ``KEY=VALUE`` strings as given to ``--set``, applied after ``extends``.
        env: variables for ``${VAR}`` substitution (default: ``os.environ``).
        allow_code: False (``llmlab run`` without ``--allow-code``): every key that would run code
            (:func:`llmlab.recipe.codeuse.code_uses`) is an error; None (``validate``, ``plan``):
            each is a warning appended to ``warnings``; True: allowed silently.
        warnings: a list that receives warnings (:class:`RecipeError` with severity "warning").
        check_files: whether to check this machine's files: that each local dataset ``path`` exists
            (an error) and that a ``package:`` ``from_pretrained`` is installed (a warning).
            ``validate --no-data-check`` turns both off (a CI job that checks recipes only), and
            with them the sizing of ``epochs`` (which reads the data: such a stage keeps no ``max_steps``).
        world_size: processes that ``epochs`` are sized for (None: ``$WORLD_SIZE``, else 1;
            :mod:`llmlab.recipe.epochs`).

    Returns:
        ``(resolved, errors)``: when ``errors`` is empty, ``resolved`` is the plain-dict recipe with
        every default filled in and every path absolute; otherwise ``resolved`` is None and
        ``errors`` lists every problem found, sorted by file and line. One root cause gives one
        error: a ``requires:`` this llmlab does not meet is the only error reported (after YAML
        errors); a base recipe that cannot be loaded suppresses the "missing required key" errors and
        the semantic checks of the incomplete result; a semantic error on a key the schema already
        rejected (or inside it) is dropped.
    """
    env = os.environ if env is None else env
    errors: list[RecipeError] = []
    dirs: dict = {SET_FILE: Path.cwd()}
    broken: list = []
    doc, positions = _load_tree(Path(path).resolve(), errors, dirs, (), display=str(path), broken=broken)
    if doc is None:
        return None, _finish(errors)
    too_new = _requires_error(doc, positions, str(path))
    if too_new is not None:
        return None, _finish(errors + [too_new])
    apply_overrides(doc, positions, list(overrides), errors)
    where = _locator(positions, (str(path), 1, 1))
    unresolved: set = set()
    doc = substitute_env(doc, env, (), where, errors, unresolved)
    n_before = len(errors)
    errors.extend(_schema_errors(doc, positions, where, broken))
    rejected = {e.path for e in errors[n_before:]}
    resolved = copy.deepcopy(doc)
    S.fill_defaults(S.load_schema(), resolved)
    _fill_computed(resolved)

    def add(p, msg):
        errors.append(RecipeError(*where(p), dotted(tuple(p)), msg))

    _check_semantics(resolved, _given_test(doc, positions), add, errors, broken, rejected, world_size)
    _check_code_uses(resolved, allow_code, add, where, warnings)
    if check_files:
        _check_local_data(resolved, positions, dirs, add)
    if unresolved:  # drop follow-on errors about values whose ${VAR} could not be substituted
        skip = {dotted(p) for p in unresolved}
        errors[n_before:] = [e for e in errors[n_before:] if e.path not in skip]
    if errors:
        return None, _finish(errors)
    resolved.pop("extends", None)
    _absolutize(resolved, positions, dirs)
    if check_files:  # epochs: -> max_steps, counting the training rows (reads the data)
        from llmlab.recipe.epochs import resolve_epochs

        for p, msg in resolve_epochs(resolved, world_size):
            add(p, msg)
        if errors:
            return None, _finish(errors)
    from llmlab.recipe.optim_auto import resolve_auto_optimizer

    resolve_auto_optimizer(resolved)  # lr / weight_decay / warmup_steps: auto -> numbers (needs max_steps)
    if warnings is not None:
        warnings.extend(_resolved_warnings(resolved, where, check_files))
    return _reorder(resolved), []


def _locator(positions: dict, fallback: tuple):
    """``where(path) -> (file, line, column)`` of key path ``path``, or of its nearest written
    ancestor; ``fallback`` (the recipe's first line) when none of them was written."""

    def where(p: tuple):
        p = tuple(p)
        while p and p not in positions:
            p = p[:-1]
        return positions.get(p, fallback)

    return where


def _schema_errors(doc: dict, positions: dict, where, broken: list) -> list[RecipeError]:
    """The JSON Schema's errors on ``doc`` plus one per number that is not finite or out of range.

    With a base that could not be loaded (``broken``), the keys it would have given are not
    reported missing. The schema's range keywords let NaN through; a non-finite number's own schema
    errors (inf > maximum) are replaced by the one saying it is not finite; an oversized integer's
    range error (seed) is kept.
    """
    schema_errors = [e for err in S.validator().iter_errors(doc) if not (broken and err.validator == "required")
                     for e in messages.convert(err, positions, where)]
    bad = list(semantic.bad_numbers(doc))
    nonfinite_paths, flagged = {dotted(p) for p, _, nonfinite in bad if nonfinite}, {e.path for e in schema_errors}
    out = [e for e in schema_errors if e.path not in nonfinite_paths]
    out.extend(RecipeError(*where(p), dotted(p), msg) for p, msg, nonfinite in bad
               if nonfinite or dotted(p) not in flagged)
    return out


def _given_test(doc: dict, positions: dict):
    """``given(path, non_default=False) -> bool`` over the recipe as written (``doc``, before defaults)."""

    def given(p: tuple, non_default: bool = False) -> bool:
        """Whether the user wrote key path ``p``; with ``non_default``, also with a value other than
        the default (recipe.resolved.yaml writes every default, and must validate as written)."""
        p = tuple(p)
        if p not in positions:
            return False
        if not non_default:
            return True
        probe = copy.deepcopy(doc)
        node = probe
        for k in p[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return True
        node.pop(p[-1], None)
        S.fill_defaults(S.load_schema(), probe)
        for k in p:
            if not isinstance(probe, dict) or k not in probe:
                return True
            probe = probe[k]
        node = doc
        for k in p:
            node = node[k]
        return probe != node

    return given


def _check_semantics(resolved: dict, given, add, errors: list, broken: list, rejected: set,
                     world_size: int | None) -> None:
    """Run the cross-key checks (:func:`llmlab.recipe.semantic.check`) through ``add``; drop those
    on a key the schema already rejected (``rejected``) or inside it; ``distributed.replicate`` against
    ``world_size`` (:func:`llmlab.recipe.semantic.world_size_errors`). Skipped when a base recipe
    could not be loaded: without its keys they would only report its absence."""
    n_semantic = len(errors)
    try:
        if not broken:
            semantic.check(resolved, given, add)
            for p, msg in semantic.world_size_errors(resolved, world_size):
                add(p, msg)
    except Exception:  # a check tripping over a shape the schema already rejected
        if not errors:
            raise
    errors[n_semantic:] = [e for e in errors[n_semantic:] if not _under_any(e.path, rejected)]


def _check_code_uses(resolved: dict, allow_code: bool | None, add, where, warnings: list | None) -> None:
    """Each key that would run code: an error through ``add`` (``allow_code`` False), a warning
    appended to ``warnings`` (None), or nothing (True); see :func:`load_recipe`."""
    if allow_code is True:
        return
    for p, what in code_uses(resolved):
        if allow_code is False:
            add(p, f"runs code: {what}; a recipe runs code only with `llmlab run {ALLOW_FLAG}`")
        elif warnings is not None:
            warnings.append(RecipeError(*where(p), dotted(tuple(p)),
                                        f"runs code: {what}; `llmlab run` refuses it without {ALLOW_FLAG}",
                                        severity="warning"))


def _check_local_data(resolved: dict, positions: dict, dirs: dict, add) -> None:
    """An error through ``add`` for each local dataset ``path`` that names no file. Checked on an
    absolute copy of the datasets: ``resolved`` itself is made absolute only after every check."""
    if not isinstance(resolved.get("datasets"), dict):
        return
    probe = {"datasets": {k: copy.deepcopy(v) for k, v in resolved["datasets"].items() if isinstance(v, dict)}}
    _absolutize(probe, positions, dirs)
    for p, msg in _missing_local_data(probe):
        add(p, msg)


def _resolved_warnings(resolved: dict, where, check_files: bool) -> list[RecipeError]:
    """Warnings on a valid resolved recipe: datasets sharing prompts with different held-out
    fractions, warmup longer than training, and (``check_files``) ``package:`` sources not installed."""
    found = semantic.eval_split_warnings(resolved) + semantic.warmup_warnings(resolved) \
        + (_missing_packages(resolved) if check_files else [])
    return [RecipeError(*where(p), dotted(tuple(p)), msg, severity="warning") for p, msg in found]


def _under_any(path: str, roots: set) -> bool:
    """Whether dotted ``path`` is one of ``roots`` or inside one (``a.b`` is inside ``a``, ``a[0]`` too)."""
    return any(path == r or (r and path.startswith((r + ".", r + "["))) for r in roots)


def _missing_packages(resolved: dict) -> list[tuple[tuple, str]]:
    """``(key path, message)`` for each ``package:MODULE/FILE`` ``from_pretrained`` whose package is
    not installed or lacks the file; the message names the package to install. A warning, not an
    error: the recipe is valid, this machine cannot run it yet (``plan`` would size it as unknown)."""
    from llmlab.models.gguf import PACKAGE_PREFIX, locate

    out = []
    for section in ("tokenizer", "model"):
        source = (resolved.get(section) or {}).get("from_pretrained")
        if isinstance(source, str) and source.startswith(PACKAGE_PREFIX):
            try:
                locate(source)
            except FileNotFoundError as exc:
                out.append(((section, "from_pretrained"), f"{exc}; `llmlab run` and `plan` need it"))
    return out


def _missing_local_data(resolved: dict) -> list[tuple[tuple, str]]:
    """``(key path, message)`` for every dataset ``path:`` (already absolute) that names no file:
    a run would otherwise fail only when the stage reading it starts, after earlier stages trained."""
    import glob as globlib

    out = []
    for name, ds in (resolved.get("datasets") or {}).items():
        p = ds.get("path") if isinstance(ds, dict) else None
        if not isinstance(p, str):
            continue
        found = globlib.glob(p, recursive=True) if any(ch in p for ch in "*?[") else os.path.exists(p)
        if not found:
            out.append((("datasets", name, "path"), f"no such file, directory or matching glob: {p}"))
    return out


def _finish(errors: list[RecipeError]) -> list[RecipeError]:
    seen, out = set(), []
    for e in errors:
        k = (e.file, e.line, e.col, e.path, e.message)
        if k not in seen:
            seen.add(k)
            out.append(e)
    files = []
    for e in out:
        if e.file not in files:
            files.append(e.file)
    return sorted(out, key=lambda e: (e.file == SET_FILE, files.index(e.file), e.line, e.col))


def load_recipe_or_raise(path, overrides: Iterable[str] = (), env: Mapping[str, str] | None = None) -> dict:
    """Like :func:`load_recipe` but returns the resolved recipe.

    Raises:
        RecipeLoadError: the recipe has errors (all of them in ``.errors``).
    """
    resolved, errors = load_recipe(path, overrides, env)
    if errors:
        raise RecipeLoadError(errors)
    return resolved


def dump_resolved(resolved: dict) -> str:
    """The resolved recipe as YAML (key order kept), as written to ``recipe.resolved.yaml``; the
    values of secret-looking environment variables show as ``${NAME}``
    (:func:`llmlab.secrets.mask_secrets`)."""
    return yaml.safe_dump(mask_secrets(resolved), sort_keys=False, default_flow_style=False, allow_unicode=True)


def stage_order(resolved: dict) -> list[str]:
    """Stage names in execution order (file order)."""
    return list(resolved.get("stages", {}))


def load_for_command(path, overrides: Iterable[str], output_dir, console, world_size: int | None = None) -> dict | None:
    """Load a recipe for a command that reads it (plan, prepare, cache): every error and warning
    (:func:`load_recipe` with ``allow_code=None``) printed to the rich ``console``, warnings in
    yellow; ``output_dir`` (``--output-dir``), when given, replaces the recipe's; ``world_size``:
    the processes ``epochs`` are sized for (None: ``$WORLD_SIZE``).

    Returns:
        the resolved recipe, or None when it has errors (the command then exits 1).
    """
    warnings: list = []
    rec, errors = load_recipe(path, list(overrides), warnings=warnings, world_size=world_size)
    for e in errors or warnings:
        console.print(str(e), markup=False, highlight=False, style="yellow" if e.severity == "warning" else None)
    if errors:
        return None
    if output_dir is not None:
        rec["output_dir"] = str(Path(output_dir).resolve())
    return rec
