"""The token store: exact ids, atomic resumable shards, parallel = serial, max_tokens, sharing and
moving, streaming, and lazy pretraining batches read from it."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.data import store as S
from llmlab.data.pipeline import build_stage_data
from llmlab.data.sources import kjv_chapters
from tests.data.conftest import make_recipe


@pytest.fixture(scope="module")
def chapters():
    return [r["text"] for r in kjv_chapters()[:300]]


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard-*.npy"))}


def test_ids_are_the_tokenizers_own_with_eos_and_uint16(tmp_path, tokenizer, chapters):
    st = S.build_store(tmp_path / "s", chapters, tokenizer, processes=1, shard_bytes=200_000)
    eos = tokenizer.eos_token_id
    assert st.documents == 300 and len(st.manifest["shards"]) > 3
    assert st.manifest["dtype"] == "uint16" and st.manifest["tokenizer_sha256"] == S.tokenizer_sha256(tokenizer)
    for d in (0, 1, 150, 299):
        want = tokenizer(chapters[d], add_special_tokens=False)["input_ids"] + [eos]
        assert st.document(d).tolist() == want
    # the stream is the documents in order; a window across a shard boundary reads both shards
    first = st.manifest["shards"][0]["tokens"]
    ref = np.concatenate([st.document(d) for d in range(st.documents)])
    assert ref.size == st.tokens
    assert np.array_equal(st.window(first - 5, first + 5), ref[first - 5:first + 5])
    on_disk = sum(p.stat().st_size for p in st.path.glob("shard-*.npy"))
    assert on_disk / st.tokens < 2.1  # uint16 ids + 8 bytes per document
    st.verify()
    np.load(st.path / st.manifest["shards"][1]["tokens_file"], mmap_mode="r+")[0] += 1
    with pytest.raises(S.StoreError, match="sha256 differs"):
        st.verify()


def test_two_processes_write_the_same_bytes_as_one(tmp_path, tokenizer, chapters):
    one = S.build_store(tmp_path / "one", chapters, tokenizer, processes=1, shard_bytes=150_000)
    two = S.build_store(tmp_path / "two", chapters, tokenizer, processes=2, shard_bytes=150_000)
    assert _files(one.path) == _files(two.path) and len(_files(one.path)) > 6


def _slow_texts(texts, marker):
    for i, t in enumerate(texts):
        if i == 120:  # after a few shards are on disk: wait here to be killed
            Path(marker).touch()
            time.sleep(60)
        yield t


def _prepare_then_hang(path, tokenizer, texts, marker):
    S.build_store(path, _slow_texts(texts, marker), tokenizer, processes=1, shard_bytes=150_000)


def test_sigkill_mid_prepare_resumes_at_the_first_missing_shard(tmp_path, tokenizer, chapters):
    path, marker = tmp_path / "s", tmp_path / "marker"
    proc = mp.get_context("fork").Process(target=_prepare_then_hang, args=(path, tokenizer, chapters, marker))
    proc.start()
    for _ in range(600):
        if marker.exists():
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    part = path.with_name("s.partial")
    assert not S.TokenStore.is_complete(path) and part.is_dir()
    done = sorted(p.name for p in part.glob("shard-*.json"))
    assert len(done) >= 2  # ~120 chapters of text at 150 kB per shard
    stamps = {p.name: p.stat().st_mtime_ns for p in part.glob("shard-*.npy") if p.name.split(".")[0] + ".json" in done}
    st = S.build_store(path, chapters, tokenizer, processes=1, shard_bytes=150_000)
    fresh = S.build_store(tmp_path / "fresh", chapters, tokenizer, processes=1, shard_bytes=150_000)
    assert _files(st.path) == _files(fresh.path)
    for name, ns in stamps.items():  # finished shards were kept, not rewritten
        assert (st.path / name).stat().st_mtime_ns == ns
    assert st.manifest["documents"] == 300 and not part.exists()


def test_a_second_writer_waits_for_the_first_then_opens_its_store(tmp_path, tokenizer, chapters, caplog):
    """Two writers of one store (another node's ranks, another run sharing the store root) must
    not write the same *.tmp files at once: the second waits on ``<key>.lock``."""
    import threading

    from llmlab.runguard import file_lock

    path = tmp_path / "s"
    result = {}
    with file_lock(path.with_name("s.lock"), wait=False):  # a writer at work
        second = threading.Thread(target=lambda: result.update(st=S.build_store(
            path, chapters, tokenizer, processes=1, shard_bytes=150_000)))
        with caplog.at_level("WARNING", logger="llmlab.data.store"):
            second.start()
            time.sleep(1.0)
            assert second.is_alive() and not path.with_name("s.partial").exists()  # waiting, writing nothing
            assert f"being written by pid {os.getpid()}" in caplog.text
            # the first writer finishes its store
            first = S._build_store_locked(path, chapters, tokenizer, info=None, processes=1, max_tokens=None,
                                          total_documents=None, progress=False, label="", shard_bytes=150_000)
            stamps = {p.name: p.stat().st_mtime_ns for p in path.glob("shard-*.npy")}
    second.join(timeout=60)
    assert not second.is_alive()
    assert result["st"].manifest == first.manifest  # opened, not written again
    assert {p.name: p.stat().st_mtime_ns for p in path.glob("shard-*.npy")} == stamps
    result["st"].verify()


#: a main script without the ``__main__`` guard: its spawned worker re-runs it while starting up
UNGUARDED_SCRIPT = """
import multiprocessing as mp, sys
from pathlib import Path
from llmlab.runguard import file_lock
with file_lock(Path(sys.argv[1]), wait=True):  # the worker, re-running this line, meets its parent's lock
    worker = mp.get_context("spawn").Process(target=print)
    worker.start()
    worker.join(60)
    if worker.exitcode is None:
        worker.kill()
    print("worker exit code", worker.exitcode)
"""


def test_a_starting_worker_never_waits_for_a_lock_its_parent_holds(tmp_path):
    """A spawned worker that re-runs a main script without the ``__main__`` guard reaches the lock
    its parent holds while the parent waits for it: it stops with the fix instead of waiting forever."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "s.lock")], capture_output=True, text=True,
                         timeout=300)
    assert "worker exit code 1" in res.stdout, res.stdout + res.stderr
    assert "is held by this process's parent" in res.stderr and '__name__ == "__main__"' in res.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_max_tokens_stops_at_the_first_documents_reaching_it(tmp_path, tokenizer, chapters, processes):
    full = S.build_store(tmp_path / "full", chapters, tokenizer, processes=1, shard_bytes=100_000)
    bound = full.tokens // 3 + 7
    st = S.build_store(tmp_path / f"cut{processes}", chapters, tokenizer, processes=processes,
                       max_tokens=bound, shard_bytes=100_000)
    last = st.document(st.documents - 1).size
    assert st.tokens >= bound > st.tokens - last
    assert np.array_equal(st.window(0, st.tokens), full.window(0, st.tokens))
    assert not list(st.path.glob("*.tmp")) and len(list(st.path.glob("shard-*.json"))) == len(st.manifest["shards"])


def _pretrain_recipe(tmp_path, weights=None, **stage):
    rec = make_recipe(tmp_path)
    rec["datasets"]["bible"]["max_samples"] = 300
    rec["stages"]["pretrain"].update(stage)
    if weights:
        rec["stages"]["pretrain"]["datasets"] = weights
    return rec


def test_stores_survive_moving_the_run_dir_and_are_shared(tmp_path, tokenizer, monkeypatch):
    rec = _pretrain_recipe(tmp_path / "a")
    first = build_stage_data(rec, "pretrain", tokenizer)
    before = {i: first.train_batch(i)["input_ids"] for i in (0, 7, 400)}
    run_a = Path(rec["output_dir"])
    shutil.move(str(run_a), str(tmp_path / "moved"))
    rec["output_dir"] = str(tmp_path / "moved")

    def refuse(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(S, "build_store", refuse)
    again = build_stage_data(rec, "pretrain", tokenizer)  # the moved store is found, not rebuilt
    for i, ids in before.items():
        assert torch.equal(ids, again.train_batch(i)["input_ids"])
    # another recipe pointing at the same token_store shares it
    other = _pretrain_recipe(tmp_path / "b")
    other["token_store"] = str(tmp_path / "moved" / "cache" / "tokens")
    build_stage_data(other, "pretrain", tokenizer)


def test_edited_text_file_gets_a_new_store(tmp_path, tokenizer):
    f = tmp_path / "t.jsonl"
    rec = make_recipe(tmp_path)
    rec["datasets"]["loc"] = {"path": str(f)}
    rec["stages"]["pretrain"]["datasets"] = {"loc": 1.0}
    f.write_text("".join(json.dumps({"text": f"first version {i}."}) + "\n" for i in range(50)))
    a = build_stage_data(rec, "pretrain", tokenizer).train_batch(0)["input_ids"]
    os.utime(f, ns=(0, 0))  # same size, another mtime and content
    f.write_text("".join(json.dumps({"text": f"later version {i}."}) + "\n" for i in range(50)))
    b = build_stage_data(rec, "pretrain", tokenizer).train_batch(0)["input_ids"]
    assert "first" in tokenizer.decode(a[0]) and "later" in tokenizer.decode(b[0])


def test_cache_prune_deletes_old_unused_stores_only(tmp_path, tokenizer, capsys):
    """``llmlab cache --prune``: a store left behind by edited data goes once unused for the given
    days; the store the recipe reads now, a recently used one and one being written stay."""
    from llmlab.cache import cache_command
    from llmlab.data.store_admin import list_stores, prune_stores, recipe_store_keys
    from llmlab.runguard import file_lock

    f = tmp_path / "t.jsonl"
    rec = make_recipe(tmp_path)
    rec["datasets"]["loc"] = {"path": str(f)}
    rec["stages"]["pretrain"]["datasets"] = {"loc": 1.0}
    rec["stages"]["pretrain"]["eval_datasets"] = {"loc": 1.0}
    tokenizer.save_pretrained(Path(rec["output_dir"]) / "tokenizer")
    f.write_text("".join(json.dumps({"text": f"first version {i}."}) + "\n" for i in range(50)))
    build_stage_data(rec, "pretrain", tokenizer)
    old = {e.path.name for e in list_stores(S.store_root(rec))}
    os.utime(f, ns=(0, 0))
    f.write_text("".join(json.dumps({"text": f"later version {i}."}) + "\n" for i in range(50)))
    build_stage_data(rec, "pretrain", tokenizer)
    root = S.store_root(rec)
    keep = recipe_store_keys(rec)
    current = {e.path.name for e in list_stores(root)} - old
    assert len(old) == 1 and current == keep  # the edited file's store is the recipe's now
    recent = root / ("f" * 32)  # a store of another recipe, used yesterday
    shutil.copytree(root / next(iter(old)), recent)
    writing = root / ("a" * 32 + ".partial")
    (abandoned := root / ("b" * 32 + ".partial")).mkdir()
    writing.mkdir()
    month_ago = time.time() - 40 * 86400
    for d in root.iterdir():
        os.utime(d, (month_ago, month_ago))
    os.utime(recent, (time.time() - 86400,) * 2)
    with file_lock(root / ("a" * 32 + ".lock"), wait=False):
        would = prune_stores(root, 30, keep=keep, dry_run=True)
        assert {e.path.name for e in would} == old | {abandoned.name} and (root / next(iter(old))).is_dir()
        # given only the folder (no recipe to protect), the command would also take the current store
        assert cache_command(root, prune=True, unused_days=30, dry_run=True) == 0
        said = " ".join(capsys.readouterr().out.split())
        assert "5 folders" in said and "would delete 3 folders unused for more than 30 days" in said
        assert {e.path.name for e in prune_stores(root, 30, keep=keep)} == old | {abandoned.name}
    assert {e.path.name for e in list_stores(root)} == current | {recent.name, writing.name}
    # opening a store marks it used
    st = S.TokenStore(recent)
    assert time.time() - st.path.stat().st_mtime < 60


def _word_file(path: Path, word: str, n: int) -> str:
    path.write_text("".join(json.dumps({"text": f"{word} " * 20 + f"number {i}."}) + "\n" for i in range(n)))
    return str(path)


def test_pretrain_mixture_by_index_follows_the_weights_and_is_pure(tmp_path, tokenizer):
    rec = make_recipe(tmp_path)
    rec["datasets"]["alpha"] = {"path": _word_file(tmp_path / "a.jsonl", "alpha", 200)}
    rec["datasets"]["beta"] = {"path": _word_file(tmp_path / "b.jsonl", "beta", 800)}
    rec["stages"]["pretrain"].update(datasets={"alpha": 2.0, "beta": 1.0}, batch_size=100, max_steps=100)
    data = build_stage_data(rec, "pretrain", tokenizer)
    assert abs(data.shares["alpha"] - 2 / 3) <= 0.015
    n_alpha = data._train.sources[0].num_blocks
    idx = np.concatenate([data.train_indices(i) for i in range(100)])  # 10,000 blocks
    assert abs(float((idx < n_alpha).mean()) - 2 / 3) <= 0.015  # alpha is read ~6 times over
    assert len(np.unique(idx[idx < n_alpha])) == n_alpha  # every block of the smaller source, in epochs
    b = data.train_batch(3)["input_ids"]
    for row, j in zip(b, data.train_indices(3)):  # each block holds the text of its own source
        text = tokenizer.decode(row)
        assert ("alpha" in text, "beta" in text) == ((True, False) if j < n_alpha else (False, True))
    again = build_stage_data(rec, "pretrain", tokenizer)
    for i in (99, 3, 0, 5000):  # any order, past the stage's end too
        x, y = data.train_batch(i), again.train_batch(i)
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_streamed_local_file_equals_the_loaded_one(tmp_path, tokenizer):
    f = tmp_path / "s.jsonl"
    rows = [{"text": f"streamed line {i} of the corpus."} for i in range(400)] + [{"text": ""}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = make_recipe(tmp_path)
    rec["datasets"]["whole"] = {"path": str(f)}
    rec["datasets"]["stream"] = {"path": str(f), "streaming": True, "max_tokens": 1000}
    whole = S.ensure_text_store(rec, "whole", "train", tokenizer)
    st = S.ensure_text_store(rec, "stream", "train", tokenizer)
    assert st.tokens >= 1000 > st.tokens - st.document(st.documents - 1).size
    assert np.array_equal(st.window(0, st.tokens), whole.window(0, st.tokens))
    rec["datasets"]["all"] = {"path": str(f), "streaming": True, "max_samples": 401}
    full = S.ensure_text_store(rec, "all", "train", tokenizer)
    assert full.documents == whole.documents == 400
    assert full.manifest["bad_rows"] == 1 and full.manifest["rows_read"] == 401
    assert np.array_equal(full.window(0, full.tokens), whole.window(0, whole.tokens))


def test_streamed_eval_split_partitions_the_rows(tmp_path, tokenizer):
    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps({"text": f"row {i} of the stream."}) + "\n" for i in range(1000)))
    rec = make_recipe(tmp_path)
    rec["datasets"]["held"] = {"path": str(f), "streaming": True, "max_samples": 1000, "eval_split": 0.2}
    tr = S.ensure_text_store(rec, "held", "train", tokenizer)
    ev = S.ensure_text_store(rec, "held", "eval", tokenizer)
    assert tr.documents + ev.documents == 1000 and 150 <= ev.documents <= 250
    texts = {tokenizer.decode(st.document(d)[:-1]) for st in (tr, ev) for d in range(st.documents)}
    assert len(texts) == 1000  # every row on exactly one side


def test_broken_local_text_is_named_with_its_line(tmp_path, tokenizer):
    f = tmp_path / "t.jsonl"
    lines = [json.dumps({"text": f"line {i}"}) for i in range(30)]
    lines[11] = lines[11][:-3]
    f.write_text("\n".join(lines) + "\n")
    rec = make_recipe(tmp_path)
    rec["datasets"]["loc"] = {"path": str(f)}
    with pytest.raises(ValueError, match=rf"datasets\.loc\.path: {f}:12: not valid JSON"):
        S.ensure_text_store(rec, "loc", "train", tokenizer)
    f.write_text("")
    with pytest.raises(ValueError, match=rf"datasets\.loc\.path: {f}: the file is empty"):
        S.ensure_text_store(rec, "loc", "train", tokenizer)


def test_a_full_disk_names_the_disk_and_leaves_no_partial_shard(tmp_path, tokenizer, chapters, monkeypatch):
    """A full disk while tokenising showed the raw OS error and left the half-written shard-*.tmp;
    it now says the disk is full, where and how much is free, removes the *.tmp files at once and
    keeps the finished shards, from which the same build resumes to the bytes of a fresh one."""
    import errno

    save, calls = np.save, []

    def full_on_the_third(fh, arr, *a, **k):  # shard 0's two arrays, then shard 1's tokens: half written
        calls.append(1)
        if len(calls) == 3:
            fh.write(b"\x93NUMPY half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(fh, arr, *a, **k)

    monkeypatch.setattr(np, "save", full_on_the_third)
    path = tmp_path / "s"
    with pytest.raises(OSError) as info:
        S.build_store(path, chapters, tokenizer, processes=1, shard_bytes=150_000)
    mount = tmp_path
    while not os.path.ismount(mount):
        mount = mount.parent
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC and "the disk is full" in msg and f"({mount}, " in msg
    assert "MiB free" in msg and str(path) in msg, msg
    part = tmp_path / "s.partial"
    assert not list(part.glob("*.tmp")), sorted(p.name for p in part.iterdir())
    assert sorted(p.name for p in part.glob("shard-*")) == ["shard-00000.json", "shard-00000.offsets.npy",
                                                            "shard-00000.tokens.npy"]
    monkeypatch.setattr(np, "save", save)
    st = S.build_store(path, chapters, tokenizer, processes=1, shard_bytes=150_000)
    fresh = S.build_store(tmp_path / "fresh", chapters, tokenizer, processes=1, shard_bytes=150_000)
    assert st.documents == fresh.documents and _files(path) == _files(tmp_path / "fresh")
