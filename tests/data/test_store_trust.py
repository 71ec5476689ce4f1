"""A token store is never trusted blindly (issue 26 item 4): damaged shards, ids outside the
vocabulary and a folder without its manifest stop every reader with an error naming the store, the
file and the commands that delete and rebuild it; `llmlab prepare` holds the run lock; a killed
prepare leaves no process behind. Real files, real damage, real SIGKILLs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llmlab.data import store as S
from llmlab.data.sources import kjv_chapters
from tests.tiny import TINY, write_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chapters():
    return [r["text"] for r in kjv_chapters()[:120]]


@pytest.fixture
def store(tmp_path, tokenizer, chapters):
    """A fresh store of 3+ shards (every shard checked once by its writer)."""
    st = S.build_store(tmp_path / "s", chapters, tokenizer, processes=1, shard_bytes=150_000)
    assert len(st.manifest["shards"]) >= 3
    return st


def _data(path: Path) -> np.ndarray:
    """The array of a .npy file, writable in place (same file, same size)."""
    return np.load(path, mmap_mode="r+")


def _flip_low_bit(path: Path) -> None:
    a = _data(path)
    a[a.size // 2] ^= 1  # one bit of one id: still inside the vocabulary, only the sha256 can tell
    a.flush()


def _overwrite_ids(path: Path) -> None:
    a = _data(path)
    a[:] = 5  # every id overwritten, same size, valid ids
    a.flush()


def _id_outside_vocab(path: Path) -> None:
    a = _data(path)
    a[3] = 1024 + 7  # the fixture tokenizer has 1,024 ids
    a.flush()


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _header_only(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(128)


DAMAGE = {  # what, file, what the error says
    "one flipped bit": (_flip_low_bit, "tokens", "sha256 differs from manifest.json"),
    "every id overwritten": (_overwrite_ids, "tokens", "sha256 differs from manifest.json"),
    "id outside the vocabulary": (_id_outside_vocab, "tokens", "holds token id 1031, outside the tokenizer's vocabulary of 1024"),
    "truncated shard": (_truncate, "tokens", "not a readable shard"),
    "empty offsets": (_empty, "offsets", "not a readable shard"),
    "short offsets": (_header_only, "offsets", "not a readable shard"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_shard_stops_its_first_read_naming_store_file_and_commands(store, damage, monkeypatch):
    fn, kind, said = DAMAGE[damage]
    shard = store.manifest["shards"][1]
    fn(store.path / shard[f"{kind}_file"])
    monkeypatch.setattr(sys, "argv", ["llmlab", "run", "recipes/mine.yaml"])
    st = S.TokenStore(store.path)
    first = st.manifest["shards"][0]["tokens"]
    assert np.array_equal(st.window(0, 10), store.window(0, 10))  # shard 0 is sound and read
    with pytest.raises(S.StoreError) as info:
        st.window(first, first + 10)  # the first read of shard 1
    msg = str(info.value)
    assert msg.startswith(f"{store.path / shard[kind + '_file']}: ") and said in msg, msg
    assert f"The token store {store.path} cannot be used" in msg
    assert f"`rm -r {store.path}`" in msg and "`llmlab prepare recipes/mine.yaml`" in msg
    with pytest.raises(S.StoreError, match="cannot be used"):  # every later read too, and the whole check
        st.window(first, first + 10)
    with pytest.raises(S.StoreError, match="cannot be used"):
        S.TokenStore(store.path).check()
    with pytest.raises(S.StoreError, match="cannot be used"):
        S.TokenStore(store.path).verify()


def _no_hashing(*a, **k):
    raise AssertionError("hashed again")


def test_a_checked_shard_is_trusted_by_a_stat_until_its_file_changes(store, monkeypatch):
    """The writer's check leaves a record per shard; a later process only stats the files. Bytes
    changed in place with the old mtime put back are still caught (the inode's change time moved)."""
    records = sorted(p.name for p in store.path.glob("shard-*.verified"))
    assert records == [f"shard-{i:05d}.verified" for i in range(len(store.manifest["shards"]))]
    monkeypatch.setattr(S, "sha256_mapped", _no_hashing)
    S.TokenStore(store.path).check()  # trusted: no hash
    tokens = store.path / store.manifest["shards"][2]["tokens_file"]
    before = tokens.stat()
    _flip_low_bit(tokens)
    os.utime(tokens, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime, same inode
    assert (tokens.stat().st_size, tokens.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    monkeypatch.undo()
    with pytest.raises(S.StoreError, match="sha256 differs"):
        S.TokenStore(store.path).check()
    _flip_low_bit(tokens)  # the bytes as written again: checked once more, then trusted
    time.sleep(0.05)  # past the file system's clock tick (S.FINE_TICK_MARGIN_NS)
    S.TokenStore(store.path).check()
    monkeypatch.setattr(S, "sha256_mapped", _no_hashing)
    S.TokenStore(store.path).check()


def test_a_record_of_another_build_or_too_close_to_a_change_is_not_trusted(store):
    rec_path = store.path / "shard-00000.verified"
    rec = json.loads(rec_path.read_text())
    s0 = store.manifest["shards"][0]
    stats = {k: S._file_stat(store.path / s0[f"{k}_file"]) for k in ("tokens", "offsets")}
    assert S._trusted_record(store.path, s0, stats) is not None
    assert S._trusted_record(store.path, dict(s0, tokens_sha256="0" * 64), stats) is None
    last = max(max(s[1], s[2]) for s in stats.values())
    rec_path.write_text(json.dumps(dict(rec, checked_ns=last + S.FINE_TICK_MARGIN_NS // 2)))
    assert S._trusted_record(store.path, s0, stats) is None  # checked within a clock tick of a change
    coarse = {k: [v[0], 10**18, 10**18, v[3]] for k, v in stats.items()}  # whole seconds: FAT, HFS+
    assert S._margin_ns(coarse.values()) == S.COARSE_TICK_MARGIN_NS


def test_a_store_folder_without_manifest_is_named_never_tokenised_over_nor_deleted(store, tokenizer, chapters):
    from llmlab.data.store_admin import list_stores

    (store.path / "manifest.json").unlink()
    files = sorted(p.name for p in store.path.iterdir())

    def never(*a):
        raise AssertionError("tokenised again")
        yield  # pragma: no cover

    for attempt in (lambda: S.build_store(store.path, never(), tokenizer, processes=1),
                    lambda: S.TokenStore(store.path)):
        with pytest.raises(S.StoreError) as info:
            attempt()
        msg = str(info.value)
        assert msg.startswith(f"{store.path}: a token store folder without manifest.json") and \
            f"`rm -r {store.path}`" in msg and "llmlab prepare" in msg, msg
    assert sorted(p.name for p in store.path.iterdir()) == files  # nothing deleted or written
    assert not store.path.with_name("s.partial").exists()
    (entry,) = [e for e in list_stores(store.path.parent) if e.path == store.path]
    assert not entry.complete  # `llmlab cache` lists it (and may prune it), not as a foreign folder


def test_max_id_is_recorded_at_write_time(store, tokenizer, chapters):
    for s in store.manifest["shards"]:
        ids = np.load(store.path / s["tokens_file"])
        assert s["max_id"] == int(ids.max()) < len(tokenizer)


# -- the commands -------------------------------------------------------------------------------

PRETRAIN = {**TINY, "stages": {"pretrain": {**TINY["stages"]["pretrain"], "max_steps": 2, "eval_every": 2,
                                            "save_every": 2}}}


def test_llmlab_run_and_prepare_stop_on_a_damaged_store(tmp_path, capsys, monkeypatch):
    """Every id of the training shard overwritten (same size), then one flipped bit: `llmlab
    prepare` and `llmlab run` stop with the store, the shard and the commands; removing the folder
    as told and preparing again gives a store that runs."""
    import shutil

    from llmlab.commands.data import prepare_command
    from llmlab.commands.run import run_command

    recipe = write_recipe(tmp_path, PRETRAIN)
    monkeypatch.setattr(sys, "argv", ["llmlab", "run", str(recipe)])
    assert prepare_command(recipe) == 0
    (train,) = [S.TokenStore(p.parent) for p in (tmp_path / "run" / "cache" / "tokens").glob("*/manifest.json")
                if json.loads(p.read_text())["split"] == "train"]
    shard = train.path / train.manifest["shards"][0]["tokens_file"]
    good = shard.read_bytes()
    for damage in (_overwrite_ids, _flip_low_bit):
        shard.write_bytes(good)
        damage(shard)
        for command in (lambda: prepare_command(recipe), lambda: run_command(recipe)):
            capsys.readouterr()
            assert command() == 1
            said = " ".join(capsys.readouterr().out.split())
            assert f"{shard}: sha256 differs" in said and f"rm -r {train.path}" in said, said
            assert f"llmlab prepare {recipe}" in said
        assert not (tmp_path / "run" / "pretrain" / "stage.json").exists() or \
            json.loads((tmp_path / "run" / "pretrain" / "stage.json").read_text())["status"] != "done"
    shutil.rmtree(train.path)  # as the error says
    assert prepare_command(recipe) == 0 and run_command(recipe) == 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmlab", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "LLMLAB_TOKEN_STORE": ""}


def test_prepare_holds_the_run_lock(tmp_path, capsys):
    """Beside a live run (its lock held) prepare refuses at once, naming the holder, and writes
    nothing; two prepares started together on a fresh folder never crash on the tokenizer."""
    from llmlab.commands.data import prepare_command
    from llmlab.runguard import run_lock

    recipe = write_recipe(tmp_path, PRETRAIN)
    out = tmp_path / "run"
    with run_lock(out):
        assert prepare_command(recipe) == 1
    said = " ".join(capsys.readouterr().out.split())
    assert "in use by another llmlab run" in said and f"pid {os.getpid()}" in said, said
    assert sorted(p.name for p in out.iterdir()) == [".llmlab.lock"]
    procs = [subprocess.Popen(_cli("prepare", str(recipe)), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 1]), outs
    for p, o in zip(procs, outs):
        assert "Traceback" not in o and "Errno" not in o, o
        if p.returncode == 1:
            assert "in use by another llmlab run" in o and "prepare" in o, o
    assert (out / "tokenizer" / "tokenizer.json").is_file() and not (out / ".tokenizer.tmp").exists()


def _cmdline(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # ended meanwhile
        return ""


def test_a_sigkilled_prepare_leaves_no_process_behind(tmp_path):
    """`llmlab prepare --processes 2` on a corpus of several 8 MB shards, SIGKILLed while its pool
    tokenises: every process it started (workers, multiprocessing's resource tracker) ends."""
    import psutil

    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": r["text"]}) + "\n" for r in kjv_chapters()]
    with open(corpus, "w") as f:
        while f.tell() < 40 << 20:
            f.writelines(lines)
    rec = {**PRETRAIN, "datasets": {**TINY["datasets"], "corpus": {"path": str(corpus), "format": "text"}}}
    rec["stages"] = {"pretrain": {**PRETRAIN["stages"]["pretrain"], "datasets": {"corpus": 1.0}}}
    recipe = write_recipe(tmp_path, rec)
    proc = subprocess.Popen(_cli("prepare", str(recipe), "--processes", "2"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list = []
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.time() + 240
        while sum("spawn_main" in _cmdline(c) for c in children) < 2:  # the pool is tokenising
            assert proc.poll() is None and time.time() < deadline, "prepare ended before its pool started"
            time.sleep(0.05)
            children = parent.children(recursive=True)
        time.sleep(0.5)
        children = parent.children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, [(p.pid, _cmdline(p)[:120]) for p in alive]
    finally:  # whatever happened, end what this test started (by pid)
        for c in children:
            try:
                c.kill()
            except psutil.Error:
                pass
        if proc.poll() is None:
            proc.kill()
