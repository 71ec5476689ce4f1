"""Stage data on the real built-in corpora: mixing shares, determinism and resume, packing, SFT
and preference masking, prompt batches, caching."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.data.pipeline import IGNORE_INDEX, build_stage_data, pack_documents
from llmlab.data.tokenizer import IM_END
from tests.data.conftest import make_recipe


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """One run directory for the mixing tests: its tokenisation cache is reused across them, as a
    resumed run reuses it."""
    return tmp_path_factory.mktemp("mixrun")


def _mixing_recipe(tmp_path, seed=1234, stopping="all_exhausted"):
    rec = make_recipe(tmp_path, seed=seed)
    rec["stages"]["mix"] = {"type": "sft", "datasets": {"chat": 2.0, "chat_pairs": 1.0},
                            "mixing": {"stopping": stopping}, "seq_len": 128,
                            "batch_size": 100, "max_steps": 100, "eval_steps": 1}
    return rec


@pytest.mark.parametrize("stopping", ["all_exhausted", "first_exhausted"])
def test_mixing_weights_2_to_1_give_two_thirds(shared_run, tokenizer, stopping):
    data = build_stage_data(_mixing_recipe(shared_run, stopping=stopping), "mix", tokenizer)
    sources = np.concatenate([data.train_sources(i) for i in range(100)])  # 10,000 samples
    assert len(sources) == 10_000
    share = float((sources == 0).mean())
    assert abs(share - 2 / 3) <= 0.015, share
    assert abs(data.shares["chat"] - 2 / 3) <= 0.015 and abs(sum(data.shares.values()) - 1) < 1e-9


def test_same_seed_same_order_and_pure_batches(shared_run, tokenizer):
    # two independent builds (the second reads the tokenisation cache, as a resumed run does)
    a = build_stage_data(_mixing_recipe(shared_run), "mix", tokenizer)
    b = build_stage_data(_mixing_recipe(shared_run), "mix", tokenizer)
    c = build_stage_data(_mixing_recipe(shared_run, seed=99), "mix", tokenizer)
    assert [a.train_sources(i) for i in range(20)] == [b.train_sources(i) for i in range(20)]
    assert [a.train_sources(i) for i in range(20)] != [c.train_sources(i) for i in range(20)]
    # a resumed run asks for batch 37 first: it gets what an uninterrupted run got at 37
    for i in (0, 37, 5, 37, 123):  # past one epoch too
        x, y = a.train_batch(i), b.train_batch(i)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (i, k)
    assert not torch.equal(a.train_batch(1)["input_ids"][:, :8], a.train_batch(2)["input_ids"][:, :8])


def test_pretrain_packing_on_the_bible(tmp_path, tokenizer):
    rec = make_recipe(tmp_path)
    rec["datasets"]["bible"]["max_samples"] = 400  # Genesis .. 2 Kings
    data = build_stage_data(rec, "pretrain", tokenizer)
    eos = tokenizer.eos_token_id
    assert data.num_train_examples > 2000  # ~392 chapters of ~1,000 tokens in 128-token blocks
    b = data.train_batch(0)
    assert set(b) == {"input_ids", "labels", "position_ids"}
    assert all(v.shape == (8, 128) and v.dtype == torch.long for v in b.values())
    assert torch.equal(b["labels"], b["input_ids"])  # the model shifts
    # blocks of chapters of ~1,000 tokens: some of 5 batches' 40 blocks cross a chapter's end
    several = [data.train_batch(i) for i in range(5)]
    ids, pos = (torch.cat([x[k] for x in several]) for k in ("input_ids", "position_ids"))
    assert (pos[:, 0] == 0).all()
    after_eos = ids[:, :-1] == eos
    assert after_eos.any()
    assert (pos[:, 1:][after_eos] == 0).all()  # a new document starts at position 0
    assert (pos[:, 1:][~after_eos] == pos[:, :-1][~after_eos] + 1).all()  # else it counts on
    # eval: the held-out chapters, packed the same way
    ev = data.eval_batches()
    assert 1 <= len(ev) <= 2 and ev[0]["input_ids"].shape[1] == 128
    text = tokenizer.decode(data.train_batch(3)["input_ids"][0])
    assert "<|pad|>" not in text
    # whole stream: every document ends with EOS
    blocks = np.stack([data._train.sources[0].block(j) for j in range(data.num_train_examples)])
    assert (blocks == eos).sum() >= 380


def test_pack_documents_restarts_positions():
    flat = np.array([5, 6, 0, 7, 8, 9, 0, 4, 0, 3, 3], dtype=np.int32)
    blocks, pos = pack_documents(flat, eos_id=0, seq_len=4, pad_id=1)
    assert blocks.tolist() == [[5, 6, 0, 7], [8, 9, 0, 4]]
    assert pos.tolist() == [[0, 1, 2, 0], [0, 1, 2, 0]]
    short, spos = pack_documents(np.array([5, 0]), eos_id=0, seq_len=4, pad_id=1)
    assert short.tolist() == [[5, 0, 1, 1]] and spos.tolist()[0][:2] == [0, 1]


def test_sft_masks_exactly_the_assistant_tokens_of_a_real_conversation(tmp_path, tokenizer):
    rec = make_recipe(tmp_path)
    rec["stages"]["sft"]["seq_len"] = 512
    data = build_stage_data(rec, "sft", tokenizer)
    rows = data._train
    # the multi-turn "Hello / Hi / ... / Thank you anyway" dialogue of conversations.yml
    idx = next(i for i, ids in enumerate(rows["input_ids"])
               if "borrow a cup of sugar" in tokenizer.decode(ids))
    ids, labels = rows[idx]["input_ids"], rows[idx]["labels"]
    labelled = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert all(l in (t, IGNORE_INDEX) for t, l in zip(ids, labels))
    # english/conversations.yml, second list: turns alternate user/assistant from "Hello"
    assistant = ["Hi", "I am doing well.", "Yes it is.", "Yes, I have a question.",
                 "Could I borrow a cup of sugar?", "Thank you anyway"]
    assert tokenizer.decode(labelled) == "".join(a + IM_END for a in assistant)
    # every assistant token is labelled: re-encode each assistant turn and find it labelled
    text = tokenizer.decode(ids)
    for a in assistant:
        assert f"<|im_start|>assistant\n{a}{IM_END}" in text
    user_tokens = [t for t, l in zip(ids, labels) if l == IGNORE_INDEX]
    assert "I'm sorry, but I don't have any." in tokenizer.decode(user_tokens)
    assert "Can I help you with anything?" in tokenizer.decode(user_tokens)
    assert "Thank you anyway" not in tokenizer.decode(user_tokens)
    b = data.train_batch(0)
    assert set(b) == {"input_ids", "labels", "attention_mask"}
    assert ((b["labels"] != IGNORE_INDEX) <= (b["attention_mask"] == 1)).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_sft_overlong_examples_are_dropped_and_counted_or_truncated(tmp_path, tokenizer):
    rec = make_recipe(tmp_path)
    rec["stages"]["sft"]["seq_len"] = 48
    rec["stages"]["sft"]["max_dropped_fraction"] = 1.0  # most are dropped here, on purpose
    dropped = build_stage_data(rec, "sft", tokenizer)
    assert dropped.dropped["chat"]["too_long"] > 50  # coding.yml answers are long
    assert max(len(x) for x in dropped._train["input_ids"]) <= 48
    rec["stages"]["sft"]["truncation"] = "truncate"
    cut = build_stage_data(rec, "sft", tokenizer)
    assert cut.dropped["chat"].get("too_long", 0) < dropped.dropped["chat"]["too_long"]
    assert cut.num_train_examples > dropped.num_train_examples
    for ids, labels in zip(cut._train["input_ids"], cut._train["labels"]):
        assert len(ids) <= 48
        assert ids[-2] == tokenizer.convert_tokens_to_ids(IM_END) and labels[-2] == ids[-2]


def test_dpo_labels_only_the_completion(tmp_path, tokenizer):
    data = build_stage_data(make_recipe(tmp_path), "dpo", tokenizer)
    b = data.train_batch(0)
    keys = {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")}
    assert set(b) == keys
    assert len({b[k].shape for k in keys}) == 1
    for i in range(b["chosen_input_ids"].shape[0]):
        c_lab = b["chosen_labels"][i][b["chosen_labels"][i] != IGNORE_INDEX]
        r_lab = b["rejected_labels"][i][b["rejected_labels"][i] != IGNORE_INDEX]
        assert tokenizer.decode(c_lab).endswith(IM_END) and tokenizer.decode(r_lab).endswith(IM_END)
        assert tokenizer.decode(c_lab) != tokenizer.decode(r_lab)
        # same prompt on both sides
        c_ids = b["chosen_input_ids"][i]
        prompt = c_ids[: int((b["chosen_labels"][i] != IGNORE_INDEX).nonzero()[0])]
        assert torch.equal(b["rejected_input_ids"][i][: len(prompt)], prompt)
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert len(data.eval_batches()) == 2


def test_grpo_prompts_are_left_padded(tmp_path, tokenizer):
    data = build_stage_data(make_recipe(tmp_path), "grpo", tokenizer)
    b = data.train_batch(0)
    assert set(b) == {"prompt_input_ids", "prompt_attention_mask", "prompts", "answers"}
    assert b["answers"] == [""] * 4  # chatterbot prompts carry no reference answer
    ids, mask = b["prompt_input_ids"], b["prompt_attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 4 and (mask[:, -1] == 1).all()
    for row, m, msgs in zip(ids, mask, b["prompts"]):
        text = tokenizer.decode(row[m == 1])
        assert text.endswith("<|im_start|>assistant\n") and msgs[-1]["content"] in text
        assert (row[m == 0] == tokenizer.pad_token_id).all()


def test_tokenisation_is_cached_under_the_run_dir(tmp_path, tokenizer):
    rec = make_recipe(tmp_path)
    first = build_stage_data(rec, "sft", tokenizer)
    cache = Path(rec["output_dir"]) / "cache" / "tokens"  # the chat token store (llmlab.data.chat_store)
    stores = sorted(p.name for p in cache.glob("chat-*") if p.is_dir())
    assert len(stores) == 2  # train + eval
    again = build_stage_data(rec, "sft", tokenizer)
    assert sorted(p.name for p in cache.glob("chat-*") if p.is_dir()) == stores
    assert torch.equal(first.train_batch(4)["input_ids"], again.train_batch(4)["input_ids"])
    rec["stages"]["sft"]["seq_len"] = 96
    build_stage_data(rec, "sft", tokenizer)
    # examples are stored whole: other sequence settings read the same stores
    assert sorted(p.name for p in cache.glob("chat-*") if p.is_dir()) == stores
    build_stage_data(rec, "grpo", tokenizer)  # prompts: a chat store of their own (no eval split), no Arrow cache
    assert len([p for p in cache.glob("chat-*") if p.is_dir() and p.name not in stores]) == 1
    assert not list((Path(rec["output_dir"]) / "cache").glob("*.arrow"))


def test_text_data_cannot_feed_sft(tmp_path, tokenizer):
    rec = make_recipe(tmp_path)
    rec["stages"]["sft"]["datasets"] = {"bible": 1.0}
    with pytest.raises(ValueError, match="datasets.bible: text data cannot be used"):
        build_stage_data(rec, "sft", tokenizer)


def test_conversations_and_pairs_feed_other_stage_types(tmp_path, tokenizer):
    rec = make_recipe(tmp_path)
    rec["stages"]["grpo"]["datasets"] = {"chat": 1.0}        # conversation -> its prompt
    rec["stages"]["sft"]["datasets"] = {"chat_pairs": 1.0}   # preference -> prompt + chosen
    g = build_stage_data(rec, "grpo", tokenizer).train_batch(0)
    for msgs in g["prompts"]:
        assert msgs[-1]["role"] == "user"
    assert all(g["answers"])  # a conversation's last reply is its prompt's reference answer
    s = build_stage_data(rec, "sft", tokenizer)
    b = s.train_batch(0)
    assert (b["labels"] != IGNORE_INDEX).any(dim=1).all()


def test_edited_local_data_is_not_served_from_a_stale_cache(tmp_path, tokenizer):
    import json

    path = tmp_path / "chat.jsonl"

    def write(reply):
        rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                              {"role": "assistant", "content": f"{reply} {i}."}]} for i in range(20)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    rec = make_recipe(tmp_path)
    rec["datasets"]["local"] = {"path": str(path)}
    rec["stages"]["sft"]["datasets"] = {"local": 1.0}
    write("Yes")
    first = build_stage_data(rec, "sft", tokenizer).train_batch(0)
    write("No")  # same number of rows, different content
    second = build_stage_data(rec, "sft", tokenizer).train_batch(0)
    labels = lambda b: tokenizer.decode(b["labels"][0][b["labels"][0] != IGNORE_INDEX])  # noqa: E731
    assert labels(first).startswith("Yes") and labels(second).startswith("No")


def _word_file(path: Path, word: str, n: int, family: str) -> str:
    import json

    if family == "sft":
        rows = [{"messages": [{"role": "user", "content": f"{word} question {i}?"},
                              {"role": "assistant", "content": f"{word} answer {i}."}]} for i in range(n)]
    else:
        rows = [{"text": f"{word} text number {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("family", ["sft", "pretrain"])
def test_eval_datasets_follow_their_weights(tmp_path, tokenizer, family):
    """eval_datasets {alpha: 3, beta: 1}: the held-out batches hold alpha and beta 3:1, whatever
    the datasets' sizes (beta is the larger), not one dataset's rows after the other's."""
    rec = make_recipe(tmp_path)
    for word, n in (("alpha", 300), ("beta", 600)):
        rec["datasets"][word] = {"path": _word_file(tmp_path / f"{word}.jsonl", word, n, family)}
    stage = rec["stages"][family]
    stage["eval_datasets"] = {"alpha": 3, "beta": 1}
    stage["eval_steps"] = 1000
    data = build_stage_data(rec, family, tokenizer)
    text = tokenizer.decode(torch.cat([b["input_ids"].flatten() for b in data.eval_batches()]))
    a, b = text.count("alpha"), text.count("beta")
    assert a + b > 350
    assert abs(a / (a + b) - 0.75) < 0.05, (a, b)


def test_drops_are_announced_with_the_seq_len_that_keeps_them_and_too_many_fail(tmp_path, tokenizer, caplog):
    rec = make_recipe(tmp_path)
    rec["stages"]["sft"]["seq_len"] = 48
    with pytest.raises(ValueError, match=r"datasets\.chat \(train\): dropped \d+ of \d+ examples at tokenisation: "
                                         r"\d+ longer than seq_len 48 \(seq_len \d+ would keep them, or truncation: "
                                         r"truncate\).*more than the stage's max_dropped_fraction 0\.5"):
        build_stage_data(rec, "sft", tokenizer)
    rec["stages"]["sft"]["max_dropped_fraction"] = 1.0
    with caplog.at_level("WARNING", logger="llmlab"):
        data = build_stage_data(rec, "sft", tokenizer)
    said = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert any(m.startswith("datasets.chat (train): dropped") for m in said), said
    train = next(m for m in said if m.startswith("datasets.chat (train): dropped"))  # not the bad-row warning
    needed = int(re.search(r"seq_len (\d+) would keep them", train).group(1))
    rec["stages"]["sft"]["seq_len"] = needed  # the announced length keeps every example
    kept = build_stage_data(rec, "sft", tokenizer)
    assert "too_long" not in kept.dropped["chat"] and kept.num_train_examples > data.num_train_examples


def test_local_sft_data_stays_memory_mapped(tmp_path, tokenizer):
    """Conversations from local files are normalised, filtered, split and tokenised into Arrow files
    that the stage reads memory-mapped, not loaded into RAM (issue 13 item 6)."""
    import json

    from datasets.table import MemoryMappedTable

    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Question {i % 700}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(1000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = make_recipe(tmp_path)
    rec["datasets"]["local"] = {"path": str(path), "eval_split": 0.1, "filters": {"dedup": "exact"}}
    rec["stages"]["sft"]["datasets"] = {"local": 1.0}
    data = build_stage_data(rec, "sft", tokenizer)
    from llmlab.data.sources import load_named_dataset

    loaded = load_named_dataset(rec, "local")  # the canonical rows before tokenisation, too
    assert isinstance(loaded.train.data, MemoryMappedTable) and isinstance(loaded.eval.data, MemoryMappedTable)
    store = data._train.parts[0].store  # the tokens: the chat token store's memory maps
    assert isinstance(store._array(0, "input_ids"), np.memmap) and isinstance(store._array(0, "input_labels"), np.memmap)
    assert str(store.path).startswith(str(tmp_path / "run" / "cache"))
    assert 850 <= data.num_train_examples <= 950  # the same prompt (i % 700) is never on both sides
    assert data.train_batch(0)["input_ids"].shape[0] == 8


@pytest.mark.parametrize("name,eot", [("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>"),
                                      ("mistral", "<|endoftext|>")])
def test_named_template_sft_and_dpo_train_on_replies_and_their_end_of_turn(tmp_path, name, eot):
    """A recipe's named template, end to end: its tokens become special tokens of the trained
    tokenizer, SFT labels exactly the replies + the template's end-of-turn token, DPO the completion."""
    from llmlab.data.tokenizer import build_tokenizer

    rec = make_recipe(tmp_path)
    rec["tokenizer"]["chat_template"] = name
    tok = build_tokenizer(rec, tmp_path / "tok")
    assert len(tok) == 1024  # the template's tokens are inside vocab_size
    rec["stages"]["sft"]["seq_len"] = 512
    rows = build_stage_data(rec, "sft", tok)._train
    idx = next(i for i, ids in enumerate(rows["input_ids"]) if "borrow a cup of sugar" in tok.decode(ids))
    ids, labels = rows[idx]["input_ids"], rows[idx]["labels"]
    assistant = ["Hi", "I am doing well.", "Yes it is.", "Yes, I have a question.",
                 "Could I borrow a cup of sugar?", "Thank you anyway"]
    assert tok.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX]) == "".join(a + eot for a in assistant)
    b = build_stage_data(rec, "dpo", tok).train_batch(0)
    for i in range(b["chosen_input_ids"].shape[0]):
        c_lab = b["chosen_labels"][i][b["chosen_labels"][i] != IGNORE_INDEX]
        assert tok.decode(c_lab).endswith(eot) and tok.decode(c_lab).count(eot) == 1
