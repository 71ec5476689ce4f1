"""One identity per dataset: its source's content fingerprint (llmlab.data.source) is what stage
fingerprints, the token store's key and the tokenised-Arrow cache of SFT data all hash; the
builtin / hub / local branch is one class per kind."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from llmlab import fingerprint
from llmlab.data import store
from llmlab.data.pipeline import build_stage_data
from llmlab.data.source import BuiltinSource, HubSource, LocalSource, dataset_source
from llmlab.data.sources import load_named_dataset, recipe_source
from tests.data.conftest import make_recipe


def _chat_file(path, n=60, reply="Answer"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"{reply} {i}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _same_size_edit(path, old: bytes, new: bytes):
    """Replace ``old`` by ``new`` (same length) in the file and put its timestamps back."""
    st = os.stat(path)
    data = open(path, "rb").read()
    assert len(old) == len(new) and old in data
    with open(path, "r+b") as f:  # in place: the same inode
        f.write(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def _identities(rec, name):
    """(stage fingerprint's data part, the source's fingerprint, the token store's source part)."""
    order = list(rec["stages"])
    stage = next(s for s in order if name in rec["stages"][s]["datasets"])
    fps = fingerprint.stage_fingerprints(rec, order)
    return (fps[stage]["parts"]["data"][name], recipe_source(rec, name).fingerprint(),
            store.source_fingerprint(rec, name)["source"])


def test_stage_fingerprint_token_store_and_source_agree(tmp_path):
    rec = make_recipe(tmp_path)
    rec["datasets"]["local"] = {"path": _chat_file(tmp_path / "data" / "chat.jsonl"), "eval_split": 0.1}
    rec["stages"]["sft"]["datasets"] = {"local": 1.0}
    for name in ("bible", "chat_pairs", "local", "prompts"):
        stage_fp, source_fp, store_fp = _identities(rec, name)
        assert stage_fp == source_fp == store_fp == fingerprint.source_fingerprint(rec["datasets"][name])


def test_a_same_size_edit_with_the_mtime_put_back_is_another_dataset(tmp_path):
    rec = make_recipe(tmp_path)
    path = _chat_file(tmp_path / "data" / "chat.jsonl")
    rec["datasets"]["local"] = {"path": path, "format": "messages"}
    rec["stages"]["sft"]["datasets"] = {"local": 1.0}
    before = _identities(rec, "local")
    key = store.store_path(rec, "local", "train", "tok").name
    rows = load_named_dataset(rec, "local").train.to_list()
    _same_size_edit(path, b"Answer 7.", b"Answer 8.")
    after = _identities(rec, "local")
    assert len(set(before)) == len(set(after)) == 1 and after[0] != before[0]
    assert store.store_path(rec, "local", "train", "tok").name != key
    edited = load_named_dataset(rec, "local").train.to_list()  # the same process reads the new bytes
    assert edited != rows and edited[7]["messages"][1]["content"] == "Answer 8."


def test_the_sft_chat_store_follows_the_content_not_the_path(tmp_path, tokenizer):
    """SFT data is tokenised into chat token stores (llmlab.data.chat_store) keyed by the source's
    identity: the same bytes elsewhere reuse them, a same-size edit makes new ones."""
    from llmlab.data.store import store_root

    rec = make_recipe(tmp_path)
    rec["datasets"]["local"] = {"path": _chat_file(tmp_path / "a" / "chat.jsonl"), "format": "messages"}
    rec["stages"]["sft"]["datasets"] = {"local": 1.0}

    def chat_stores():
        return sorted(p.name for p in store_root(rec).glob("chat-*") if p.is_dir())

    first = build_stage_data(rec, "sft", tokenizer)
    made = chat_stores()
    assert made
    copy = tmp_path / "b" / "chat.jsonl"  # the same bytes elsewhere: the same data, the stores are reused
    copy.parent.mkdir()
    shutil.copy(rec["datasets"]["local"]["path"], copy)
    rec["datasets"]["local"]["path"] = str(copy)
    again = build_stage_data(rec, "sft", tokenizer)
    assert chat_stores() == made and again.train_batch(0)["input_ids"].equal(first.train_batch(0)["input_ids"])
    _same_size_edit(copy, b"Answer", b"Adieu!")
    build_stage_data(rec, "sft", tokenizer)
    assert len(chat_stores()) > len(made) and set(made) <= set(chat_stores())


def test_one_class_per_kind_of_source_and_exactly_one_kind(tmp_path):
    assert isinstance(dataset_source("b", {"builtin": "kjv"}), BuiltinSource)
    assert isinstance(dataset_source("h", {"hub": "org/data"}), HubSource)
    local = dataset_source("l", {"path": str(tmp_path / "x.jsonl")})
    assert isinstance(local, LocalSource) and local.kind == "local" and local.streamable
    assert not dataset_source("l", {"path": "x", "filters": {"dedup": "minhash"}}).streamable
    for bad in ({}, {"builtin": "kjv", "hub": "org/data"}):
        with pytest.raises(ValueError, match="exactly one of builtin / hub / path"):
            dataset_source("d", bad)
    # a builtin's rows depend on the seed where it draws them, or where rows are held out
    assert dataset_source("p", {"builtin": "chatterbot_pairs"}).identity(1) != \
        dataset_source("p", {"builtin": "chatterbot_pairs"}).identity(2)
    assert dataset_source("k", {"builtin": "kjv"}).identity(1) == dataset_source("k", {"builtin": "kjv"}).identity(2)
    assert dataset_source("k", {"builtin": "kjv", "eval_split": 0.1}).identity(1) != \
        dataset_source("k", {"builtin": "kjv", "eval_split": 0.1}).identity(2)


def test_a_streamed_builtin_gives_the_loaded_rows(tmp_path):
    from llmlab.data.sources import stream_rows

    rec = {"seed": 4, "datasets": {"c": {"builtin": "chatterbot", "eval_split": 0.1, "filters": {"dedup": "exact"}}}}
    loaded = load_named_dataset(rec, "c")
    for split in ("train", "eval"):
        info: dict = {}
        rows = [r for r, kind in stream_rows(recipe_source(rec, "c"), 4, None, split, info)]
        assert rows == getattr(loaded, split).to_list() and rows
        assert info["dropped"] == loaded.dropped and info["rows_read"] == loaded.num_raw
