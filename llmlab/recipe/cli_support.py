"""Bodies of ``llmlab validate`` and ``llmlab schema`` (kept out of cli.py so they stay torch-free).

``llmlab validate`` is parsed here with argparse, not typer: :func:`llmlab.cli.main` hands it over
before typer (and the pydantic it imports, ~0.2 s) is loaded, so a CI job pays for yaml and
jsonschema only. What the validate path imports is what the light install needs (README, "llmlab
in CI"): the standard library, PyYAML, jsonschema and packaging.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from pathlib import Path

FORMATS = ("text", "json", "github", "sarif")

#: the first line editors read (``# yaml-language-server: $schema=...``); a recipe names ours
_MODELINE = re.compile(r"^#\s*yaml-language-server:\s*\$schema=(\S+)", re.M)
#: a top-level key of a block mapping: at column 0, not a comment or document marker
_TOP_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)\s*:", re.M)

DATA_CHECK_NOTE = "data files not checked (--no-data-check): dataset paths and package: files may be missing"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llmlab validate",
        description="Check recipes against the schema and the semantic rules; print every error at once. "
                    "Exit status: 0 valid, 1 invalid (or, with --strict, any warning), 2 usage error.")
    ap.add_argument("paths", nargs="*", metavar="PATH",
                    help="Recipe files, directories (every *.yaml/*.yml recipe under them; other YAML files "
                         "are skipped) or globs ('recipes/**/*.yaml', quoted: llmlab expands it).")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="Override a recipe key, e.g. --set stages.sft.optimizer.lr=1e-5 (repeatable).")
    ap.add_argument("--format", default="text", metavar="FORMAT",
                    help="Output: text (FILE:LINE:COL lines), json, github (workflow annotations) or sarif "
                         "(SARIF 2.1.0, for code scanning).")
    ap.add_argument("--strict", action="store_true", help="Warnings fail too (exit 1).")
    ap.add_argument("--skip-non-recipes", action="store_true",
                    help="Skip named files that are not recipes too, as under a directory (for pre-commit, "
                         "which names every changed YAML file).")
    ap.add_argument("--no-data-check", dest="check_files", action="store_false",
                    help="Skip the checks of this machine's files (dataset paths exist, package: checkpoints "
                         "installed): shape and semantics only, for a CI job without the data.")
    return ap


def validate_main(argv: list[str]) -> int:
    """``llmlab validate`` from its arguments (after the word ``validate``). Returns the exit status;
    ``--help`` and argparse's own usage errors raise SystemExit (0 / 2)."""
    args = _parser().parse_args(argv)
    return validate_command(args.paths, args.overrides, args.format, strict=args.strict,
                            check_files=args.check_files, skip_non_recipes=args.skip_non_recipes)


def looks_like_recipe(path: Path) -> tuple[bool, str]:
    """Whether a YAML file found under a directory or by a glob is an llmlab recipe, without parsing
    it: its ``$schema`` modeline names ``recipe.schema.json`` (another schema: not a recipe), else its
    top-level keys are all recipe keys and include ``stages`` or ``extends``. A file named on the
    command line is checked whatever it holds, unless ``--skip-non-recipes``. Returns
    ``(is_recipe, why_not)``."""
    from llmlab.recipe.schema import SCHEMA_NAME, load_schema
    from llmlab.recipe.yamlload import MAX_RECIPE_BYTES

    try:
        with open(path, "rb") as f:
            text = f.read(MAX_RECIPE_BYTES).decode("utf-8", errors="replace")
    except OSError as exc:
        return False, f"cannot read: {exc.strerror or exc}"
    m = _MODELINE.search(text[:4096])
    if m:
        ok = m.group(1).rsplit("/", 1)[-1] == SCHEMA_NAME
        return ok, "" if ok else f"its $schema is {m.group(1)}"
    keys = set(_TOP_KEY.findall(text))
    known = set(load_schema()["properties"])
    if not keys & {"stages", "extends"}:
        return False, "no top-level 'stages' or 'extends'"
    if keys - known:
        return False, f"top-level keys that are not recipe keys: {', '.join(sorted(keys - known))}"
    return True, ""


def expand_paths(paths: list, skip_non_recipes: bool = False) -> tuple[list[Path], list[tuple[str, str]], list[str]]:
    """The recipe files that ``paths`` (files, directories, globs) name, in order and without
    repeats. Returns ``(files, skipped, usage_errors)``: ``skipped`` are ``(file, why)`` for YAML
    files under a directory or glob that are not recipes (:func:`looks_like_recipe`), and for named
    files too with ``skip_non_recipes``; hidden directories (``.git``, ``.venv``) are not searched.
    A directory or glob without any recipe is a usage error (a CI job pointed at the wrong place)."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    problems: list[str] = []

    def take(found: list[Path], arg: str) -> None:
        n = 0
        for f in found:
            ok, why = looks_like_recipe(f)
            if ok:
                n += 1
                if f not in files:
                    files.append(f)
            else:
                skipped.append((str(f), why))
        if not n:
            problems.append(f"{arg}: no recipe found (looked at {len(found)} YAML file{'s' if len(found) != 1 else ''})")

    for arg in map(str, paths):
        p = Path(arg)
        if p.is_file():
            ok, why = looks_like_recipe(p) if skip_non_recipes else (True, "")
            if not ok:
                skipped.append((arg, why))
            elif p not in files:
                files.append(p)
        elif p.is_dir():
            take(_yaml_under(p), arg)
        elif glob.has_magic(arg):
            found: list[Path] = []
            for m in sorted(glob.glob(arg, recursive=True)):
                found.extend(_yaml_under(Path(m)) if Path(m).is_dir() else [Path(m)])
            take(found, arg)
        else:
            problems.append(f"{arg}: no such recipe file, directory or glob match")
    return files, skipped, problems


def _yaml_under(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith((".yaml", ".yml")))
    return out


def validate_command(paths: list, overrides: list[str], fmt: str, strict: bool = False,
                     check_files: bool = True, skip_non_recipes: bool = False) -> int:
    """Validate every recipe that ``paths`` name (:func:`expand_paths`) with the ``--set``
    ``overrides``; print every error and warning in format ``fmt``:

    - text: ``FILE:LINE:COL: error: path: message`` per problem, ``OK FILE`` per valid recipe;
    - json: ``{"ok", "data_checked", "results": [{"file", "ok", "errors", "warnings"?}], "skipped"?}``;
    - github: ``::error file=F,line=L,col=C,title=...::message`` workflow commands (``::warning``);
    - sarif: one SARIF 2.1.0 log (:func:`to_sarif`).

    With ``check_files`` False (``--no-data-check``) the output says the files were not checked;
    ``skip_non_recipes`` (``--skip-non-recipes``) applies :func:`looks_like_recipe` to named files too.

    Returns:
        0 when every recipe is valid (and, with ``strict``, has no warning), 1 otherwise, 2 on a usage
        error (unknown format, no recipe given, a path that names nothing).
    """
    from llmlab.recipe.api import load_recipe

    if fmt not in FORMATS:
        print(f"error: --format must be one of {', '.join(FORMATS)}, got {fmt!r}", file=sys.stderr)
        return 2
    if not paths:
        print("error: give at least one recipe file, directory or glob", file=sys.stderr)
        return 2
    files, skipped, problems = expand_paths(paths, skip_non_recipes)
    if problems:
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
        return 2
    results = []
    for p in files:
        warnings: list = []
        _, errors = load_recipe(p, overrides, warnings=warnings, check_files=check_files)
        results.append((str(p), errors, warnings))
        if fmt == "text":
            for e in warnings + errors:
                print(e)
            if errors:
                print(f"{p}: {len(errors)} error{'s' if len(errors) != 1 else ''}", file=sys.stderr)
            else:
                print(f"OK {p}")
    failed = any(errors or (strict and warnings) for _, errors, warnings in results)
    _report(fmt, results, skipped, check_files, failed)
    return 1 if failed else 0


def _report(fmt: str, results: list, skipped: list, check_files: bool, failed: bool) -> None:
    """Print what ``fmt`` prints after the checks (text printed its lines as it went)."""
    if fmt == "text":
        for f, why in skipped:
            print(f"skipped {f}: not a recipe ({why})")
        if not check_files:
            print(f"note: {DATA_CHECK_NOTE}")
    elif fmt == "json":
        out: dict = {"ok": not failed, "data_checked": check_files, "results": []}
        for f, errors, warnings in results:
            r = {"file": f, "ok": not errors, "errors": [e.to_dict() for e in errors]}
            if warnings:
                r["warnings"] = [w.to_dict() for w in warnings]
            out["results"].append(r)
        if skipped:
            out["skipped"] = [{"file": f, "reason": why} for f, why in skipped]
        print(json.dumps(out, indent=2))
    elif fmt == "github":
        for _, errors, warnings in results:
            for e in warnings + errors:
                print(github_annotation(e))
        if not check_files:
            print(f"::notice title=llmlab validate::{_gh_escape(DATA_CHECK_NOTE)}")
        n_bad = sum(1 for _, errors, _w in results if errors)
        print(f"llmlab validate: {len(results)} recipe{'s' if len(results) != 1 else ''}, {n_bad} invalid")
    else:
        print(json.dumps(to_sarif(results, check_files), indent=2))


def _gh_escape(text: str, prop: bool = False) -> str:
    """Escape a workflow-command message (``%``, CR, LF) or, with ``prop``, a property value (also
    ``:`` and ``,``), as GitHub's runner decodes them."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def github_annotation(e) -> str:
    """One GitHub Actions workflow command for a :class:`~llmlab.recipe.errors.RecipeError`:
    ``::error file=F,line=L,col=C,title=KEY::MESSAGE`` (``::warning`` for a warning); an error in a
    ``--set`` override has no file, its title says which override."""
    from llmlab.recipe.api import SET_FILE

    d = e.to_dict()  # secret values masked
    if d["file"] == SET_FILE:
        title = f"--set #{d['line']} " + d["path"]
        props = f"title={_gh_escape(title.strip(), prop=True)}"
    else:
        props = (f"file={_gh_escape(Path(d['file']).as_posix(), prop=True)},line={d['line']},col={d['col']}"
                 + (f",title={_gh_escape(d['path'], prop=True)}" if d["path"] else ""))
    return f"::{e.severity} {props}::{_gh_escape(d['message'])}"


def to_sarif(results: list, check_files: bool = True) -> dict:
    """A SARIF 2.1.0 log of ``results`` (``(file, errors, warnings)`` triples): one result per
    problem, level ``error`` or ``warning``, rule ``llmlab/recipe``, located by file URI (relative to
    the working directory, ``/`` separators), line and column; ``--set`` problems carry no location.
    With ``check_files`` False, a notification says the data files were not checked."""
    from llmlab import __version__
    from llmlab.recipe.api import SET_FILE

    out = []
    for _, errors, warnings in results:
        for e in errors + warnings:
            d = e.to_dict()
            r: dict = {"ruleId": "llmlab/recipe", "level": e.severity,
                       "message": {"text": f"{d['path']}: {d['message']}" if d["path"] else d["message"]}}
            if d["file"] != SET_FILE:
                r["locations"] = [{"physicalLocation": {
                    "artifactLocation": {"uri": _sarif_uri(d["file"])},
                    "region": {"startLine": d["line"], "startColumn": d["col"]}}}]
            else:
                r["message"]["text"] = f"--set #{d['line']}: " + r["message"]["text"]
            out.append(r)
    invocation: dict = {"executionSuccessful": True}
    if not check_files:
        invocation["toolExecutionNotifications"] = [{"level": "note", "message": {"text": DATA_CHECK_NOTE}}]
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "llmlab", "version": __version__, "rules": [{
                "id": "llmlab/recipe", "name": "RecipeCheck",
                "shortDescription": {"text": "llmlab recipe schema and semantic checks"}}]}},
            "invocations": [invocation],
            "results": out,
        }],
    }


def _sarif_uri(file: str) -> str:
    p = Path(file)
    if p.is_absolute():
        try:
            p = p.relative_to(Path.cwd())
        except ValueError:
            return p.as_uri()
    return p.as_posix()


def schema_command() -> int:
    """Print the recipe JSON Schema to stdout. Returns 0."""
    from llmlab.recipe.schema import schema_path

    sys.stdout.write(schema_path().read_text(encoding="utf-8"))
    return 0
