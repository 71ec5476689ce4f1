"""What a token-store root holds, and pruning it (``llmlab cache``).

Stores are content-addressed (:mod:`llmlab.data.store`), so a changed tokenizer or edited data
leaves the old store behind rather than overwriting it; at corpus scale (2 bytes per token: 2 GB
per billion tokens) a shared root fills a disk. Each store's folder modification time is its
*last use* (:class:`~llmlab.data.store.TokenStore` touches it when it opens the store), and a
prune removes stores unused for a number of days, never one a given recipe still reads and never
a folder another process is writing (its ``<key>.lock`` is held).

Only folders that are token stores are listed or deleted: those carrying llmlab's token-store
marker (:mod:`llmlab.ownership`), and, from an llmlab before markers, those recognised by
:func:`llmlab.ownership.legacy_store` (a 32-hex key name and nothing but store files in them).
Any other folder of a shared root (``photos/``, ``backup.partial/``) is left alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from llmlab.data.store import TokenStore
from llmlab.ownership import legacy_store, mark, owns, remove_owned


@dataclass
class StoreEntry:
    """One folder of a store root.

    Attributes:
        path: the folder (``<key>`` or ``<key>.partial``).
        complete: False for a ``.partial`` folder (a prepare killed or still running) and for a
            store folder that lost its ``manifest.json`` (unusable: :func:`llmlab.data.store.incomplete_store_error`).
        dataset, split: from the manifest (None for an incomplete folder).
        documents, tokens: from the manifest (None for an incomplete folder).
        bytes: size on disk of its files.
        created: the manifest's creation time (ISO 8601 UTC), None for a partial folder.
        last_used: seconds since the epoch the store was last opened (the folder's mtime).
    """

    path: Path
    complete: bool
    dataset: str | None
    split: str | None
    documents: int | None
    tokens: int | None
    bytes: int
    created: str | None
    last_used: float


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def is_store_folder(d: Path) -> bool:
    """Whether the folder ``d`` is a token store (complete or ``.partial``) llmlab wrote."""
    return owns(d, "token-store") or legacy_store(d)


def list_stores(root: str | Path) -> list[StoreEntry]:
    """Every token-store folder under ``root`` (:func:`is_store_folder`), oldest last use first (an
    absent root: none)."""
    root = Path(root)
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.is_symlink() or not d.is_dir() or not is_store_folder(d):
            continue
        if d.name.endswith(".partial") or not TokenStore.is_complete(d):
            out.append(StoreEntry(d, False, None, None, None, None, _size(d), None, d.stat().st_mtime))
        else:
            m = json.loads((d / "manifest.json").read_text())
            out.append(StoreEntry(d, True, m.get("dataset"), m.get("split"), m.get("documents"), m.get("tokens"),
                                  _size(d), m.get("created"), d.stat().st_mtime))
    return sorted(out, key=lambda e: e.last_used)


def recipe_store_keys(recipe: dict) -> set[str]:
    """The store folder names a recipe's pretraining stages read with the run's current tokenizer
    (empty when that tokenizer has not been trained yet)."""
    from llmlab.data.prepare import pretrain_splits
    from llmlab.data.store import store_path, tokenizer_sha256_of_dir

    tok_sha = tokenizer_sha256_of_dir(Path(recipe["output_dir"]) / "tokenizer")
    if not tok_sha:
        return set()
    keys = set()
    for stage, cfg in recipe["stages"].items():
        if cfg["type"] == "pretrain":
            keys |= {store_path(recipe, n, split, tok_sha).name for n, split in pretrain_splits(recipe, stage)}
    return keys


def prune_stores(root: str | Path, unused_days: float, keep: set[str] = frozenset(),
                 dry_run: bool = False) -> list[StoreEntry]:
    """Delete the store folders under ``root`` last used more than ``unused_days`` days ago.

    Args:
        keep: folder names never deleted (:func:`recipe_store_keys`).
        dry_run: only say what would be deleted.

    Returns:
        the entries deleted (or, with ``dry_run``, that would be). A folder whose ``<key>.lock`` is
        held by another process (being written) is skipped; a file llmlab did not write found in
        a store is kept (with the folder), and the store is not counted.
    """
    from llmlab.runguard import RunLockedError, file_lock

    cutoff = time.time() - unused_days * 86400.0
    gone = []
    for e in list_stores(root):
        key = e.path.name.removesuffix(".partial")
        if e.last_used >= cutoff or key in keep:
            continue
        lock = e.path.with_name(key + ".lock")
        try:
            with file_lock(lock, wait=False):
                # the (empty) lock file stays: a waiter may hold its inode
                if not dry_run and not owns(e.path):  # an llmlab before markers wrote it
                    mark(e.path, "token-store")
                if not dry_run and remove_owned(e.path):
                    continue
        except RunLockedError:
            continue
        gone.append(e)
    return gone
