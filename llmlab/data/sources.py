"""Named datasets of a recipe: loading, normalisation, bad-row accounting, filters, eval split.

``load_named_dataset(recipe, name)`` reads the source of ``recipe["datasets"][name]`` (a
:class:`~llmlab.data.source.DatasetSource`: builtin, hub or local files), normalises every row to
llmlab's canonical rows (see :mod:`llmlab.data.formats`), drops and counts bad rows, applies the
filters and splits off the held-out evaluation rows. :func:`stream_rows` does the same to a source
read row by row (the token store's streamed text), with the same rules (:class:`RowRules`), so both
give the same rows in the same order and the same counts.

The built-in sources are described in :mod:`llmlab.data.builtins`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llmlab.data.builtins import (  # noqa: F401 (re-exported: the built-in sources)
    ALTERNATING_FILES, ARITHMETIC_TERMS, BUILTINS, SHUFFLE_MIN_WORDS, _package_dir, arithmetic_problems,
    chatterbot_conversations, chatterbot_pairs, kjv_chapters, shuffled_words)
from llmlab.data.formats import KIND_OF_FORMAT, BadRow, detect_format, normaliser, row_text
from llmlab.data.source import (  # noqa: F401 (re-exported: the readers of sources)
    _LOCAL_BUILDERS, BadEntry, DatasetSource, HubUnreachableError, canonical_features, dataset_source, diagnose_files,
    hub_unreachable, iter_rows, load_hub_dataset, resolve_files)
from llmlab.schemafile import schema_filled, top_level
from llmlab.specs import FilterSpec, typed_section

log = logging.getLogger(__name__)

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
    return schema_filled(DATASET_SCHEMA, _section(recipe, name), nulls=True)


def _section(recipe: dict, name: str) -> dict:
    datasets_ = top_level(recipe, "datasets") or {}
    if name not in datasets_:
        raise KeyError(f"datasets.{name}: no such dataset (defined: {', '.join(datasets_) or 'none'})")
    return datasets_[name]


def recipe_source(recipe: dict, name: str) -> DatasetSource:
    """The source of the recipe's dataset ``name`` (:func:`llmlab.data.source.dataset_source`).

    Raises:
        KeyError: no dataset ``name``. ValueError: it names none or several of builtin / hub / path.
    """
    return dataset_source(name, _section(recipe, name))


def cache_dir(recipe: dict) -> str | None:
    """``datasets``' cache of a run: ``<output_dir>/cache/hf`` (None without an output_dir)."""
    out = top_level(recipe, "output_dir")
    return str(Path(out) / "cache" / "hf") if out else None


def _memo_key(src: DatasetSource, seed: int) -> str:
    """The per-process memo key of a loaded dataset: its name, section, seed and identity (the
    content fingerprint), so files whose bytes changed are read again."""
    return json.dumps({"spec": src.raw, "seed": seed, "name": src.name, "data": src.identity(seed)},
                      sort_keys=True, default=str)


def load_named_dataset(recipe: dict, name: str) -> DatasetSplits:
    """Load, normalise, check, filter and split the recipe's dataset ``name``.

    Results are memoised per process on (dataset spec, seed, content fingerprint), so stages
    sharing a dataset load it once.

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
    src = recipe_source(recipe, name)
    seed = int(top_level(recipe, "seed"))
    key = _memo_key(src, seed)
    if key in _CACHE:
        return _CACHE[key]
    got = src.load(seed, cache_dir(recipe))
    raw = got.dataset
    if src.max_samples is not None:
        raw = raw.select(range(min(len(raw), int(src.max_samples))))
    rules = RowRules(src, seed)
    if rules.renames:
        rules.check_columns(raw.column_names)
        raw = raw.remove_columns(rules.clashes(raw.column_names)).rename_columns(rules.renames)
    rules.detect(raw.column_names, raw[0] if len(raw) else None)
    ds, bad = _normalise(raw, rules)
    num_raw = len(raw) + len(got.bad)
    bad_all = got.bad + bad
    rules.check_bad(len(bad_all), num_raw, bad_all)
    if len(ds) == 0:
        raise ValueError(f"datasets.{name}: no usable rows")

    ds, filtered = apply_filters(ds, src.filters, name)
    train, eval_ = split_eval(ds, rules.kind, rules.fraction, seed, name)
    out = DatasetSplits(name=name, format=rules.format, kind=rules.kind, train=train, eval=eval_,
                        num_raw=num_raw, num_bad=len(bad_all), bad_rows=bad_all[:_MAX_BAD_LOGGED],
                        filtered=filtered)
    log.info("datasets.%s: %s/%s, %d train + %d eval rows (dropped %s)", name, rules.format, rules.kind,
             len(train), len(eval_), out.dropped)
    _CACHE[key] = out
    return out


def read_splits(recipe: dict, name: str, sides: tuple[str, ...] = ("train", "eval")) -> dict[str, list[dict]]:
    """The canonical rows of the sides ``sides`` (train, eval) of the recipe's dataset ``name``, as
    lists of dicts equal to ``load_named_dataset(recipe, name).<side>.to_list()``, in that order.

    A streamable source (:attr:`~llmlab.data.source.DatasetSource.streamable`) is read as a stream
    (:func:`stream_split_rows`: no Arrow cache, no ``datasets.map``) holding only the rows of
    ``sides``, with the loaded dataset's checks once it ends (no usable rows; an ``eval_split``
    that holds out nothing or everything); any other is loaded (:func:`load_named_dataset`) and
    read in batches. For ``llmlab eval -d NAME`` and the evaluate stage, which score a few held-out
    rows of a dataset that may be large.

    Raises:
        KeyError: no dataset ``name``. ValueError: as :func:`load_named_dataset` raises.
        HubUnreachableError: a hub dataset that cannot be had.
    """
    src = recipe_source(recipe, name)
    if not src.streamable:
        splits = load_named_dataset(recipe, name)
        return {side: list(iter_rows(getattr(splits, side))) for side in sides}
    out: dict[str, list[dict]] = {side: [] for side in sides}
    counts, info = {"train": 0, "eval": 0}, {}
    for row, _, side in stream_split_rows(src, int(top_level(recipe, "seed")), cache_dir(recipe), info):
        counts[side] += 1
        if side in out:
            out[side].append(row)
    if info["rows_read"] == info["bad_rows"]:
        raise ValueError(f"datasets.{name}: no usable rows")
    if counts["train"] + counts["eval"]:
        check_split(name, float(src.eval_split), counts["train"], counts["eval"])
    return out


def stream_rows(src: DatasetSource, seed: int, hf_cache: str | None, split: str,
                info: dict) -> Iterator[tuple[dict, str]]:
    """The rows of :func:`stream_split_rows` on side ``split`` (train | eval), as ``(row, kind)``."""
    for row, kind, side in stream_split_rows(src, seed, hf_cache, info):
        if side == split:
            yield row, kind


def stream_split_rows(src: DatasetSource, seed: int, hf_cache: str | None,
                      info: dict) -> Iterator[tuple[dict, str, str]]:
    """The canonical rows of ``src`` read as a stream
    (:meth:`~llmlab.data.source.DatasetSource.iter_rows`), each as ``(row, kind, side)`` (side:
    ``train`` | ``eval``), never holding the rows.

    The rules of :func:`load_named_dataset` (:class:`RowRules`), row by row: stop after
    ``max_samples`` rows, rename ``columns``, normalise (bad rows are counted and skipped), filter,
    and give each row its side by the recipe-wide hash split (:func:`held_out`), which needs no
    second pass and no memory. Filters and bad-row accounting see every row read (both sides of the
    split), so the counts are the loaded dataset's, and local files give exactly its rows, in order.
    Fills ``info`` with ``rows_read``, ``bad_rows``, ``dropped`` and ``first_bad_rows`` once the
    stream ends.

    Raises:
        ValueError: MinHash dedup (it needs the whole dataset), a missing column, an undetectable
            format, or more than ``max_bad_fraction`` bad rows.
        HubUnreachableError: a hub dataset that cannot be had.
    """
    if src.filters.dedup == "minhash":
        raise ValueError(f"datasets.{src.name}.filters.dedup: minhash needs the whole dataset; use exact "
                         "with streaming")
    rules = RowRules(src, seed)
    n = 0
    entries: list[tuple[Any, str]] = []  # the source's entries that make no row (counted as rows read)
    bad: list[tuple[Any, str]] = []
    limit = src.max_samples
    for row in src.iter_rows(seed, hf_cache, min(1000, int(limit)) if limit is not None else 1000):
        if isinstance(row, BadEntry):
            entries.append((row.place, row.problem))
            continue
        if limit is not None and n >= int(limit):
            break
        n += 1
        if rules.kind is None:
            rules.check_columns(list(row))
        row = rules.rename(row)
        if rules.kind is None:
            rules.detect(list(row), row)
        r, problem = rules.normalise(row)
        if problem:
            bad.append((n - 1, problem))
            continue
        if rules.row_filter.keep(r):
            yield r, rules.kind, "eval" if rules.fraction > 0 and rules.held(r) else "train"
    n, bad = n + len(entries), entries + bad  # as a loaded dataset counts them
    rules.check_bad(len(bad), n, bad)
    info.update(rows_read=n, bad_rows=len(bad), dropped={"bad": len(bad), **rules.row_filter.counts},
                first_bad_rows=[[str(r), p] for r, p in bad[:_MAX_BAD_LOGGED]])


class RowRules:
    """How one source's raw rows become canonical rows: column renames, the format (given or
    detected), normalisation with bad-row accounting, the per-row filters and the eval split. The
    one set of rules behind loaded datasets (:func:`load_named_dataset`, which applies them to
    whole Arrow tables) and streamed ones (:func:`stream_rows`, row by row).

    Attributes:
        renames: source column → canonical column (``columns:`` inverted, identities left out).
        format: the rows' format; ``auto`` until :meth:`detect`.
        kind: the canonical kind of :attr:`format` (None until :meth:`detect`).
        row_filter: the dataset's :class:`RowFilter`.
        fraction: ``eval_split``.
    """

    def __init__(self, src: DatasetSource, seed: int):
        self.name, self.seed = src.name, int(seed)
        self.renames = {s: d for d, s in src.columns.items() if s != d}
        self.format = src.row_format
        self.kind: str | None = None
        self._norm = None
        self.row_filter = RowFilter(src.filters, src.name)
        self.fraction = float(src.eval_split)
        self.max_bad_fraction = float(src.max_bad_fraction)

    def check_columns(self, names: list[str]) -> None:
        """Raises ValueError (naming ``datasets.<name>.columns``) when a renamed column is missing."""
        missing = [s for s in self.renames if s not in names]
        if missing:
            raise ValueError(f"datasets.{self.name}.columns: no column(s) {missing} in {sorted(names)}")

    def clashes(self, names: list[str]) -> list[str]:
        """Source columns dropped before renaming: those named like a rename's target (and not renamed)."""
        return [d for d in self.renames.values() if d in names and d not in self.renames]

    def rename(self, row: dict) -> dict:
        """``row`` with :meth:`clashes` dropped and its columns renamed."""
        if not self.renames:
            return row
        drop = set(self.clashes(list(row)))
        return {self.renames.get(k, k): v for k, v in row.items() if k not in drop}

    def detect(self, names: list[str], first_row: dict | None) -> None:
        """Fix the format (detected from the columns and first row when ``auto``) and its kind.

        Raises:
            ValueError: naming the dataset: no format fits, or an unknown format.
        """
        if self.format == "auto":
            try:
                self.format = detect_format(names, first_row)
            except ValueError as e:
                raise ValueError(f"datasets.{self.name}: {e}") from None
        self.kind = KIND_OF_FORMAT.get(self.format)
        if self.kind is None:
            raise ValueError(f"datasets.{self.name}.format: unknown format {self.format!r}")
        self._norm = normaliser(self.format)

    def normalise(self, row: dict) -> tuple[dict | None, str]:
        """``(canonical row, "")``, or ``(None, problem)`` for a bad row (:class:`BadRow`)."""
        try:
            return self._norm(row), ""
        except BadRow as e:
            return None, str(e)

    def held(self, row: dict) -> bool:
        """Whether canonical ``row`` is held out for evaluation (:func:`held_out` of its :func:`prompt_key`)."""
        return held_out(prompt_key(row, self.kind), self.fraction, self.seed)

    def check_bad(self, num_bad: int, num_raw: int, bad: list) -> None:
        """:func:`check_bad_rows` with the dataset's ``max_bad_fraction``."""
        check_bad_rows(self.name, num_bad, num_raw, bad[:_MAX_BAD_LOGGED], self.max_bad_fraction)


# -- normalisation -------------------------------------------------------------------------------

def _normalise(raw, rules: RowRules):
    """Normalise every row of a loaded dataset with a batched map (:meth:`RowRules.normalise`);
    returns (canonical dataset, [(row, problem)])."""
    import numpy as np
    from datasets import Value

    from llmlab.data.formats import BOOL_COLUMNS, COLUMNS_OF_KIND, STRING_COLUMNS

    cols = COLUMNS_OF_KIND[rules.kind]
    empty = {c: ("" if c in STRING_COLUMNS else False if c in BOOL_COLUMNS else []) for c in cols}
    features = canonical_features(rules.kind)
    features["_bad"] = Value("string")

    def fn(batch: dict, indices: list[int]) -> dict:
        keys = list(batch)
        out: dict[str, list] = {c: [] for c in (*cols, "_bad")}
        for j in range(len(indices)):
            r, problem = rules.normalise({k: batch[k][j] for k in keys})
            for c in cols:
                out[c].append((r or empty)[c])
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
    check_split(name, fraction, int((~held).sum()), int(held.sum()))
    return ds.select(np.flatnonzero(~held).tolist()), ds.select(np.flatnonzero(held).tolist())


def check_split(name: str, fraction: float, train: int, held: int) -> None:
    """The checks of an ``eval_split`` of ``fraction`` > 0 that left ``train`` and ``held`` rows (of
    a dataset with rows; loaded and streamed datasets alike).

    Raises:
        ValueError: naming ``datasets.<name>.eval_split``: no row held out, or none left to train on.
    """
    if fraction > 0 and not held:
        raise ValueError(f"datasets.{name}.eval_split: {fraction:g} holds out none of the {train} rows "
                         "(a prompt is held out when a hash of it falls below the fraction); raise "
                         "eval_split or add rows")
    if fraction > 0 and not train:
        raise ValueError(f"datasets.{name}.eval_split: nothing left to train on")



def _row_label(row) -> str:
    """``row N`` counted from 1 as editors count lines (rows are indexed from 0 internally), or
    the place a built-in source names."""
    return f"row {row + 1}" if isinstance(row, int) else str(row)

def _load_hub(src: DatasetSource | dict, recipe: dict, name: str | None = None):
    """The rows of a hub dataset (``src``: its source, or a bare section) as a ``datasets.Dataset``
    in the run's cache (:meth:`llmlab.data.source.HubSource.load`)."""
    if not isinstance(src, DatasetSource):  # a bare section (absent keys: the schema's defaults)
        src = dataset_source(name or "", src)
    return src.load(int(top_level(recipe, "seed")), cache_dir(recipe)).dataset


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

