"""grpo / ppo prompts through the chat token store (llmlab.data.chat_store's ``prompt`` family)
against the datasets path they took before (``pipeline._tok_prompt`` over ``datasets.map``): every
training and held-out batch (ids, attention masks, the prompts' messages, the reference answers),
share and drop count is the same; the ids are the tokenizer's own ``apply_chat_template(...,
add_generation_prompt=True)``; the store is reused without loading the data, shared across
sequence settings, and checked before it is trusted."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.data import chat_store
from llmlab.data.pipeline import build_stage_data
from tests.data.conftest import make_recipe
from tests.data.test_chat_store import UNICODE_TURNS as TURNS
from tests.data.test_chat_store import _datasets_path  # the datasets path: what llmlab did before the store
from tests.data.test_chat_store import stores_in_one_and_two_processes


def _equal_batches(x: dict, y: dict) -> None:
    assert x.keys() == y.keys()
    for k in x:
        if isinstance(x[k], torch.Tensor):
            assert torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype, k
        else:
            assert x[k] == y[k] and json.dumps(x[k]) == json.dumps(y[k]), k  # key order of the messages too


def _same(a, b, steps=(0, 1, 3, 40, 7)):
    """Every observable of two prompt StageData objects is equal, tensors bitwise."""
    assert a.family == b.family == "prompt"
    assert a.num_train_examples == b.num_train_examples
    assert a.shares == b.shares and a.token_shares == b.token_shares and a.dropped == b.dropped
    for i in steps:
        _equal_batches(a.train_batch(i), b.train_batch(i))
        assert a.train_sources(i) == b.train_sources(i)
    ea, eb = a.eval_batches(), b.eval_batches()
    assert len(ea) == len(eb)
    for x, y in zip(ea, eb):
        _equal_batches(x, y)
    assert a.heldout() is None and b.heldout() is None


def _prompts_file(path, n=80):
    """Prompt rows: multi-turn (a system turn on some), unicode, answers as strings and numbers,
    some without one."""
    rows = []
    for i in range(n):
        turns = [{"role": "user" if k % 2 == 0 else "assistant", "content": TURNS[(i + k) % 6] + f" #{i}"}
                 for k in range(1 + 2 * (i % 3))]
        if i % 4 == 0:
            turns.insert(0, {"role": "system", "content": "You answer briefly."})
        row = {"prompt": turns}
        if i % 5:
            row["answer"] = i * 7 if i % 2 else f"{i} apples — «{TURNS[i % 6]}»"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("case", ["grpo", "ppo", "mixed_kinds", "local_unicode", "loaded_minhash",
                                  "too_long", "grouped", "eval_only"])
def test_prompt_batches_equal_the_datasets_path(tmp_path, monkeypatch, tokenizer, case):
    rec = make_recipe(tmp_path)
    stage = "grpo"
    st = rec["stages"]["grpo"]
    if case == "ppo":
        stage = "ppo"
        rec["stages"]["ppo"] = dict(st, type="ppo")
    if case == "mixed_kinds":  # prompts, conversations (answer: the last reply) and pairs (no answer), by weight
        rec["datasets"]["prompts"]["eval_split"] = 0.1
        st.update(datasets={"prompts": 2.0, "chat": 1.0, "chat_pairs": 1.0}, max_steps=40, batch_size=8)
    if case in ("local_unicode", "loaded_minhash", "grouped"):  # streamed into the store / loaded first
        rec["datasets"]["local"] = {"path": _prompts_file(tmp_path / "p.jsonl"), "eval_split": 0.2}
        if case == "loaded_minhash":
            rec["datasets"]["local"]["filters"] = {"dedup": "minhash"}
        st.update(datasets={"local": 1.0}, eval_steps=3, seq_len=256, max_dropped_fraction=1.0)
    if case == "grouped":
        st.update(group_by_length=True, batch_size=2)
    if case == "too_long":  # prompts over seq_len - max_new_tokens dropped, train and eval alike
        rec["datasets"]["prompts"]["eval_split"] = 0.2
        st.update(seq_len=48, max_new_tokens=30, max_dropped_fraction=1.0)
    if case == "eval_only":  # a held-out set named only for evaluation: its train rows
        st.update(eval_datasets={"chat": None}, eval_steps=4)
    old = _datasets_path(monkeypatch, rec, stage, tokenizer)
    new = build_stage_data(rec, stage, tokenizer)
    assert isinstance(new._train, chat_store.ChatExamples) and not isinstance(old._train, chat_store.ChatExamples)
    if case == "too_long":
        assert new.dropped["prompts"]["too_long"] > 0 and new.dropped["prompts"]["eval_too_long"] > 0
    if case in ("mixed_kinds", "local_unicode", "eval_only"):
        assert new.eval_batches()
    _same(old, new)


def test_prompt_ids_are_the_tokenizers_own(tmp_path, tokenizer):
    """Each batch row's ids are ``apply_chat_template(prompt, add_generation_prompt=True)`` of its
    messages, left-padded; its answer is the row's."""
    rec = make_recipe(tmp_path)
    rec["datasets"]["local"] = {"path": _prompts_file(tmp_path / "p.jsonl")}
    rec["stages"]["grpo"].update(datasets={"local": 1.0}, seq_len=512, max_new_tokens=8)
    data = build_stage_data(rec, "grpo", tokenizer)
    rows = {json.dumps(json.loads(line)["prompt"]): json.loads(line).get("answer")
            for line in (tmp_path / "p.jsonl").read_text().splitlines()}
    seen = 0
    for i in range(6):
        b = data.train_batch(i)
        for ids, mask, prompt, answer in zip(b["prompt_input_ids"], b["prompt_attention_mask"], b["prompts"],
                                             b["answers"]):
            want = tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                 add_generation_prompt=True)["input_ids"]
            assert ids[mask.bool()].tolist() == list(want) and int(mask.sum()) == len(want)
            assert mask.tolist() == sorted(mask.tolist())  # left padding
            ref = rows[json.dumps(prompt)]
            assert answer == ("" if ref is None else str(ref))
            seen += 1
    assert seen == 6 * data.batch_size


def test_too_many_long_prompts_refuse_the_stage_as_before(tmp_path, monkeypatch, tokenizer):
    rec = make_recipe(tmp_path)
    rec["stages"]["grpo"].update(seq_len=40, max_new_tokens=30, max_dropped_fraction=0.05)
    with pytest.raises(ValueError) as old:
        _datasets_path(monkeypatch, rec, "grpo", tokenizer)
    with pytest.raises(ValueError) as new:
        build_stage_data(rec, "grpo", tokenizer)
    assert str(new.value) == str(old.value)
    assert "longer than seq_len 40" in str(new.value) and "max_dropped_fraction 0.05" in str(new.value)


def test_prompt_store_is_reused_without_loading_and_shared_across_sequence_settings(tmp_path, monkeypatch,
                                                                                   tokenizer):
    rec = make_recipe(tmp_path)
    rec["datasets"]["prompts"]["eval_split"] = 0.1
    first = build_stage_data(rec, "grpo", tokenizer)
    root = tmp_path / "run" / "cache" / "tokens"
    stores = sorted(p.name for p in root.glob("chat-*") if p.is_dir())
    assert len(stores) == 2  # train and eval
    assert not list((tmp_path / "run" / "cache").glob("prompt-*.arrow"))  # no tokenised Arrow cache

    def no_load(*a, **k):
        raise AssertionError("the data were loaded although their store is complete")
    monkeypatch.setattr("llmlab.data.sources.load_named_dataset", no_load)
    _same(first, build_stage_data(rec, "grpo", tokenizer))
    rec["stages"]["grpo"].update(max_new_tokens=100, max_dropped_fraction=1.0)  # a smaller prompt budget
    rec["stages"]["ppo"] = dict(rec["stages"]["grpo"], type="ppo")
    for stage in ("grpo", "ppo"):
        shorter = build_stage_data(rec, stage, tokenizer)
        assert shorter.num_train_examples < first.num_train_examples
    assert sorted(p.name for p in root.glob("chat-*") if p.is_dir()) == stores


def test_worker_processes_write_the_same_prompt_store(tmp_path, monkeypatch, tokenizer):
    """Shards tokenised by the spawned pool equal those tokenised in this process (sha256s)."""
    from llmlab.data.sources import load_named_dataset

    monkeypatch.setattr(chat_store, "SHARD_EXAMPLES", 200)
    monkeypatch.setattr(chat_store, "LOCAL_SHARDS", 1)
    rows = load_named_dataset(make_recipe(tmp_path), "chat").train  # conversations: prompts with the last reply as answer
    made = stores_in_one_and_two_processes(tmp_path, rows, tokenizer, "prompt", "prompt", "grpo", 3)
    msgs = rows[205]["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    assert made[2].record(205) == [msgs[:last], msgs[last]["content"]]
    assert made[2].ids("prompt", 205).tolist() == tokenizer.apply_chat_template(
        msgs[:last], tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]


def test_a_changed_record_byte_is_found_before_it_is_used(tmp_path, tokenizer):
    from llmlab.data.store import StoreError

    rec = make_recipe(tmp_path)
    build_stage_data(rec, "grpo", tokenizer)
    store = next(p for p in (tmp_path / "run" / "cache" / "tokens").glob("chat-*") if p.is_dir())
    rec_file = next(store.glob("shard-00000.record_bytes.npy"))
    raw = bytearray(rec_file.read_bytes())
    raw[-3] ^= 0x01  # an answer's or a message's character: no size changes
    rec_file.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="record_bytes"):
        build_stage_data(rec, "grpo", tokenizer).train_batch(0)


# -- `llmlab eval -d NAME` and the evaluate stage: a recipe dataset's rows ------------------------

def _local_recipe(tmp_path, kind: str) -> dict:
    from tests.data.test_chat_store import _messages_file, _pairs_file

    path = {"messages": _messages_file, "preference": _pairs_file, "prompt": _prompts_file}[kind](
        tmp_path / f"{kind}.jsonl")
    rec = make_recipe(tmp_path)
    rec["datasets"]["local"] = {"path": path, "eval_split": 0.2, "filters": {"dedup": "exact", "min_length": 12}}
    return rec


@pytest.mark.parametrize("kind", ["messages", "preference", "prompt"])
def test_eval_rows_of_a_streamed_dataset_equal_its_loaded_split(tmp_path, monkeypatch, kind):
    """``llmlab eval -d NAME`` and the evaluate stage read a local dataset as a stream, holding only
    the side asked for: the rows (and so every number) are those of the loaded dataset's split."""
    from llmlab.data import sources
    from llmlab.inference.datasets import load_eval_rows, normalize_row, spread
    from llmlab.stages.evaluate import evaluation_rows

    rec = _local_recipe(tmp_path, kind)
    loaded = sources.load_named_dataset(rec, "local")
    want = {"train": loaded.train.to_list(), "eval": loaded.eval.to_list()}
    assert want["eval"] and want["train"]

    def no_load(*a, **k):
        raise AssertionError("a streamable dataset was loaded whole")
    monkeypatch.setattr(sources, "load_named_dataset", no_load)
    assert sources.read_splits(rec, "local") == want
    assert sources.read_splits(rec, "local", ("eval",)) == {"eval": want["eval"]}
    old = [normalize_row(dict(r))[1] for r in want["eval"]]
    assert load_eval_rows("local", limit=7, recipe=rec)[1] == spread(old, 7)
    assert load_eval_rows("local", split="all", recipe=rec)[1] == \
        [normalize_row(dict(r))[1] for r in want["train"] + want["eval"]]
    assert evaluation_rows(rec, "local", 5)[1] == spread(old, 5)


def test_eval_rows_keep_the_loaded_datasets_errors(tmp_path):
    from llmlab.inference.datasets import DatasetError, load_eval_rows

    rec = _local_recipe(tmp_path, "prompt")
    rec["datasets"]["local"]["eval_split"] = 0.0001  # holds out none of the rows
    with pytest.raises(DatasetError, match=r"eval_split: 0.0001 holds out none of the \d+ rows"):
        load_eval_rows("local", recipe=rec)
    rec["datasets"]["local"]["eval_split"] = 0.0
    with pytest.raises(DatasetError, match="has no held-out rows"):
        load_eval_rows("local", recipe=rec)


# -- hub and builtin sources without `streaming: true`: streamed into the store --------------------

@pytest.mark.parametrize("source,stage", [("hub", "grpo"), ("hub", "sft"), ("builtin", "grpo"), ("builtin", "dpo")])
def test_hub_and_builtin_sources_are_streamed_into_the_store(tmp_path, monkeypatch, tokenizer, source, stage):
    """A hub dataset (here a local dataset repo, HF_HUB_OFFLINE=1) or a builtin without
    ``streaming: true`` fills its stores from a stream of rows (the hub's memory-mapped download
    read in batches), never loaded whole as a ``datasets.Dataset``: the batches equal the datasets
    path's, which loads it."""
    from llmlab.data import sources
    from tests.data.test_chat_store import _messages_file

    rec = make_recipe(tmp_path)
    st = rec["stages"][stage]
    if source == "hub":
        repo = tmp_path / "repo"
        repo.mkdir()
        (_prompts_file if stage == "grpo" else _messages_file)(repo / "train.jsonl")
        rec["datasets"]["d"] = {"hub": str(repo), "eval_split": 0.2}
        st.update(seq_len=256, max_dropped_fraction=1.0, eval_steps=3)
    else:
        rec["datasets"]["d"] = dict(rec["datasets"]["prompts" if stage == "grpo" else "chat_pairs"], eval_split=0.1)
    st.update(datasets={"d": 1.0})

    def no_load(*a, **k):
        raise AssertionError("the dataset was loaded whole")
    with monkeypatch.context() as m:
        m.setattr(sources, "load_named_dataset", no_load)
        new = build_stage_data(rec, stage, tokenizer)
    old = _datasets_path(monkeypatch, rec, stage, tokenizer)
    assert isinstance(new._train, chat_store.ChatExamples) and new.num_train_examples > 20
    if stage == "grpo":
        _same(old, new)
    else:
        from tests.data.test_chat_store import _same as same_chat

        same_chat(old, new)
