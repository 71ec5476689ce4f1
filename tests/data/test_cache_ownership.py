"""``llmlab cache --prune`` deletes token stores only (issue 24 item 3): a shared root's other
folders, even one holding a ``manifest.json`` or named ``*.partial``, are left alone."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from llmlab.data import store as S
from llmlab.ownership import MARKER, owns


def _age(root: Path, days: float) -> None:
    t = time.time() - days * 86400
    for d in root.iterdir():
        os.utime(d, (t, t))


def test_prune_takes_stores_and_leaves_everything_else(tmp_path, tokenizer, capsys):
    from llmlab.cache import cache_command
    from llmlab.data.store_admin import list_stores

    root = tmp_path / "shared"
    texts = [f"document number {i}." for i in range(40)]
    new = S.build_store(root / ("1" * 32), texts, tokenizer, processes=1).path
    assert owns(new, "token-store")
    legacy = root / ("2" * 32)  # written by an llmlab before markers
    shutil.copytree(new, legacy)
    (legacy / MARKER).unlink()
    legacy_partial = root / ("3" * 32 + ".partial")
    legacy_partial.mkdir()
    shutil.copy(new / "shard-00000.tokens.npy", legacy_partial)
    photos = root / "photos"
    photos.mkdir()
    (photos / "manifest.json").write_text(json.dumps({"album": "summer"}))
    (photos / "beach.jpg").write_bytes(b"jpg")
    backup = root / "backup.partial"
    backup.mkdir()
    (backup / "thesis.tex").write_text("years of work")
    lookalike = root / ("4" * 32)  # a store's name and manifest, but a file no store writes
    shutil.copytree(new, lookalike)
    (lookalike / MARKER).unlink()
    (lookalike / "notes.txt").write_text("mine")
    mine = root / ("5" * 32)  # llmlab's store into which a user put a file
    shutil.copytree(new, mine)
    (mine / "notes.txt").write_text("mine")
    _age(root, 40)

    assert {e.path.name for e in list_stores(root)} == {new.name, legacy.name, legacy_partial.name, mine.name}
    assert cache_command(root, prune=True, unused_days=30) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "deleted 3 folders" in said and "photos" in said and "are not token stores" in said, said
    assert not new.exists() and not legacy.exists() and not legacy_partial.exists()
    assert (photos / "manifest.json").is_file() and (photos / "beach.jpg").read_bytes() == b"jpg"
    assert (backup / "thesis.tex").read_text() == "years of work"
    assert (lookalike / "notes.txt").is_file() and (lookalike / "manifest.json").is_file()
    assert sorted(p.name for p in mine.iterdir()) == [MARKER, "notes.txt"]  # llmlab's files went, the user's stayed
    assert not (root / "photos.lock").exists() and not (root / "backup.lock").exists()


def test_a_partial_store_of_an_older_llmlab_is_resumed(tmp_path, tokenizer):
    texts = [f"document number {i}." for i in range(40)]
    whole = S.build_store(tmp_path / "a" / ("6" * 32), texts, tokenizer, processes=1, shard_bytes=200)
    part = tmp_path / "b" / ("6" * 32 + ".partial")
    shutil.copytree(whole.path, part)
    for f in (MARKER, "manifest.json"):
        (part / f).unlink()
    store = S.build_store(tmp_path / "b" / ("6" * 32), texts, tokenizer, processes=1, shard_bytes=200)
    assert owns(store.path, "token-store") and store.tokens == whole.tokens
