"""Sources and formats: the built-in real data, every format from local files, bad rows, filters
and the held-out split."""

from __future__ import annotations

import json

import pytest

from llmlab.data.sources import chatterbot_conversations, load_named_dataset

U, A = "user", "assistant"


def _m(role, content):
    return {"role": role, "content": content}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _load(tmp_path, spec, name="d", seed=0):
    return load_named_dataset({"seed": seed, "output_dir": str(tmp_path / "run"),
                               "datasets": {name: spec}}, name)


# -- built-ins -----------------------------------------------------------------------------------

def test_kjv_is_one_document_per_chapter():
    s = load_named_dataset({"seed": 0, "datasets": {"b": {"builtin": "kjv"}}}, "b")
    assert s.kind == "text" and len(s.train) == 1189  # chapters of the KJV
    assert s.train[0]["text"].startswith("In the beginning God created the heaven and the earth. And")
    assert s.train[0]["text"].endswith("And the evening and the morning were the sixth day.")
    assert s.train[len(s.train) - 1]["text"].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def test_chatterbot_alternative_replies_become_separate_conversations():
    rows, bad = chatterbot_conversations()
    by_q = {}
    for r in rows:
        by_q.setdefault(r["messages"][0]["content"], []).append(r["messages"])
    # ai.yml lists "Are you sentient?" three times with one reply each; emotion.yml lists
    # "You are arrogant" once with four alternative replies: both give one pair per reply.
    sentient = [c for c in by_q["Are you sentient?"] if len(c) == 2]
    assert len(sentient) == 3 and all(c[1]["role"] == A for c in sentient)
    arrogant = by_q["You are arrogant"]
    assert len(arrogant) == 4 and all(len(c) == 2 for c in arrogant)
    assert {c[1]["content"] for c in arrogant} >= {"Arrogance is not one of my emotions.",
                                                   "I am terse.  There is a difference."}
    # conversations.yml is a real dialogue: turns alternate, ending with the assistant
    sugar = [c for c in by_q["Hello"] if len(c) > 2]
    # 13 turns: the trailing user turn ("No problem") is dropped
    assert any(c[-1]["content"] == "Thank you anyway" and len(c) == 12 for c in sugar)
    for c in sugar:
        assert [m["role"] for m in c] == [U, A] * (len(c) // 2)
    # a malformed list in trivia.yml is reported, not trained on
    assert len(bad) == 1 and "trivia.yml" in bad[0][0]


def test_chatterbot_pairs_reject_a_reply_to_another_question():
    s = load_named_dataset({"seed": 3, "datasets": {"p": {"builtin": "chatterbot_pairs"}}}, "p")
    rows = s.train.to_list()
    assert len(rows) > 1000
    replies = {}
    for r in rows:
        replies.setdefault(r["prompt"][-1]["content"].lower(), set()).add(r["chosen"][0]["content"])
    for r in rows:
        assert r["rejected"][0]["content"] not in replies[r["prompt"][-1]["content"].lower()]
    again = load_named_dataset({"seed": 3, "datasets": {"q": {"builtin": "chatterbot_pairs"}}}, "q")
    assert again.train.to_list() == rows  # seeded
    other = load_named_dataset({"seed": 4, "datasets": {"p": {"builtin": "chatterbot_pairs"}}}, "p")
    assert other.train["rejected"] != s.train["rejected"]


def _replies_by_file() -> dict[str, set[str]]:
    """Oracle read straight from the corpus files: reply text -> the files it is a reply in."""
    import yaml

    from llmlab.data.sources import ALTERNATING_FILES, _package_dir

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    files: dict[str, set[str]] = {}
    for path in root.glob("*.yml"):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            if isinstance(conv, list) and all(isinstance(t, str) for t in conv):
                turns = [t.strip() for t in conv]
                replies = turns[1::2] if path.name in ALTERNATING_FILES else turns[1:]
                for reply in replies:
                    files.setdefault(reply, set()).add(path.name)
    return files


def test_chatterbot_pairs_follow_their_two_documented_rules():
    """Each distinct (prompt, reply) gives one off-topic pair (the rejected reply comes from another
    topic file) and, for replies of 4+ words, one pair rejecting the reply's words shuffled."""
    from llmlab.data.sources import SHUFFLE_MIN_WORDS, chatterbot_pairs

    rows, _ = chatterbot_pairs(7)
    files = _replies_by_file()
    kinds: dict[str, list[str]] = {}
    for r in rows:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        key = json.dumps([r["prompt"], chosen])
        if sorted(rejected.split()) == sorted(chosen.split()):
            assert rejected != chosen and len(chosen.split()) >= SHUFFLE_MIN_WORDS
            kinds.setdefault(key, []).append("shuffled")
        else:
            assert files[rejected] - files[chosen], (chosen, rejected)  # some other topic's reply
            kinds.setdefault(key, []).append("off_topic")
    convs, _ = chatterbot_conversations()
    expected = {}
    for c in convs:
        for i, m in enumerate(c["messages"]):
            if m["role"] == A:
                words = m["content"].split()
                shuffle = len(words) >= SHUFFLE_MIN_WORDS and len(set(words)) > 1
                expected[json.dumps([c["messages"][:i], m["content"]])] = ["off_topic"] + ["shuffled"] * shuffle
    assert kinds == expected
    shuffled = sum(k.count("shuffled") for k in kinds.values())
    assert 0.3 * len(rows) < shuffled < 0.5 * len(rows)  # both kinds are a large share
    assert chatterbot_pairs(7)[0] == rows  # seeded


def test_eval_split_is_deterministic_and_held_out_by_prompt():
    from llmlab.data.sources import prompt_key

    rec = {"seed": 11, "datasets": {"p": {"builtin": "chatterbot_pairs", "eval_split": 0.1}}}
    s = load_named_dataset(rec, "p")
    train_keys = {prompt_key(r, "preference") for r in s.train.to_list()}
    eval_keys = {prompt_key(r, "preference") for r in s.eval.to_list()}
    assert not train_keys & eval_keys  # a prompt (its opening user turn) is on one side only
    # about 10 % of the prompts, within 4 standard errors of a Binomial draw (rows vary more:
    # a prompt's pairs go together)
    n = len(train_keys | eval_keys)
    assert abs(len(eval_keys) - 0.1 * n) <= 4 * (n * 0.1 * 0.9) ** 0.5
    rec2 = {"seed": 11, "datasets": {"p": {"builtin": "chatterbot_pairs", "eval_split": 0.1,
                                           "max_bad_fraction": 0.02}}}  # new spec: not memoised
    assert load_named_dataset(rec2, "p").eval.to_list() == s.eval.to_list()
    rec3 = {"seed": 12, "datasets": {"p": {"builtin": "chatterbot_pairs", "eval_split": 0.1}}}
    assert load_named_dataset(rec3, "p").eval.to_list() != s.eval.to_list()  # the seed draws it


# -- every format from a local jsonl -------------------------------------------------------------

FORMATS = {
    "text": ([{"text": "In the beginning."}, {"text": "And the earth."}], "text"),
    "messages": ([{"messages": [_m(U, "Hi"), _m(A, "Hello")]},
                  {"messages": [_m("system", "Be brief."), _m(U, "Q"), _m(A, "R")]}], "conversation"),
    "sharegpt": ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
                  {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "R"}]}],
                 "conversation"),
    "alpaca": ([{"instruction": "Add", "input": "2 and 2", "output": "4"},
                {"instruction": "Greet", "input": "", "output": "Hello"}], "conversation"),
    "alpaca_response": ([{"instruction": "Add 2 and 2", "response": "4"},
                         {"instruction": "Greet", "response": "Hello"}], "conversation"),
    "prompt_completion": ([{"prompt": "Hi", "completion": "Hello"},
                           {"prompt": [_m(U, "Q")], "completion": [_m(A, "R")]}], "conversation"),
    "preference_strings": ([{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
                            {"prompt": "Q", "chosen": "R", "rejected": "S"}], "preference"),
    "preference_messages": ([{"prompt": [_m(U, "Hi")], "chosen": [_m(U, "Hi"), _m(A, "Hello")],
                              "rejected": [_m(U, "Hi"), _m(A, "Go away")]},
                             {"prompt": [_m(U, "Q")], "chosen": [_m(A, "R")], "rejected": [_m(A, "S")]}],
                            "preference"),
    "hh_rlhf": ([{"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
                  "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: No idea."},
                 {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
                  "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}], "preference"),
    "prompt": ([{"prompt": "Tell me a joke"}, {"prompt": [_m(U, "Why?")], "answer": 42}], "prompt"),
}


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("explicit", [False, True])
def test_every_format_loads_from_local_jsonl(tmp_path, name, explicit):
    rows, kind = FORMATS[name]
    path = _write_jsonl(tmp_path / f"{name}.jsonl", rows)
    fmt = {"alpaca_response": "alpaca", "preference_strings": "preference",
           "preference_messages": "preference", "hh_rlhf": "preference"}.get(name, name)
    spec = {"path": path, **({"format": fmt} if explicit else {})}
    s = _load(tmp_path, spec, name=f"{name}_{explicit}")
    assert s.format == fmt and s.kind == kind and len(s.train) == 2 and s.num_bad == 0
    out = s.train.to_list()
    if name == "alpaca":
        assert out[0]["messages"] == [_m(U, "Add\n\n2 and 2"), _m(A, "4")]
        assert out[1]["messages"] == [_m(U, "Greet"), _m(A, "Hello")]
    if name == "sharegpt":
        assert out[0]["messages"] == [_m(U, "Hi"), _m(A, "Hello")]
    if name == "preference_messages":  # the prompt repeated inside chosen/rejected is stripped
        assert out[0] == {"prompt": [_m(U, "Hi")], "chosen": [_m(A, "Hello")], "rejected": [_m(A, "Go away")]}
    if name == "hh_rlhf":  # the shared prefix up to the last human turn is the prompt
        assert out[0]["prompt"] == [_m(U, "What is 2+2?"), _m(A, "4."), _m(U, "And 3+3?")]
        assert out[0]["chosen"] == [_m(A, "6.")] and out[0]["rejected"] == [_m(A, "No idea.")]
    if name == "prompt":  # a reference answer is kept as a string; none is ""
        assert out == [{"prompt": [_m(U, "Tell me a joke")], "answer": ""},
                       {"prompt": [_m(U, "Why?")], "answer": "42"}]


def test_columns_mapping(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "Hi", "good_answer": "Hello", "bad_answer": "No", "prompt": "ignored"}] * 3)
    s = _load(tmp_path, {"path": path, "columns": {"prompt": "question", "chosen": "good_answer",
                                                   "rejected": "bad_answer"}})
    assert s.format == "preference"
    assert s.train[0] == {"prompt": [_m(U, "Hi")], "chosen": [_m(A, "Hello")], "rejected": [_m(A, "No")]}


@pytest.mark.parametrize("ext", ["csv", "parquet", "txt", "json"])
def test_other_file_types_directories_and_globs(tmp_path, ext):
    import pandas as pd

    d = tmp_path / "data"
    d.mkdir()
    texts = [f"Verse number {i}. And it was so." for i in range(6)]
    for part in range(2):
        chunk = texts[part * 3:(part + 1) * 3]
        f = d / f"part{part}.{ext}"
        if ext == "csv":
            pd.DataFrame({"text": chunk}).to_csv(f, index=False)
        elif ext == "parquet":
            pd.DataFrame({"text": chunk}).to_parquet(f)
        elif ext == "json":
            f.write_text(json.dumps([{"text": t} for t in chunk]))
        else:
            f.write_text("\n\n".join(chunk))  # one document per paragraph
    for spec_path in (str(d), str(d / f"*.{ext}")):
        s = _load(tmp_path, {"path": spec_path}, name=f"{ext}{len(spec_path)}")
        assert sorted(s.train["text"]) == sorted(texts)
    one = _load(tmp_path, {"path": str(d / f"part0.{ext}")}, name=f"{ext}_one")
    assert one.train["text"] == texts[:3]


def test_missing_path_names_the_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"datasets\.d\.path: .*no such file"):
        _load(tmp_path, {"path": str(tmp_path / "nope.jsonl")})


# -- bad rows ------------------------------------------------------------------------------------

def _real_conversations(n):
    rows, _ = chatterbot_conversations()
    return [{"messages": r["messages"]} for r in rows[:n]]


def test_bad_rows_are_dropped_and_counted(tmp_path):
    rows = _real_conversations(300)
    rows[7] = {"messages": [_m(U, "Hi"), _m(A, "  ")]}                  # empty content
    rows[100] = {"messages": [_m(A, "Hello"), _m(U, "Hi")]}              # wrong role order
    rows[200] = {"messages": [_m(U, "Hi"), {"role": "assistant", "content": 5}]}  # not a string
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    s = _load(tmp_path, {"path": path, "max_bad_fraction": 0.02})
    assert s.num_bad == 3 and len(s.train) == 297 and s.dropped["bad"] == 3
    assert [r for r, _ in s.bad_rows] == [7, 100, 200]
    assert "empty" in s.bad_rows[0][1] and "'user'" in s.bad_rows[1][1]


def test_too_many_bad_rows_fail_naming_dataset_row_and_problem(tmp_path):
    rows = _real_conversations(100)
    rows[3] = {"messages": [_m(U, "Hi")]}     # no assistant turn: line 4, "row 4" (counted from 1)
    rows[50] = {"text": "no messages"}        # missing field
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(ValueError, match=r"datasets\.mychat: 2 of 100 rows are bad .*"
                                         r"max_bad_fraction 0\.01.*row 4: .*ends with a 'user' turn"):
        _load(tmp_path, {"path": path, "format": "messages"}, name="mychat")


# -- filters -------------------------------------------------------------------------------------

def test_filters_on_real_data():
    base = {"builtin": "chatterbot"}
    plain = load_named_dataset({"seed": 0, "datasets": {"c": base}}, "c")
    exact = load_named_dataset({"seed": 0, "datasets": {"c": {**base, "filters": {"dedup": "exact"}}}}, "c")
    # tech_support.yml repeats many (question, reply) pairs verbatim
    assert exact.filtered["dedup_exact"] > 500
    assert len(exact.train) == len(plain.train) - exact.filtered["dedup_exact"]
    assert len({json.dumps(m) for m in exact.train["messages"]}) == len(exact.train)
    near = load_named_dataset({"seed": 0, "datasets": {"c": {**base, "filters": {
        "dedup": "minhash", "minhash_threshold": 0.5}}}}, "c")
    assert near.filtered["dedup_minhash"] > 0 and len(near.train) < len(exact.train)
    lengths = load_named_dataset({"seed": 0, "datasets": {"c": {**base, "filters": {
        "min_length": 20, "max_length": 400}}}}, "c")
    assert lengths.filtered["min_length"] > 0 and lengths.filtered["max_length"] > 0
    for msgs in lengths.train["messages"]:
        assert 20 <= len("\n".join(m["content"] for m in msgs)) <= 400


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_source_path_with_a_local_dataset_repo(tmp_path, streaming):
    # `hub:` goes through datasets.load_dataset; a local dataset directory exercises the same
    # code (split, streaming, max_samples) without the network.
    repo = tmp_path / "repo"
    repo.mkdir()
    _write_jsonl(repo / "train.jsonl", [{"instruction": f"Say {i}", "output": str(i)} for i in range(10)])
    s = _load(tmp_path, {"hub": str(repo), "split": "train", "streaming": streaming, "max_samples": 4},
              name=f"hub{streaming}")
    assert s.format == "alpaca" and len(s.train) == 4
    assert s.train[3]["messages"] == [_m(U, "Say 3"), _m(A, "3")]


def test_a_streamed_hub_dataset_goes_to_an_arrow_file_not_a_list(tmp_path):
    # max_samples rows of a stream are written to a memory-mapped Arrow file of the run's cache
    # (a million conversations need not fit in RAM), the same rows in the same order
    from llmlab.data.sources import _load_hub

    repo = tmp_path / "repo"
    repo.mkdir()
    _write_jsonl(repo / "train.jsonl", [{"instruction": f"Say {i}", "output": str(i)} for i in range(50)])
    recipe = {"output_dir": str(tmp_path / "run")}
    ds = _load_hub({"hub": str(repo), "split": "train", "streaming": True, "max_samples": 30}, recipe)
    assert ds.cache_files and all(f["filename"].startswith(str(tmp_path / "run" / "cache")) for f in ds.cache_files)
    assert ds["instruction"] == [f"Say {i}" for i in range(30)]
    again = _load_hub({"hub": str(repo), "split": "train", "streaming": True, "max_samples": 30}, recipe)
    assert again.cache_files == ds.cache_files  # the same key reuses the file


# -- generated, verifiable problems --------------------------------------------------------------

def test_arithmetic_is_seeded_complete_and_correct():
    import re

    from llmlab.data.sources import ARITHMETIC_TERMS, arithmetic_problems

    a, b, c = arithmetic_problems(3), arithmetic_problems(3), arithmetic_problems(4)
    assert a == b and a != c  # a pure function of the seed
    assert len(a) == 10 ** ARITHMETIC_TERMS
    prompts = [r["messages"][0]["content"] for r in a]
    assert len(set(prompts)) == len(a) and sorted(prompts) == sorted(r["messages"][0]["content"] for r in c)
    for r in a:
        (user, reply) = r["messages"]
        assert user["role"] == U and reply["role"] == A
        terms = re.fullmatch(r"What is (\d(?: \+ \d)*)\?", user["content"]).group(1).split(" + ")
        assert len(terms) == ARITHMETIC_TERMS and reply["content"] == str(sum(map(int, terms)))


def test_arithmetic_as_prompts_carries_the_answer_and_holds_out_the_same_problems(tmp_path, tokenizer):
    """One dataset feeds SFT (conversations) and GRPO (prompt + answer): the problems held out from
    one are held out from the other, and a prompt's answer is its conversation's reply."""
    from llmlab.data.pipeline import build_stage_data
    from tests.data.conftest import make_recipe

    rec = make_recipe(tmp_path)
    rec["datasets"]["arith"] = {"builtin": "arithmetic", "format": "messages", "eval_split": 0.05}
    rec["stages"]["sft"].update(datasets={"arith": 1.0}, seq_len=64, eval_steps=100, batch_size=32)
    rec["stages"]["grpo"].update(datasets={"arith": 1.0}, seq_len=64, eval_steps=100, batch_size=32,
                                 max_new_tokens=4)
    splits = load_named_dataset(rec, "arith")
    # each problem is its own prompt: 5 % of 10,000 within 4 standard errors of a Binomial draw
    assert abs(len(splits.eval) - 500) <= 4 * (10_000 * 0.05 * 0.95) ** 0.5
    assert len(splits.eval) + len(splits.train) == 10_000
    train_q = {r["messages"][0]["content"] for r in splits.train.to_list()}
    eval_rows = splits.eval.to_list()
    assert not any(r["messages"][0]["content"] in train_q for r in eval_rows)
    grpo = build_stage_data(rec, "grpo", tokenizer)
    seen = []
    for b in grpo.eval_batches():
        for prompt, answer in zip(b["prompts"], b["answers"]):
            q = prompt[-1]["content"]
            assert q not in train_q and answer == str(sum(int(t) for t in q[8:-1].split(" + ")))
            seen.append(q)
    assert sorted(seen) == sorted(r["messages"][0]["content"] for r in eval_rows)  # every held-out problem
    train_batch = grpo.train_batch(0)
    assert all(p[-1]["content"] in train_q for p in train_batch["prompts"])
    assert len(train_batch["answers"]) == 32 and all(a.isdigit() for a in train_batch["answers"])


def test_a_builtin_revision_changes_that_builtins_fingerprints_only(monkeypatch):
    """Rows of a builtin that change for the same package version must not reuse old runs or caches."""
    from llmlab import fingerprint
    from llmlab.data import store

    rec = {"seed": 1, "datasets": {"p": {"builtin": "chatterbot_pairs"}, "k": {"builtin": "kjv"}}}

    def fps():
        return {n: (fingerprint.source_fingerprint(rec["datasets"][n]), store.source_fingerprint(rec, n)) for n in "pk"}

    before = fps()
    revisions = fingerprint.BUILTIN_REVISION
    monkeypatch.setitem(revisions, "chatterbot_pairs", revisions["chatterbot_pairs"] + 1)
    after = fps()
    assert after["p"][0] != before["p"][0] and after["p"][1] != before["p"][1]
    assert after["k"] == before["k"]
