"""The token store: tokenised text documents on disk as memory-mapped shards.

A *store* holds the tokenised documents of one split of one named text dataset, each followed by
the tokenizer's EOS, for one tokenizer. It is a folder::

    <root>/<key>/manifest.json              written last: the store is complete when it exists
    <root>/<key>/shard-00000.tokens.npy     uint16 ids when the vocabulary has <= 65,536 ids, else uint32
    <root>/<key>/shard-00000.offsets.npy    int64 [documents + 1]: document d of the shard is
                                            tokens[offsets[d]:offsets[d + 1]] (its EOS included)
    <root>/<key>/shard-00000.verified       the last check of the shard's content (see Trust)
    ...

Files are ``.npy`` arrays opened with ``numpy.load(mmap_mode="r")``, so a reader maps pages, never
the corpus. ``manifest.json`` records the tokenizer's sha256, the source fingerprint, documents,
tokens, the rows dropped at load (bad rows, filters) and each shard's sha256 and largest id; it
names files relative to the folder, so the folder (or the run directory holding it) can be moved.

**Trust.** A store is never read blindly: each shard is checked the first time a process reads it
(sizes, sha256s, ids below the vocabulary size), and a check that passes leaves a verification
record, ``shard-NNNNN.verified`` (the sha256s, the largest id, and each file's size, mtime, ctime
and inode when checked), so later processes trust an unchanged shard after a ``stat`` instead of
hashing it again (:class:`TokenStore`). A damaged store stops ``llmlab run`` and ``llmlab prepare``
with an error naming the folder, the file, and the commands that delete and rebuild it; llmlab never
deletes it on its own, nor tokenises over a store folder that lost its manifest.

**Key.** ``key = sha256(STORE_VERSION, tokenizer sha256, source identity, split)`` where the
tokenizer sha256 hashes the Rust tokenizer's JSON and the EOS id (:func:`tokenizer_sha256`) and
the source identity (:func:`source_fingerprint`) is the dataset source's content fingerprint
(:meth:`llmlab.data.source.DatasetSource.fingerprint`, the one stage fingerprints hash: its spec,
every setting that changes the rows, and the content of local files, a builtin's package version
and revision, or a hub id and revision), plus the seed where the rows depend on it. A copy of the
data elsewhere has the same key; a file whose bytes change gets a new store.
Every stage, run and recipe naming the same data with the same tokenizer so shares one store.

**Root.** ``token_store`` in the recipe (a path relative to the recipe file, absolute once
resolved), else the environment variable ``LLMLAB_TOKEN_STORE``, else ``<output_dir>/cache/tokens``
(:func:`store_root`).

**Writing** (:func:`build_store`) is resumable: documents are cut into shards of about
:data:`SHARD_TEXT_BYTES` of text (a pure function of the rows), each shard is tokenised by one
worker process and written as ``*.tmp`` files renamed into place, its own small JSON last; the
folder is ``<key>.partial`` until the manifest is written and the folder renamed to ``<key>``.
The folder carries llmlab's ownership marker (:mod:`llmlab.ownership`) from its creation, so
``llmlab cache --prune`` deletes only folders that are token stores.
A killed prepare resumes at the first missing shard, and leaves no worker behind (they end with
their parent: :func:`die_with_parent`). Tokenising uses the exact piece cache of
:mod:`llmlab.data.fastencode` in every worker (one cache per process, kept across its shards).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from llmlab.fingerprint import EVAL_SPLIT_RULE, sha256_file  # noqa: F401 (EVAL_SPLIT_RULE: tests patch it here)
from llmlab.schemafile import top_level

log = logging.getLogger(__name__)

STORE_VERSION = "1"
#: text bytes per shard (about 2 M tokens of English with an 8 k–32 k vocabulary)
SHARD_TEXT_BYTES = 8 << 20
class StoreError(ValueError):
    """A store folder that is damaged or does not match what reads it."""


# -- keys ----------------------------------------------------------------------------------------

def tokenizer_sha256(tokenizer) -> str:
    """sha256 of what the ids in a store depend on: the Rust tokenizer's JSON and the EOS id.

    Equal for a tokenizer built in memory and the same tokenizer loaded from its files (and for
    ``tokenizers.Tokenizer.from_file(tokenizer.json)`` with the same EOS id, which ``llmlab plan``
    uses without importing transformers).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: its vocabulary and class
        desc = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    else:
        desc = backend.to_str()
    return _tok_sha(desc, tokenizer.eos_token_id)


def _tok_sha(tokenizer_json: str, eos_id: int | None) -> str:
    h = hashlib.sha256(tokenizer_json.encode())
    h.update(json.dumps({"eos": eos_id}).encode())
    return h.hexdigest()


def tokenizer_sha256_of_dir(path: str | os.PathLike) -> str | None:
    """:func:`tokenizer_sha256` of a saved tokenizer directory, computed with ``tokenizers`` only
    (no torch/transformers import); None when the directory has no ``tokenizer.json``."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    eos = None
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        eos_tok = json.loads(cfg.read_text()).get("eos_token")
        if isinstance(eos_tok, dict):
            eos_tok = eos_tok.get("content")
        eos = tok.token_to_id(eos_tok) if eos_tok else None
    return _tok_sha(tok.to_str(), eos)


def source_fingerprint(recipe: dict, name: str) -> dict:
    """What the canonical rows of dataset ``name`` are: its source's identity
    (:meth:`llmlab.data.source.DatasetSource.identity`: the content fingerprint that stage
    fingerprints hash, plus the seed where the rows depend on it). JSON-able; no dataset name, so
    two names for the same data share a store.

    Raises:
        KeyError: no dataset ``name``; ValueError: a local ``path`` matches no file.
    """
    from llmlab.data.sources import recipe_source

    return recipe_source(recipe, name).identity(int(top_level(recipe, "seed")))


def store_root(recipe: dict) -> Path:
    """Where the stores of a recipe live: ``token_store`` (made absolute by resolution, relative to
    the recipe file), else ``$LLMLAB_TOKEN_STORE``, else ``<output_dir>/cache/tokens``."""
    given = top_level(recipe, "token_store") or os.environ.get("LLMLAB_TOKEN_STORE")
    if given:
        return Path(os.path.expanduser(str(given)))
    from llmlab.layout import RunLayout

    return RunLayout.of(recipe).token_store


def store_key(tok_sha: str, source_fp: dict, split: str) -> str:
    """The store folder name: sha256 of (store version, tokenizer, source identity, split)."""
    blob = json.dumps({"v": STORE_VERSION, "tok": tok_sha, "src": source_fp, "split": split},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def store_path(recipe: dict, name: str, split: str, tok_sha: str) -> Path:
    """The folder of the store of ``split`` (train | eval) of dataset ``name``."""
    return store_root(recipe) / store_key(tok_sha, source_fingerprint(recipe, name), split)


# -- reading -------------------------------------------------------------------------------------

#: a verification record is trusted only for files last changed at least this long before the
#: check it records: a change within one tick of the file system's clock can leave the file's
#: times as they were. Linux's file times tick every 1-10 ms (exFAT 10 ms); FAT (2 s) and HFS+ (1 s)
#: keep whole seconds, recognised by times that are exact seconds
FINE_TICK_MARGIN_NS = 20 * 10**6
COARSE_TICK_MARGIN_NS = 2 * 10**9


def _margin_ns(stats: Iterable[list[int]]) -> int:
    """How long after their last change files with these :func:`_file_stat` can be vouched for."""
    coarse = all(t % 10**9 == 0 for st in stats for t in st[1:3])
    return COARSE_TICK_MARGIN_NS if coarse else FINE_TICK_MARGIN_NS


def _file_stat(path: Path) -> list[int]:
    """What changes when a file's bytes change: [size, mtime ns, ctime ns, inode]. The change time
    cannot be set back by a user (``touch -d`` and ``os.utime`` set it to now)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def sha256_mapped(path: Path) -> str:
    """sha256 hex digest of a file's bytes, hashed from a read-only memory map (a third less CPU
    than reading it in chunks: no copy into Python bytes)."""
    import mmap

    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return hashlib.sha256(m).hexdigest()


def _record_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.verified"


def _write_record(folder: Path, index: int, record: dict) -> None:
    """Write a shard's verification record (best effort: a read-only store root keeps none, and its
    shards are then checked by every process that reads them)."""
    path = _record_path(folder, index)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _trusted_record(folder: Path, meta: dict, stats: dict[str, list[int]]) -> dict | None:
    """The shard's verification record when it vouches for the files as they are now: the same
    sha256s as ``meta`` (the manifest's), the same :func:`_file_stat` of both files, and taken at
    least :func:`_margin_ns` after both were last changed; else None."""
    try:
        rec = json.loads(_record_path(folder, meta["index"]).read_text())
        last_change = max(max(s[1], s[2]) for s in stats.values())
        if all(rec[f"{k}_sha256"] == meta[f"{k}_sha256"] and rec[f"{k}_stat"] == stats[k] for k in stats) \
                and rec["checked_ns"] - last_change >= _margin_ns(stats.values()):
            return rec
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def check_shard_content(folder: Path, meta: dict, files: dict[str, Path], ids: dict[str, np.ndarray], vocab_size: int,
                        damaged, force: bool) -> None:
    """Check a store shard's content, unless a trusted verification record vouches for it
    (:func:`_trusted_record`; ``force``: always), and record a successful check
    (``shard-NNNNN.verified``): every file's sha256 against ``meta``'s and every id below
    ``vocab_size``. The one check of the token store (:class:`TokenStore`) and the chat store
    (:class:`llmlab.data.chat_store.ChatStore`).

    Args:
        folder: the store. meta: the shard's ``index`` and ``<key>_sha256`` for every key of ``files``.
        files: key → file. ids: key → the mapped token ids of that file (keys of ``files``).
        damaged: ``(file name, what) -> StoreError`` naming the store and what to do.

    Raises:
        StoreError: from ``damaged``: a file whose sha256 differs (an id outside the vocabulary
            said too), or bytes as written holding an id at or above ``vocab_size``.
    """
    checked_ns = time.time_ns()
    stats = {k: _file_stat(f) for k, f in files.items()}
    rec = None if force else _trusted_record(folder, meta, stats)
    top = {k: (int(a.max()) if a.size else -1) for k, a in ids.items()} if rec is None else \
        {next(iter(ids)): int(rec["max_id"])}
    worst = max(top, key=top.get)
    max_id = top[worst]
    outside = f"holds token id {max_id}, outside the tokenizer's vocabulary of {vocab_size} ids" \
        if max_id >= vocab_size else ""
    if rec is None:
        for k, f in files.items():
            if sha256_mapped(f) != meta[f"{k}_sha256"]:
                raise damaged(f.name, "sha256 differs from manifest.json (its bytes changed after it was "
                              "written)" + (f"; the shard {outside}" if outside else ""))
    if outside:  # bytes as written, by a tokenizer with more ids than this store's manifest says
        raise damaged(files[worst].name, outside)
    if rec is not None:
        return
    _write_record(folder, meta["index"], {**{f"{k}_sha256": meta[f"{k}_sha256"] for k in files},
                                          **{f"{k}_stat": stats[k] for k in files},
                                          "max_id": max_id, "checked_ns": checked_ns})


def rebuild_hint(path: Path) -> str:
    """What to do with the unusable store folder ``path``: the command that deletes it and the one
    that rebuilds it (the recipe this process was started with, when its command line names one)."""
    recipe = next((shlex.quote(a) for a in sys.argv[1:] if a.endswith((".yaml", ".yml"))), "RECIPE")
    return (f"delete the folder (`rm -r {shlex.quote(str(path))}`; llmlab never deletes it on its own) and "
            f"rebuild it with `llmlab prepare {recipe}`")


def damaged_store_error(path: Path, manifest: dict, file: str, what: str, kind: str = "token store") -> StoreError:
    """The error for a damaged ``file`` of the store ``path``: the file, what is wrong, the store
    (its dataset and split where its manifest names them) and what to do (:func:`rebuild_hint`)."""
    where = f" ({manifest.get('dataset')}, {manifest.get('split')})" if "dataset" in manifest else ""
    return StoreError(f"{path / file}: {what}. The {kind} {path}{where} cannot be used: {rebuild_hint(path)}")


def incomplete_store_error(path: Path) -> StoreError:
    """The error for a store folder ``path`` without ``manifest.json`` (its files cannot be trusted,
    and tokenising again cannot complete it: the folder name is taken)."""
    return StoreError(f"{path}: a token store folder without manifest.json (not a complete token store; its "
                      f"shards cannot be trusted and it is not tokenised again over them); {rebuild_hint(path)}")


class TokenStore:
    """A complete store, memory-mapped (see the module docstring for the layout), never trusted
    blindly: each shard is checked the first time this process reads it (:meth:`_shard`).

    The first read of a shard maps it and checks its sizes against the manifest, then its content:
    the sha256 of both files against the manifest's and every id against the vocabulary, unless the
    shard's verification record (``shard-NNNNN.verified``, written by an earlier check) vouches for
    the files as they are now (same sha256s, same size, mtime, ctime and inode, checked at least
    :func:`_margin_ns` after their last change). So a store is hashed once (by its writer, at the
    end of :func:`build_store`), not by every process; :meth:`verify` hashes every shard regardless.
    What a record cannot see: bytes that change with no change of the file's times (media
    corruption, a disk image restored with its metadata); ``llmlab prepare --verify`` hashes again.

    Attributes:
        path: the folder. manifest: its ``manifest.json``. documents, tokens: totals.

    Raises:
        StoreError: naming the store folder, the file, what is wrong and the commands that delete
            and rebuild it (:func:`rebuild_hint`): no or an unreadable manifest; on a shard's first
            read, a file missing, truncated or empty, other sizes than the manifest's, an id at or
            above the vocabulary size, or bytes whose sha256 differs from the manifest's.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise incomplete_store_error(self.path)
        try:
            self.manifest = json.loads(mf.read_text())
            shards = self.manifest["shards"]
            self.documents = int(self.manifest["documents"])
            self.tokens = int(self.manifest["tokens"])
            self.vocab_size = int(self.manifest["vocab_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{mf}: not a token store manifest ({type(e).__name__}: {e}); "
                             f"{rebuild_hint(self.path)}") from None
        self._tok_start = np.concatenate([[0], np.cumsum([s["tokens"] for s in shards])]).astype(np.int64)
        self._doc_start = np.concatenate([[0], np.cumsum([s["documents"] for s in shards])]).astype(np.int64)
        self._ids: list = [None] * len(shards)
        self._offsets: list = [None] * len(shards)
        try:  # the folder's mtime is its last use (llmlab cache prunes stores unused for long)
            os.utime(self.path)
        except OSError:  # a read-only store root
            pass

    @staticmethod
    def is_complete(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a complete store."""
        return (Path(path) / "manifest.json").is_file()

    def _damaged(self, file: str, what: str) -> StoreError:
        return damaged_store_error(self.path, self.manifest, file, what)

    def _shard(self, i: int):
        """Shard ``i``'s (ids, offsets) memmaps, checked on their first read (see the class doc)."""
        if self._ids[i] is None:
            ids, offsets = self._map(i)
            self._check(i, ids, force=False)
            self._ids[i], self._offsets[i] = ids, offsets
        return self._ids[i], self._offsets[i]

    def _map(self, i: int):
        """Memory-map shard ``i``'s two files and check their lengths against the manifest."""
        s = self.manifest["shards"][i]
        arrays = []
        for f in (s["tokens_file"], s["offsets_file"]):
            try:
                arrays.append(np.load(self.path / f, mmap_mode="r"))
            except FileNotFoundError:
                raise self._damaged(f, "shard file missing") from None
            except (ValueError, EOFError, OSError) as e:  # empty, truncated, or an overwritten header
                raise self._damaged(f, f"not a readable shard (empty or truncated: {e})") from None
        ids, offsets = arrays
        if ids.shape != (s["tokens"],) or offsets.shape != (s["documents"] + 1,):
            raise self._damaged(s["tokens_file"], "holds a different number of tokens or documents than "
                                "manifest.json says")
        return ids, offsets

    def _check(self, i: int, ids: np.ndarray, force: bool) -> None:
        """Check shard ``i``'s content (``ids``: its mapped tokens): :func:`check_shard_content`."""
        check_shard_content(self.path, self.manifest["shards"][i], self._files(i), {"tokens": ids}, self.vocab_size,
                            self._damaged, force)

    def _files(self, i: int) -> dict[str, Path]:
        """Shard ``i``'s files by key (``tokens``, ``offsets``)."""
        s = self.manifest["shards"][i]
        return {k: self.path / s[f"{k}_file"] for k in ("tokens", "offsets")}

    def window(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the store's stream (documents in order, each ending with EOS),
        read from the memmaps: int64 [stop - start].

        Raises:
            IndexError: the range leaves ``[0, tokens]``.
        """
        if not 0 <= start <= stop <= self.tokens:
            raise IndexError(f"token window [{start}, {stop}) outside [0, {self.tokens}]")
        out = np.empty(stop - start, dtype=np.int64)
        i = int(np.searchsorted(self._tok_start, start, side="right")) - 1
        pos = start
        while pos < stop:
            ids, _ = self._shard(i)
            lo = pos - int(self._tok_start[i])
            n = min(stop - pos, ids.shape[0] - lo)
            out[pos - start: pos - start + n] = ids[lo: lo + n]
            pos += n
            i += 1
        return out

    def document(self, d: int) -> np.ndarray:
        """Document ``d`` (with its EOS): int64 [length]."""
        if not 0 <= d < self.documents:
            raise IndexError(f"document {d} outside [0, {self.documents})")
        i = int(np.searchsorted(self._doc_start, d, side="right")) - 1
        ids, offsets = self._shard(i)
        k = d - int(self._doc_start[i])
        return np.asarray(ids[int(offsets[k]): int(offsets[k + 1])], dtype=np.int64)

    def check(self) -> None:
        """Check every shard as its first read does (cheap for shards a record vouches for).

        Raises:
            StoreError: as the class says, for the first damaged shard.
        """
        for i in range(len(self._ids)):
            self._shard(i)

    def verify(self) -> None:
        """Check every shard's sizes, ids and sha256s, whatever its verification record says
        (``llmlab prepare --verify``), and record the result.

        Raises:
            StoreError: naming the first file whose bytes differ (``sha256 differs``) or that is
                damaged otherwise.
        """
        for i in range(len(self._ids)):
            ids, _ = self._map(i)
            self._check(i, ids, force=True)


# -- writing -------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


@dataclass(eq=False)  # hashable by identity: encode_flat keeps one piece cache per tokenizer
class _RustTokenizer:
    """What a tokenising worker needs of a tokenizer: the Rust ``tokenizers.Tokenizer`` and the
    EOS token. Picklable and free of transformers/torch, so a spawned worker starts small."""

    backend_tokenizer: Any
    eos_token: str
    eos_token_id: int


def _worker_tokenizer(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: the worker gets it whole
        return tokenizer
    return _RustTokenizer(backend, tokenizer.eos_token, tokenizer.eos_token_id)


def _init_worker(tokenizer, parent: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER["tokenizer"] = tokenizer
    die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """End this process (a pool worker) as soon as its parent, pid ``parent``, ends, even by
    SIGKILL, which gives the parent no chance to stop its workers (a killed ``llmlab prepare``
    left them alive, blocked on their task queue for ever).

    On Linux the kernel sends this process SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
    everywhere a daemon thread also polls ``os.getppid()`` every 0.5 s (a dead parent's children are
    re-parented) and exits. A parent already gone when this runs ends the process at once.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl in this libc: the thread below does it
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="llmlab-parent-watch", daemon=True).start()


def _write_shard(folder: str, index: int, texts: list[str], eos_id: int, dtype: str,
                 tokenizer=None) -> dict:
    """Tokenise one shard and write it atomically (tmp files renamed, its JSON last)."""
    from llmlab.data.fastencode import encode_flat

    tok = tokenizer if tokenizer is not None else _WORKER["tokenizer"]
    ids, offsets = encode_flat(tok, texts, eos_id)
    folder_p = Path(folder)
    stem = f"shard-{index:05d}"
    meta = {"index": index, "documents": len(texts), "tokens": int(ids.size),
            "max_id": int(ids.max()) if ids.size else -1,  # checked against the vocabulary on reading
            "text_bytes": int(sum(len(t.encode()) for t in texts)),
            "tokens_file": f"{stem}.tokens.npy", "offsets_file": f"{stem}.offsets.npy"}
    for kind, arr in (("tokens", ids.astype(dtype)), ("offsets", offsets.astype(np.int64))):
        final = folder_p / meta[f"{kind}_file"]
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
            fh.flush()
            os.fsync(fh.fileno())
        meta[f"{kind}_sha256"] = sha256_file(tmp)
        os.replace(tmp, final)
    _write_json(folder_p / f"{stem}.json", meta)
    return meta


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def shard_texts(rows: Iterable[str], shard_bytes: int = SHARD_TEXT_BYTES) -> Iterator[list[str]]:
    """Cut a stream of documents into shards of at least ``shard_bytes`` UTF-8 bytes (the last may
    be smaller): a pure function of the documents, so a resumed prepare cuts the same shards."""
    buf: list[str] = []
    size = 0
    for t in rows:
        buf.append(t)
        size += len(t.encode())
        if size >= shard_bytes:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


@dataclass
class _Progress:
    """Documents / tokens done, for the progress bar."""

    bar: Any = None
    task: Any = None
    docs: int = 0
    tokens: int = 0
    t0: float = 0.0

    def advance(self, meta: dict) -> None:
        self.docs += meta["documents"]
        self.tokens += meta["tokens"]
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=self.docs, tokens=f"{self.tokens:,}",
                            rate=f"{rate / 1e6:.2f} M tok/s")


def _progress_bar(label: str, total: int | None):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("docs · {task.fields[tokens]} tokens · {task.fields[rate]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    task = bar.add_task(label, total=total, tokens="0", rate="-")
    return bar, task


def build_store(path: str | os.PathLike, texts: Iterable[str], tokenizer, *, info: dict | None = None,
                processes: int | None = None, max_tokens: int | None = None,
                total_documents: int | None = None, progress: bool = False, label: str = "tokenising",
                shard_bytes: int = SHARD_TEXT_BYTES) -> TokenStore:
    """Tokenise ``texts`` into a store at ``path`` (resuming a ``<path>.partial`` left by a kill).

    Args:
        path: the store folder (``store_path``); nothing is done when it is already complete.
        texts: the documents, in order (any iterable: a list, a column iterator, a stream).
        tokenizer: a fast tokenizer with an EOS token (appended to every document).
        info: extra manifest fields (source fingerprint, dataset name, rows dropped at load, ...).
        processes: tokenising processes (default: all cores); 1 tokenises in this process.
        max_tokens: stop after the first documents holding at least this many tokens.
        total_documents: the number of documents, for the progress bar's ETA (None: unknown).
        progress: draw a rich progress bar (documents, tokens, tokens/s, ETA).

    Returns:
        the complete :class:`TokenStore`; one just written has had every shard checked
        (:meth:`TokenStore.check`), which leaves the verification records later readers trust.

    Concurrent writers of one store (another node's ranks, another run sharing the store root)
    are serialised by an ``flock`` on ``<path>.lock``: the second waits, then opens the complete
    store.

    Raises:
        ValueError: the tokenizer has no EOS token.
        StoreError: ``path`` exists without ``manifest.json`` (:func:`incomplete_store_error`: it is
            named with the command that deletes it, never tokenised again over or deleted).
        OSError: ENOSPC when the disk filled up, naming it and its free MiB; the partial ``*.tmp``
            files are removed, the finished shards kept for the same command to resume.
    """
    path = Path(path)
    if TokenStore.is_complete(path):
        return TokenStore(path)
    from llmlab.runguard import file_lock

    # one writer per store: ranks of another node, or another run sharing the store root, wait
    # here and then find it complete (two writers would write the same *.tmp files)
    with file_lock(path.with_name(path.name + ".lock"), wait=True,
                   on_busy=lambda who: log.warning("token store %s is being written by %s; waiting for it",
                                                   path, who)):
        if TokenStore.is_complete(path):
            return TokenStore(path)
        if path.exists() or path.is_symlink():  # a store folder that lost its manifest: never rebuilt over
            raise incomplete_store_error(path)
        return _build_store_locked(path, texts, tokenizer, info=info, processes=processes,
                                   max_tokens=max_tokens, total_documents=total_documents,
                                   progress=progress, label=label, shard_bytes=shard_bytes)


def _build_store_locked(path: Path, texts: Iterable[str], tokenizer, *, info: dict | None, processes: int | None,
                        max_tokens: int | None, total_documents: int | None, progress: bool, label: str,
                        shard_bytes: int) -> TokenStore:
    """:func:`build_store`'s work, under the store's lock."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the token store needs a tokenizer with an eos token")
    vocab = len(tokenizer)
    dtype = "uint16" if vocab <= 65536 else "uint32"
    part = path.with_name(path.name + ".partial")
    from llmlab.ownership import legacy_store, make_dir, mark, owns

    if part.is_dir() and not owns(part) and legacy_store(part):  # left by an llmlab without markers
        mark(part, "token-store")
    make_dir(part, "token-store")  # the marker that lets `llmlab cache --prune` delete it
    done = {}
    for f in part.glob("shard-*.json"):  # shard-NNNNN.json: a finished shard's meta
        meta = json.loads(f.read_text())
        if all((part / meta[k]).is_file() for k in ("tokens_file", "offsets_file")):
            done[int(meta["index"])] = meta
    processes = max(1, int(processes or os.cpu_count() or 1))
    prog = _Progress(t0=time.perf_counter())
    bar = None
    if progress:
        bar, prog.task = _progress_bar(label, total_documents)
        prog.bar = bar
        bar.start()
    try:
        with _full_disk_named(part, path):
            metas = _run_shards(part, shard_texts(texts, shard_bytes), tokenizer, eos, dtype, done,
                                processes, max_tokens, prog)
    finally:
        if bar is not None:
            bar.stop()
    manifest = {"version": STORE_VERSION, "tokenizer_sha256": tokenizer_sha256(tokenizer),
                "vocab_size": vocab, "dtype": dtype, "eos_id": int(eos),
                "documents": int(sum(m["documents"] for m in metas)),
                "tokens": int(sum(m["tokens"] for m in metas)),
                "text_bytes": int(sum(m.get("text_bytes") or 0 for m in metas)),
                "max_tokens": max_tokens, "shards": metas, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **(info or {})}
    for f in part.glob("shard-*"):  # shards past a max_tokens bound, written by workers ahead
        if f.name.split(".")[0] not in {m["tokens_file"].split(".")[0] for m in metas}:
            f.unlink()
    with _full_disk_named(part, path):
        _write_json(part / "manifest.json", manifest)
    if path.exists():  # a concurrent prepare finished first
        from llmlab.ownership import try_remove_owned

        try_remove_owned(part)
    else:
        os.replace(part, path)
    log.info("token store %s: %d documents, %d tokens", path, manifest["documents"], manifest["tokens"])
    return checked_when_settled(TokenStore(path))


def checked_when_settled(store):
    """Check a store just written (a :class:`TokenStore` or a
    :class:`llmlab.data.chat_store.ChatStore`: its ``check()``, 0.7 s per GB of shards, against
    minutes of tokenising), once its files are old enough for the verification records written by
    the check to be trusted (:func:`_margin_ns`: 20 ms here, 2 s on FAT or HFS+), so no reader
    hashes them again."""
    stats = [_file_stat(f) for i in range(len(store.manifest["shards"])) for f in store._files(i).values()]
    if stats:
        wait_ns = max(max(st[1], st[2]) for st in stats) + _margin_ns(stats) - time.time_ns()
        if wait_ns > 0:
            time.sleep(min(wait_ns, COARSE_TICK_MARGIN_NS) / 1e9)
    store.check()
    return store


@contextmanager
def _full_disk_named(part: Path, path: Path):
    """Turn a full disk's OSError while writing the store ``path`` (in its folder ``part``) into
    :func:`llmlab.ownership.disk_full_error`'s, which names the disk and its free MiB, and remove
    the partial ``*.tmp`` files at once (finished shards stay: the same command resumes)."""
    from llmlab.ownership import KIND_FILES, disk_full_error

    try:
        yield
    except OSError as exc:
        full = disk_full_error(exc, part, f"writing the token store {path}")
        if full is None:
            raise
        for f in part.glob("*.tmp"):
            if KIND_FILES["token-store"].fullmatch(f.name):
                f.unlink(missing_ok=True)
        raise full from exc


def _run_shards(part: Path, shards: Iterator[list[str]], tokenizer, eos: int, dtype: str, done: dict,
                processes: int, max_tokens: int | None, prog: _Progress) -> list[dict]:
    """Write the missing shards (in a pool of ``processes`` when > 1, shard 0 in this process while
    the pool's workers start); returns the metas in order, the shard crossing ``max_tokens``
    truncated and those after it left out."""
    pool = None
    pending: dict[int, Future | dict] = {}
    metas: list[dict] = []
    total = 0
    nxt = 0  # next shard index whose result is awaited

    def collect(block: bool) -> bool:
        """Take finished shards in order; True once max_tokens is reached."""
        nonlocal nxt, total
        while nxt in pending:
            r = pending[nxt]
            if isinstance(r, Future):
                if not block and not r.done():
                    return False
                r = r.result()
            del pending[nxt]
            if max_tokens is not None and total + r["tokens"] >= max_tokens:
                r = _truncate_shard(part, r, max_tokens - total)
                metas.append(r)
                prog.advance(r)
                return True
            metas.append(r)
            total += r["tokens"]
            prog.advance(r)
            nxt += 1
        return False

    try:
        head = list(itertools.islice(shards, 2))
        if len(head) == 2 and processes > 1:  # two shards or more: a pool (one stays in-process)
            import multiprocessing as mp

            # spawned, not forked: a fork of a process holding torch and a model would share (then
            # copy, page by page, as Python touches its objects) hundreds of MB per worker
            pool = ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                       initargs=(_worker_tokenizer(tokenizer), os.getpid()))
        first = None  # with a pool, shard 0 is tokenised here while the workers start
        for i, texts in enumerate(itertools.chain(head, shards)):
            if i in done:
                pending[i] = done[i]
            elif pool is None:
                pending[i] = _write_shard(str(part), i, texts, eos, dtype, tokenizer)
            elif i == 0:
                first = texts
                continue
            else:
                pending[i] = pool.submit(_write_shard, str(part), i, texts, eos, dtype)
            if first is not None:  # shard 1 is on its way to a worker: do shard 0 meanwhile
                pending[0] = _write_shard(str(part), 0, first, eos, dtype, tokenizer)
                first = None
            if collect(block=len(pending) >= 2 * processes):
                return metas
        while pending:
            if collect(block=True):
                return metas
        return metas
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _truncate_shard(part: Path, meta: dict, budget: int) -> dict:
    """Keep the first documents of a shard that hold at least ``budget`` tokens; rewrite it."""
    offsets = np.load(part / meta["offsets_file"])
    keep = int(np.searchsorted(offsets[1:], budget, side="left")) + 1
    keep = min(keep, meta["documents"])
    if keep == meta["documents"]:
        return meta
    ids = np.load(part / meta["tokens_file"], mmap_mode="r")[: offsets[keep]]
    new = dict(meta, documents=keep, tokens=int(offsets[keep]), text_bytes=0,
               max_id=int(ids.max()) if ids.size else -1)
    for kind, arr in (("tokens", np.array(ids)), ("offsets", offsets[: keep + 1])):
        final = part / meta[f"{kind}_file"]
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
        new[f"{kind}_sha256"] = sha256_file(tmp)
        os.replace(tmp, final)
    _write_json(part / f"shard-{meta['index']:05d}.json", new)
    return new


# -- datasets -> stores --------------------------------------------------------------------------

def _text_rows(splits, split: str, name: str):
    """The canonical text rows of ``split``; conversations etc. are turned into text first."""
    from llmlab.data.formats import convert_kind

    rows = splits.train if split == "train" else splits.eval
    if splits.kind != "text":
        try:
            rows = rows.map(lambda r: convert_kind(r, splits.kind, "text"), remove_columns=rows.column_names,
                            load_from_cache_file=False)
        except ValueError as e:
            raise ValueError(f"datasets.{name}: {e} (stage type pretrain)") from None
    return rows


def iter_column(ds, column: str, batch_size: int = 4096) -> Iterator[str]:
    """The values of ``column`` of a ``datasets.Dataset`` (or IterableDataset), streamed in batches."""
    for batch in ds.iter(batch_size=batch_size):
        yield from batch[column]


def streamable(spec: dict) -> bool:
    """Whether a dataset (``spec``: its section) is read as a stream (:func:`stream_texts`) rather
    than loaded whole (:attr:`llmlab.data.source.DatasetSource.streamable`)."""
    from llmlab.data.source import dataset_source

    return dataset_source("", spec).streamable


def ensure_text_store(recipe: dict, name: str, split: str, tokenizer, *, processes: int | None = None,
                      progress: bool = False) -> TokenStore:
    """The store of ``split`` (train | eval) of text dataset ``name``: opened when complete, else
    read (streamed when the source is :attr:`~llmlab.data.source.DatasetSource.streamable`, else
    :func:`llmlab.data.sources.load_named_dataset`) and tokenised into it.

    Raises:
        ValueError / KeyError: from loading the dataset (bad rows, missing files, wrong kind).
    """
    from llmlab.data.sources import load_named_dataset, recipe_source

    src = recipe_source(recipe, name)
    src_fp = src.identity(int(top_level(recipe, "seed")))
    path = store_root(recipe) / store_key(tokenizer_sha256(tokenizer), src_fp, split)
    if TokenStore.is_complete(path):
        return TokenStore(path)
    info: dict[str, Any] = {"dataset": name, "split": split, "source": src_fp}
    if src.streamable:
        return build_store(path, stream_texts(recipe, name, info, split), tokenizer, info=info,
                           processes=processes, max_tokens=src.max_tokens, progress=progress,
                           label=f"{name} (stream)")
    splits = load_named_dataset(recipe, name)
    rows = _text_rows(splits, split, name)
    info.update(rows_read=splits.num_raw, bad_rows=splits.num_bad, dropped=splits.dropped,
                first_bad_rows=[[str(r), p] for r, p in splits.bad_rows])
    return build_store(path, iter_column(rows, "text"), tokenizer, info=info, processes=processes,
                       max_tokens=src.max_tokens, total_documents=getattr(rows, "num_rows", None),
                       progress=progress, label=f"{name} ({split})")


def stream_texts(recipe: dict, name: str, info: dict, split: str = "train") -> Iterator[str]:
    """The canonical text of dataset ``name``'s ``split``, row by row, never holding the rows: the
    rows of :func:`llmlab.data.sources.stream_rows` (the loaded dataset's rules: renames,
    normalisation and bad rows, filters, the hash split), conversations etc. converted to text.
    Fills ``info`` with ``rows_read``, ``bad_rows``, ``dropped`` and ``first_bad_rows`` once the
    stream ends.

    Raises:
        ValueError: MinHash dedup on a stream (it needs the whole dataset), a format that cannot
            become text, or more than ``max_bad_fraction`` bad rows.
        llmlab.data.sources.HubUnreachableError: a hub dataset that cannot be had.
    """
    from llmlab.data.formats import convert_kind
    from llmlab.data.sources import cache_dir, recipe_source, stream_rows

    src = recipe_source(recipe, name)
    for row, kind in stream_rows(src, int(top_level(recipe, "seed")), cache_dir(recipe), split, info):
        yield (row if kind == "text" else convert_kind(row, kind, "text"))["text"]
