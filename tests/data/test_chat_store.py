"""The chat token store (llmlab.data.chat_store) against the datasets path it replaces: every
batch, held-out batch, held-out example, share and drop count of SFT, DPO and KTO stages is the
same, the store is reused without loading the data again, and a killed build resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmlab.data import chat_store
from llmlab.data.pipeline import build_stage_data
from tests.data.conftest import make_recipe

UNICODE_TURNS = ["Ça va? Where's the café 🙂", "Très bien — merci! 東京 is far.\n\n  Indented  line",
                 "Numbers 12345 and   spaces ", "Emoji only: 🎉🎉", "tab\tseparated\ttext", "ok"]


def _datasets_path(monkeypatch, rec, stage, tokenizer):
    """The stage's data through the datasets path (what llmlab did before the chat store)."""
    with monkeypatch.context() as m:
        m.setattr(chat_store, "stored_source", lambda *a, **k: None)
        return build_stage_data(rec, stage, tokenizer)


def _same(a, b, steps=(0, 1, 3, 40, 7)):
    """Every observable of two StageData objects is equal, batches bitwise."""
    assert a.num_train_examples == b.num_train_examples
    assert a.shares == b.shares and a.token_shares == b.token_shares and a.dropped == b.dropped
    assert a.family == b.family
    for i in steps:
        x, y = a.train_batch(i), b.train_batch(i)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype, (i, k)
        assert a.train_sources(i) == b.train_sources(i)
    ea, eb = a.eval_batches(), b.eval_batches()
    assert len(ea) == len(eb)
    for x, y in zip(ea, eb):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    ha, hb = a.heldout(), b.heldout()
    assert (ha is None) == (hb is None)
    if ha is not None:
        assert (ha.kind, ha.total, ha.examples) == (hb.kind, hb.total, hb.examples)


def _messages_file(path, n=60):
    rows = []
    for i in range(n):
        turns = [UNICODE_TURNS[(i + k) % len(UNICODE_TURNS)] + f" #{i}" for k in range(2 + 2 * (i % 3))]
        rows.append({"messages": [{"role": "user" if k % 2 == 0 else "assistant", "content": t}
                                  for k, t in enumerate(turns)]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pairs_file(path, n=50):
    rows = [{"prompt": [{"role": "user", "content": UNICODE_TURNS[i % 6] + f" {i}?"},
                        {"role": "assistant", "content": "Earlier reply " + UNICODE_TURNS[(i + 1) % 6]},
                        {"role": "user", "content": "And then?"}],
             "chosen": [{"role": "assistant", "content": UNICODE_TURNS[(i + 2) % 6] + " yes"}]
             + ([{"role": "user", "content": "more"}, {"role": "assistant", "content": "Second turn 🙂"}] if i % 2 else []),
             "rejected": [{"role": "assistant", "content": UNICODE_TURNS[(i + 3) % 6] + " no"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("case", ["sft", "sft_truncate", "sft_mixed", "sft_unicode", "sft_eval_only"])
def test_sft_batches_equal_the_datasets_path(tmp_path, monkeypatch, tokenizer, case):
    rec = make_recipe(tmp_path)
    st = rec["stages"]["sft"]
    if case == "sft_truncate":  # over-long conversations cut from the left, the rest dropped
        st.update(seq_len=48, truncation="truncate", max_dropped_fraction=1.0)
    if case == "sft_mixed":  # two sources, one converted from pairs, mixed by weight over passes
        st.update(datasets={"chat": 2.0, "chat_pairs": 1.0}, max_steps=60, batch_size=16)
    if case == "sft_unicode":  # multi-turn, accents, emoji, CJK, runs of spaces
        rec["datasets"]["local"] = {"path": _messages_file(tmp_path / "m.jsonl"), "eval_split": 0.1}
        st.update(datasets={"local": 1.0}, seq_len=64, max_dropped_fraction=1.0)
    if case == "sft_eval_only":  # a held-out set named only for evaluation: its train rows, kept whole
        st.update(eval_datasets={"chat_pairs": None}, seq_len=40, max_dropped_fraction=1.0)
    old = _datasets_path(monkeypatch, rec, "sft", tokenizer)
    new = build_stage_data(rec, "sft", tokenizer)
    assert isinstance(new._train, chat_store.ChatExamples) and not isinstance(old._train, chat_store.ChatExamples)
    _same(old, new)


@pytest.mark.parametrize("case", ["dpo", "dpo_unicode_multiturn", "kto_pairs"])
def test_pair_batches_equal_the_datasets_path(tmp_path, monkeypatch, tokenizer, case):
    rec = make_recipe(tmp_path)
    stage = "dpo"
    if case == "dpo_unicode_multiturn":  # completions of two assistant turns: both labelled, not the prompt's
        rec["datasets"]["local"] = {"path": _pairs_file(tmp_path / "p.jsonl"), "eval_split": 0.2}
        rec["stages"]["dpo"].update(datasets={"local": 1.0}, seq_len=96, max_dropped_fraction=1.0)
    if case == "kto_pairs":
        stage = "kto"
        rec["stages"]["kto"] = dict(rec["stages"]["dpo"], type="kto")
    _same(_datasets_path(monkeypatch, rec, stage, tokenizer), build_stage_data(rec, stage, tokenizer))


def test_unpaired_batches_equal_the_datasets_path(tmp_path, monkeypatch, tokenizer):
    from tests.data.test_unpaired import _kto_recipe

    rec = _kto_recipe(tmp_path, {"unpaired": 1.0})
    new = build_stage_data(rec, "kto", tokenizer)
    assert new.family == "unpaired_preference"
    _same(_datasets_path(monkeypatch, rec, "kto", tokenizer), new)


def test_store_is_reused_without_loading_and_shared_across_seq_len(tmp_path, monkeypatch, tokenizer):
    rec = make_recipe(tmp_path)
    first = build_stage_data(rec, "sft", tokenizer)
    stores = sorted(p.name for p in (tmp_path / "run" / "cache" / "tokens").glob("chat-*") if p.is_dir())
    assert len(stores) == 2  # train and eval

    def no_load(*a, **k):
        raise AssertionError("the data were loaded although their store is complete")
    monkeypatch.setattr("llmlab.data.sources.load_named_dataset", no_load)
    again = build_stage_data(rec, "sft", tokenizer)
    _same(first, again)
    rec["stages"]["sft"].update(seq_len=64, max_dropped_fraction=1.0)  # other sequence settings: same store
    shorter = build_stage_data(rec, "sft", tokenizer)
    assert shorter.num_train_examples < first.num_train_examples
    assert sorted(p.name for p in (tmp_path / "run" / "cache" / "tokens").glob("chat-*") if p.is_dir()) == stores


def test_a_killed_build_resumes_to_the_same_store(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(chat_store, "SHARD_EXAMPLES", 100)
    rec = make_recipe(tmp_path)
    whole = build_stage_data(rec, "sft", tokenizer)
    root = tmp_path / "run" / "cache" / "tokens"
    store = max((p for p in root.glob("chat-*") if p.is_dir()), key=lambda p: json.loads(
        (p / "manifest.json").read_text())["examples"])
    shards = json.loads((store / "manifest.json").read_text())["shards"]
    assert len(shards) > 2
    # as a kill leaves it: no manifest, a .partial folder, the last shards not (or half) written
    (store / "manifest.json").unlink()
    for f in store.glob("shard-00002.*"):
        f.unlink()
    (store / (shards[1]["files"]["input_ids"] + ".tmp")).write_bytes(b"partial")
    store.rename(store.with_name(store.name + ".partial"))
    calls = []
    real = chat_store._encode_shard
    monkeypatch.setattr(chat_store, "_encode_shard", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    resumed = build_stage_data(make_recipe(tmp_path), "sft", tokenizer)
    assert 0 not in calls and 2 in calls  # finished shards kept, the missing one written
    _same(whole, resumed)
    assert json.loads((store / "manifest.json").read_text())["shards"] == shards


def stores_in_one_and_two_processes(tmp_path, rows, tokenizer, family: str, kind_dst: str, stage_type: str,
                                    min_shards: int) -> dict:
    """``{processes: ChatStore}`` of ``rows`` (conversations of the dataset ``chat``) tokenised in this
    process (1) and by the spawned pool (2), after checking their shards' sha256s are equal."""
    made = {}
    for procs in (1, 2):
        made[procs] = chat_store.ensure_chat_store(
            tmp_path / f"s{procs}", rows, family=family, kind_src="conversation", kind_dst=kind_dst,
            name="chat", split="train", stage_type=stage_type, tokenizer=tokenizer, info={}, processes=procs)
    a, b = (m.manifest["shards"] for m in made.values())
    assert len(a) >= min_shards and [s["sha256"] for s in a] == [s["sha256"] for s in b]
    return made


def test_tokenising_in_worker_processes_gives_the_same_store(tmp_path, monkeypatch, tokenizer):
    """Shards tokenised by the spawned pool equal those tokenised in this process (sha256s)."""
    from llmlab.data.sources import load_named_dataset

    monkeypatch.setattr(chat_store, "SHARD_EXAMPLES", 200)
    rows = load_named_dataset(make_recipe(tmp_path), "chat").train
    made = stores_in_one_and_two_processes(tmp_path, rows, tokenizer, "sft", "conversation", "sft", 2)
    ids, flags = made[2].sequence("input", 5)
    enc = tokenizer.apply_chat_template(rows[5]["messages"], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert ids.tolist() == enc["input_ids"] and flags.astype(int).tolist() == enc["assistant_masks"]


def test_assistant_flags_follow_the_offsets_rule_where_characters_are_split():
    """A character split over several byte tokens: every token of it is flagged, as
    apply_chat_template's overlap rule flags it."""
    offsets = np.array([[0, 1], [1, 2], [2, 3], [2, 3], [3, 5]])
    assert chat_store._flags_from_offsets(offsets, [(2, 3)]).tolist() == [False, False, True, True, False]
    assert chat_store._flags_from_offsets(offsets, [(0, 1), (4, 5)]).tolist() == [True, False, False, False, True]


def test_cache_prune_deletes_chat_stores_whole(tmp_path, tokenizer):
    from llmlab.data.store_admin import list_stores, prune_stores

    build_stage_data(make_recipe(tmp_path), "sft", tokenizer)
    root = tmp_path / "run" / "cache" / "tokens"
    listed = [e for e in list_stores(root) if e.path.name.startswith("chat-")]
    assert len(listed) == 2 and {e.split for e in listed} == {"train", "eval"} and all(e.tokens for e in listed)
    prune_stores(root, unused_days=-1)
    assert not [p for p in root.iterdir() if p.is_dir()]
