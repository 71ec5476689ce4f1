"""Where a dataset's rows come from: one class per kind of source, each with one content identity.

A recipe's ``datasets:`` entry names exactly one of ``builtin``, ``hub`` and ``path``;
:func:`dataset_source` turns it into a :class:`BuiltinSource`, :class:`HubSource` or
:class:`LocalSource` (the one place that tells them apart). Each is a frozen, typed view of the
section (:class:`DatasetSource`, the run plan's ``datasets``) and says:

- :meth:`~DatasetSource.fingerprint`: what the source is, by content (the spec, the bytes of local
  files, a builtin's package version, a hub id and revision). The one identity of the data: stage
  fingerprints, the token store's key and the tokenised-Arrow cache's key all hash it
  (:meth:`~DatasetSource.identity` adds the seed where the rows depend on it);
- :meth:`~DatasetSource.load`: the raw rows as a ``datasets.Dataset`` (memory-mapped where the
  source is on disk);
- :meth:`~DatasetSource.iter_rows`: the raw rows one by one, never holding them all (what the token
  stores read, :attr:`~DatasetSource.streamable`: every source but one with MinHash dedup).

Normalising, filtering and splitting those rows is one path for both readers
(:class:`llmlab.data.sources.RowRules`). Pure Python at import (``datasets`` is imported when rows
are read), so the run plan can hold sources without importing torch.
"""

from __future__ import annotations

import copy
import glob as globlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from llmlab.data.builtins import SEEDED_BUILTINS, builtin_rows
from llmlab.data.formats import BOOL_COLUMNS, COLUMNS_OF_KIND, KIND_OF_FORMAT, STRING_COLUMNS
from llmlab.specs import FilterSpec, typed_section
from llmlab.stage_specs import BUILTIN_FORMATS

_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                   ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class RawRows:
    """A source's rows as read, before normalisation.

    Attributes:
        dataset: ``datasets.Dataset`` of the source's own columns.
        bad: ``(place, problem)`` of source entries that made no row (builtins only).
    """

    dataset: Any
    bad: list = field(default_factory=list)


@dataclass(frozen=True)
class BadEntry:
    """An entry of a source that makes no row (a builtin's list that is no conversation):
    :meth:`DatasetSource.iter_rows` yields these before the rows, so a stream counts them as a
    loaded dataset does (:attr:`RawRows.bad`)."""

    place: str
    problem: str


@dataclass(frozen=True)
class DatasetSource:
    """One entry of ``datasets:`` (``$defs/dataset``): where rows come from and how they are read.

    Exactly one of ``builtin``, ``hub`` and ``path`` is set; :func:`dataset_source` builds the
    subclass that reads it (:class:`BuiltinSource`, :class:`HubSource`, :class:`LocalSource`)."""

    SCHEMA: ClassVar[str] = "#/$defs/dataset"
    KIND: ClassVar[str] = ""

    name: str = field(metadata={"derived": True})
    """The dataset's name in the recipe."""
    split: str
    """Hub split."""
    streaming: bool
    """Read row by row instead of loading the whole source."""
    format: str
    """The rows' format (auto: detected)."""
    columns: dict
    """Canonical column name → source column name."""
    eval_split: float
    """Fraction of prompts held out for evaluation."""
    filters: FilterSpec
    """Row filters."""
    max_bad_fraction: float
    """Most rows that may fail normalisation before the source is refused."""
    raw: dict = field(metadata={"derived": True}, repr=False, compare=False)
    """The resolved section itself: the record that fingerprints hash (absent keys stay absent)."""
    builtin: str | None = None
    """A built-in source (kjv, chatterbot, ...)."""
    hub: str | None = None
    """A Hugging Face hub dataset id."""
    subset: str | None = None
    """Hub subset (configuration)."""
    revision: str | None = None
    """Hub revision."""
    path: str | None = None
    """Local file, directory or glob (absolute)."""
    max_samples: int | None = None
    """Rows kept at most."""
    max_tokens: int | None = None
    """Tokens kept at most (pretraining)."""

    @property
    def kind(self) -> str:
        """``builtin`` | ``hub`` | ``local``."""
        return self.KIND

    def fingerprint(self) -> str:
        """The source's content fingerprint: sha256 of the spec (less a local ``path``) and the
        content (local files' bytes, by path relative to their folder; a builtin's package version
        and revision), plus the eval-split rule where rows are held out
        (:func:`llmlab.fingerprint.source_fingerprint`, which stage fingerprints hash). A copy of
        the files elsewhere is the same source; an edit of their bytes is another."""
        from llmlab.fingerprint import source_fingerprint

        return source_fingerprint(self.raw)

    @property
    def row_format(self) -> str:
        """The format of the rows read: the recipe's ``format`` (``auto``: detected from the rows)."""
        return self.format

    @property
    def seeded(self) -> bool:
        """Whether the canonical rows depend on the recipe's seed (an ``eval_split`` is drawn with it)."""
        return float(self.eval_split) > 0

    def identity(self, seed: int) -> dict:
        """What the canonical rows are, for the caches of derived data (token store, tokenised
        Arrow files): ``{"source": fingerprint()}``, plus ``"seed"`` where :attr:`seeded`. No
        dataset name: two names for the same data share one cache."""
        return {"source": self.fingerprint(), **({"seed": int(seed)} if self.seeded else {})}

    @property
    def streamable(self) -> bool:
        """Whether the rows are read as a stream (:meth:`iter_rows`, into the token stores) rather
        than loaded whole: unless MinHash dedup needs the whole dataset, every source (both ways give
        the same rows in the same order). A hub dataset without ``streaming: true`` is then read from
        its memory-mapped download in batches, a builtin from its rows as generated."""
        return bool(self.streaming) or self.filters.dedup != "minhash"

    def files(self) -> list[str]:
        """The local files read (none for a builtin or hub source)."""
        return []

    def load(self, seed: int, cache_dir: str | None) -> RawRows:
        """The rows as a ``datasets.Dataset`` (``cache_dir``: datasets' cache, None: its default)."""
        raise NotImplementedError

    def iter_rows(self, seed: int, cache_dir: str | None, batch_size: int = 1000) -> Iterator[dict | BadEntry]:
        """The rows one by one (read ``batch_size`` at a time), never all in memory; entries that
        make no row come first, as :class:`BadEntry`."""
        raise NotImplementedError


class BuiltinSource(DatasetSource):
    """A built-in source (:mod:`llmlab.data.builtins`): canonical rows of its own format."""

    KIND = "builtin"

    @property
    def row_format(self) -> str:
        """The builtin's own format (:data:`llmlab.stage_specs.BUILTIN_FORMATS`)."""
        return BUILTIN_FORMATS.get(self.builtin, self.format)

    @property
    def seeded(self) -> bool:
        """Held-out rows, or rows drawn with the seed (:data:`~llmlab.data.builtins.SEEDED_BUILTINS`)."""
        return self.builtin in SEEDED_BUILTINS or float(self.eval_split) > 0

    def _rows(self, seed: int) -> tuple[list[dict], list]:
        own = BUILTIN_FORMATS.get(self.builtin)
        if own is not None and self.format not in ("auto", own):
            raise ValueError(f"datasets.{self.name}.format: builtin {self.builtin!r} is {own!r} data, "
                             f"not {self.format!r}")
        return builtin_rows(self.builtin, seed, self.name)

    def load(self, seed: int, cache_dir: str | None) -> RawRows:
        """The builtin's rows in an in-memory ``datasets.Dataset`` of canonical features."""
        from datasets import Dataset

        rows, bad = self._rows(seed)
        return RawRows(Dataset.from_list(rows, features=canonical_features(KIND_OF_FORMAT[self.row_format])), bad)

    def iter_rows(self, seed: int, cache_dir: str | None, batch_size: int = 1000) -> Iterator[dict | BadEntry]:
        """The builtin's bad entries (:class:`BadEntry`), then its canonical rows."""
        rows, bad = self._rows(seed)
        yield from (BadEntry(str(place), problem) for place, problem in bad)
        yield from rows


class HubSource(DatasetSource):
    """A Hugging Face hub dataset (``hub``, ``subset``, ``split``, ``revision``)."""

    KIND = "hub"

    def load(self, seed: int, cache_dir: str | None) -> RawRows:
        """``datasets.load_dataset`` of the hub dataset. A ``streaming: true`` one is read up to
        ``max_samples`` rows straight into an Arrow file of ``cache_dir``
        (``datasets.Dataset.from_generator``, written in batches and memory-mapped), so the rows are
        never all in RAM; the file is keyed by (hub id, subset, split, revision, max_samples), like
        ``load_dataset``'s own cache.

        Raises:
            HubUnreachableError: the dataset cannot be had (:func:`load_hub_dataset`).
        """
        import hashlib

        from datasets import Dataset

        ds = load_hub_dataset(self.name, self, cache_dir, streaming=self.streaming)
        if self.streaming:
            if self.max_samples is None:  # the validator refuses this; a guard for direct callers
                raise ValueError(f"datasets: hub dataset {self.hub!r} streams without max_samples")
            n = int(self.max_samples)
            key = json.dumps([self.hub, self.subset, self.split, self.revision, n])
            ds = Dataset.from_generator(_take_rows, gen_kwargs={"stream": ds, "n": n}, features=ds.features,
                                        cache_dir=cache_dir, fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])
        return RawRows(ds)

    def iter_rows(self, seed: int, cache_dir: str | None, batch_size: int = 1000) -> Iterator[dict]:
        """The hub dataset's rows, ``batch_size`` at a time: streamed from the hub with ``streaming:
        true`` (``datasets.load_dataset(streaming=True)``), else read from its download
        (``datasets.load_dataset``: memory-mapped Arrow in ``cache_dir``, the rows :meth:`load` gives,
        in order), never all in memory."""
        yield from iter_rows(load_hub_dataset(self.name, self, cache_dir, streaming=self.streaming), batch_size)


class LocalSource(DatasetSource):
    """Local files: a file, a directory (every data file below it) or a glob (:func:`resolve_files`)."""

    KIND = "local"

    def files(self) -> list[str]:
        """The files ``path`` names, sorted.

        Raises:
            ValueError: naming ``datasets.<name>.path``: nothing matches, or mixed file types.
        """
        try:
            return resolve_files(self.path)  # absolute after resolution (relative to the recipe file)
        except ValueError as e:
            raise ValueError(f"datasets.{self.name}.path: {e}") from None

    def _unreadable(self, files: list[str], exc: Exception | None) -> ValueError:
        """The error for files that ``datasets`` could not read: the first broken file and line
        (:func:`diagnose_files`), else ``exc``."""
        problem = diagnose_files(files, _LOCAL_BUILDERS[Path(files[0]).suffix.lower()])
        why = f"cannot be read ({type(exc).__name__}: {exc})" if exc is not None else "no rows"
        return ValueError(f"datasets.{self.name}.path: {problem or why}")

    def _load_dataset(self, files: list[str], **kwargs):
        from datasets import load_dataset

        builder = _LOCAL_BUILDERS[Path(files[0]).suffix.lower()]
        if builder == "text":
            kwargs["sample_by"] = "paragraph"
        try:
            return load_dataset(builder, data_files=files, split="train", **kwargs)
        except Exception as exc:  # datasets' errors name no file or line: find the broken one
            raise self._unreadable(files, exc) from exc

    def load(self, seed: int, cache_dir: str | None) -> RawRows:
        """The files through ``datasets.load_dataset``, as memory-mapped Arrow in a folder of
        ``cache_dir`` (None: datasets' own cache) named by :meth:`fingerprint`: datasets keys its
        cache of local files on their paths and modification times, so bytes changed under the
        same size and mtime would otherwise be read from the old Arrow file.

        Raises:
            ValueError: no such files, or a broken one (naming the file and line).
        """
        if cache_dir is None:
            from datasets import config

            cache_dir = str(config.HF_DATASETS_CACHE)
        folder = os.path.join(cache_dir, f"local-{self.fingerprint()[:16]}")
        return RawRows(self._load_dataset(self.files(), cache_dir=folder))

    def iter_rows(self, seed: int, cache_dir: str | None, batch_size: int = 1000) -> Iterator[dict]:
        """The files streamed (``datasets.load_dataset(streaming=True)``), ``batch_size`` rows at a
        time (datasets' per-row iterator costs twice the CPU).

        Raises:
            ValueError: a broken file (naming the file and line), or no rows at all.
        """
        files = self.files()
        it = iter_rows(self._load_dataset(files, streaming=True), batch_size)
        n = 0
        while True:
            try:
                row = next(it)
            except StopIteration:
                break
            except Exception as exc:
                raise self._unreadable(files, exc) from exc
            n += 1
            yield row
        if n == 0:
            raise self._unreadable(files, None)


_SOURCE_OF = {"builtin": BuiltinSource, "hub": HubSource, "path": LocalSource}


def dataset_source(name: str, section: dict) -> DatasetSource:
    """The typed entry ``name`` of a recipe's ``datasets:`` (a bare one too: the schema's
    defaults), as the :class:`DatasetSource` subclass of its kind.

    Raises:
        ValueError: the section names none, or more than one, of ``builtin`` / ``hub`` / ``path``.
    """
    section = section or {}
    given = [k for k in _SOURCE_OF if section.get(k)]
    if len(given) != 1:
        raise ValueError(f"datasets.{name}: give exactly one of builtin / hub / path")
    return typed_section(_SOURCE_OF[given[0]], section, name=name, raw=copy.deepcopy(section),
                         filters=typed_section(FilterSpec, section.get("filters")))


def canonical_features(kind: str):
    """The ``datasets.Features`` of canonical rows of ``kind``."""
    from datasets import Features, List, Value

    msgs = List({"role": Value("string"), "content": Value("string")})
    return Features({c: Value("string") if c in STRING_COLUMNS else Value("bool") if c in BOOL_COLUMNS else msgs
                     for c in COLUMNS_OF_KIND[kind]})


# -- readers ---------------------------------------------------------------------------------------

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



def _take_rows(stream, n: int):
    """The first ``n`` rows of an ``IterableDataset`` (a generator for ``Dataset.from_generator``)."""
    yield from stream.take(n)


def resolve_files(path: str | os.PathLike) -> list[str]:
    """The data files a ``path:`` names: a file, a directory (all data files below it) or a glob.

    A relative path is taken relative to the current directory (a resolved recipe's paths are
    absolute: relative to the recipe file).

    Raises:
        ValueError: nothing matches, or the files mix builders (e.g. csv with jsonl).
    """
    p = str(path)
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



def iter_rows(ds, batch_size: int = 1000):
    """The rows of a ``datasets.Dataset`` as dicts, read in batches (a memory-mapped dataset is
    never loaded whole)."""
    for batch in ds.iter(batch_size=batch_size):
        cols = list(batch)
        for j in range(len(batch[cols[0]]) if cols else 0):
            yield {c: batch[c][j] for c in cols}
