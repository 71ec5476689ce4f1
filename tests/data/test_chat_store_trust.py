"""The chat token store is never trusted blindly (issue 26 item 4), as the pretraining token store
is not: a changed byte or an id outside the vocabulary stops the first read of its shard with an
error naming the store, the file and what to do; an intact store is hashed once (by its writer)
and then trusted on a stat. Also: the piece-cached encoder of chat texts gives the Rust
tokenizer's ids and character offsets, and a local source fills its stores from a stream."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from llmlab.data import chat_store
from llmlab.data import store as S
from tests.data.conftest import make_recipe
from tests.data.test_chat_store import UNICODE_TURNS, _datasets_path, _messages_file, _pairs_file, _same


@pytest.fixture
def built(tmp_path, monkeypatch, tokenizer):
    """A chat store of 3+ shards written in this process (its writer leaves a record per shard)."""
    from llmlab.data.sources import load_named_dataset

    monkeypatch.setattr(chat_store, "SHARD_EXAMPLES", 150)
    rows = load_named_dataset(make_recipe(tmp_path), "chat").train
    st = chat_store.ensure_chat_store(tmp_path / "chat-x", rows, family="sft", kind_src="conversation",
                                      kind_dst="conversation", name="chat", split="train", stage_type="sft",
                                      tokenizer=tokenizer, info={}, processes=1)
    assert len(st.manifest["shards"]) >= 3
    return st


def _read_all(store: chat_store.ChatStore) -> list:
    return [store.sequence("input", j) for j in range(0, store.examples, 7)]


def _first_read_of_shard_1_fails(store: chat_store.ChatStore, file: str, said: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["llmlab", "run", "recipes/mine.yaml"])
    st = chat_store.ChatStore(store.path)
    st.sequence("input", 0)  # shard 0 is sound and read
    first = store.manifest["shards"][0]["examples"]
    with pytest.raises(S.StoreError) as info:
        st.sequence("input", first)
    msg = str(info.value)
    assert msg.startswith(f"{store.path / file}: ") and said in msg, msg
    assert f"The chat token store {store.path} (chat, train) cannot be used" in msg
    assert f"`rm -r {store.path}`" in msg and "`llmlab prepare recipes/mine.yaml`" in msg
    with pytest.raises(S.StoreError, match="cannot be used"):
        chat_store.ChatStore(store.path).verify()


@pytest.mark.parametrize("array", ["input_ids", "input_labels", "input_offsets", "input_info"])
def test_a_flipped_byte_stops_the_first_read_of_its_shard(built, array, monkeypatch):
    f = built.path / built.manifest["shards"][1]["files"][array]
    raw = bytearray(f.read_bytes())
    raw[len(raw) - 3] ^= 1  # one bit of the data, same size, header intact
    f.write_bytes(bytes(raw))
    _first_read_of_shard_1_fails(built, f.name, "sha256 differs from manifest.json", monkeypatch)


def test_an_id_outside_the_vocabulary_stops_the_first_read_of_its_shard(built, tokenizer, monkeypatch):
    f = built.path / built.manifest["shards"][1]["files"]["input_ids"]
    ids = np.load(f, mmap_mode="r+")
    ids[5] = len(tokenizer) + 7
    ids.flush()
    _first_read_of_shard_1_fails(built, f.name, f"holds token id {len(tokenizer) + 7}, outside the tokenizer's "
                                 f"vocabulary of {len(tokenizer)} ids", monkeypatch)


def test_ids_as_written_above_the_manifests_vocabulary_are_refused(built, monkeypatch):
    """Bytes as written (their records trusted) but a vocabulary smaller than their ids."""
    mf = built.path / "manifest.json"
    m = json.loads(mf.read_text())
    mf.write_text(json.dumps(dict(m, vocab_size=10)))
    monkeypatch.setattr(S, "sha256_mapped", _no_hashing)  # the records vouch for the bytes
    with pytest.raises(S.StoreError, match=r"shard-00000\.input_ids\.npy: holds token id \d+, outside the "
                                           r"tokenizer's vocabulary of 10 ids"):
        chat_store.ChatStore(built.path).sequence("input", 0)


def _no_hashing(*a, **k):
    raise AssertionError("hashed again")


def test_an_intact_store_is_hashed_once_by_its_writer_then_trusted(built, monkeypatch):
    shards = len(built.manifest["shards"])
    assert sorted(p.name for p in built.path.glob("shard-*.verified")) == \
        [f"shard-{i:05d}.verified" for i in range(shards)]
    expected = _read_all(built)
    monkeypatch.setattr(S, "sha256_mapped", _no_hashing)
    again = chat_store.ChatStore(built.path)
    again.check()
    got = _read_all(again)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(expected, got))
    monkeypatch.undo()
    hashed = []
    monkeypatch.setattr(S, "sha256_mapped", lambda p: hashed.append(p.name) or S.sha256_file(p))
    chat_store.ChatStore(built.path).verify()  # verify hashes regardless of the records
    assert len(hashed) == sum(len(s["files"]) for s in built.manifest["shards"])


def test_chat_encoder_gives_the_rust_tokenizers_ids_and_offsets(tokenizer):
    from llmlab.data.fastencode import ChatEncoder

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": a}, {"role": "assistant", "content": b}],
                                           tokenize=False) for a in UNICODE_TURNS for b in UNICODE_TURNS]
    texts += ["", "<|im_start|><|im_end|>", "a  <|im_end|>  b ", " 🙂 \n\n ", "é" * 5 + "\t\t"]
    ids, offsets, chars = ChatEncoder(tokenizer).encode(texts)
    base = np.cumsum([0] + [len(t) for t in texts])
    for i, enc in enumerate(tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)):
        assert ids[offsets[i]: offsets[i + 1]].tolist() == enc.ids, texts[i]
        assert (chars[offsets[i]: offsets[i + 1]] - base[i]).tolist() == [list(o) for o in enc.offsets], texts[i]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_local_source_fills_its_stores_from_a_stream_without_loading(tmp_path, monkeypatch, tokenizer, stage):
    from llmlab.data.pipeline import build_stage_data

    rec = make_recipe(tmp_path)
    path = _messages_file(tmp_path / "m.jsonl", 120) if stage == "sft" else _pairs_file(tmp_path / "p.jsonl", 120)
    rec["datasets"]["local"] = {"path": path, "eval_split": 0.2}
    rec["stages"][stage].update(datasets={"local": 1.0}, seq_len=96, max_dropped_fraction=1.0)
    old = _datasets_path(monkeypatch, rec, stage, tokenizer)

    def no_load(*a, **k):
        raise AssertionError("a streamable source was loaded whole")
    monkeypatch.setattr("llmlab.data.sources.load_named_dataset", no_load)
    monkeypatch.setattr(chat_store, "SHARD_EXAMPLES", 16)  # several shards on each side
    new = build_stage_data(rec, stage, tokenizer)
    _same(old, new)
    stores = [p for p in (tmp_path / "run" / "cache" / "tokens").glob("chat-*") if p.is_dir()]
    splits = sorted(json.loads((p / "manifest.json").read_text())["split"] for p in stores)
    assert splits == ["eval", "train"]
