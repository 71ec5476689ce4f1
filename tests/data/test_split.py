"""One held-out split of prompts for a whole recipe, and one row filter for loaded and streamed
datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmlab.data.sources import load_named_dataset, prompt_key

U, A = "user", "assistant"
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _m(role, content):
    return {"role": role, "content": content}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prefixes(msgs):
    """The prompts a conversation trains a reply to: every prefix ending before an assistant turn."""
    return {json.dumps(msgs[:i]) for i, m in enumerate(msgs) if m["role"] == A}


def test_a_prompt_is_on_the_same_side_in_conversations_and_pairs_cut_from_them(tmp_path):
    # 300 dialogues, a third of them two exchanges long; pairs are cut at every assistant turn (so a
    # long dialogue gives a pair whose prompt is only its first turn) and written in the hh-rlhf
    # layout with other spacing and case, prompt rows as plain strings
    convs, pairs, prompts = [], [], []
    for i in range(300):
        msgs = [_m(U, f"Question number {i}?"), _m(A, f"Answer {i}.")]
        if i % 3 == 0:
            msgs += [_m(U, f"And then {i}?"), _m(A, f"Then {i}.")]
        convs.append({"messages": msgs})
        for j, m in enumerate(msgs):
            if m["role"] == A:
                dialogue = "".join(f"\n\n{'Human' if t['role'] == U else 'Assistant'}: {t['content']}"
                                   for t in msgs[:j])
                dialogue = dialogue.replace(f"Question number {i}?", f"  question   NUMBER {i}? ")
                pairs.append({"chosen": dialogue + f"\n\nAssistant: {m['content']}",
                              "rejected": dialogue + "\n\nAssistant: Nonsense."})
        prompts.append({"prompt": f"Question number {i}?"})
    rec = {"seed": 3, "output_dir": str(tmp_path / "run"), "datasets": {
        "c": {"path": _write_jsonl(tmp_path / "c.jsonl", convs), "eval_split": 0.3},
        "p": {"path": _write_jsonl(tmp_path / "p.jsonl", pairs), "eval_split": 0.3},
        "q": {"path": _write_jsonl(tmp_path / "q.jsonl", prompts), "eval_split": 0.3}}}
    c, p, q = (load_named_dataset(rec, n) for n in "cpq")
    assert len(p.train) + len(p.eval) == 400 and 60 < len(c.eval) < 120

    def number(msgs):
        return int(msgs[0]["content"].split()[-1].rstrip("?"))

    held = {number(r["messages"]) for r in c.eval.to_list()}
    trained = {number(r["messages"]) for r in c.train.to_list()}
    assert held and trained and not held & trained
    for split, want in ((p.eval, held), (p.train, trained)):
        got = {number(r["prompt"]) for r in split.to_list()}
        assert got == want  # every pair on its dialogue's side, the first-turn pairs of long ones too
    assert {number(r["prompt"]) for r in q.eval.to_list()} == held
    # the reply to a held-out pair's prompt is trained on by no conversation
    sft_prompts = set().union(*(_prefixes(r["messages"]) for r in c.train.to_list()))
    canon = {json.dumps(r["prompt"]).casefold() for r in p.eval.to_list()}
    assert not any(k.casefold() in canon for k in sft_prompts)


def test_the_quickstart_trains_neither_stage_on_the_others_held_out_prompts():
    from llmlab.recipe.api import load_recipe_or_raise

    rec = load_recipe_or_raise(RECIPES / "quickstart.yaml")
    chat, pairs = load_named_dataset(rec, "chat"), load_named_dataset(rec, "chat_pairs")
    sft_train = set().union(*(_prefixes(r["messages"]) for r in chat.train.to_list()))
    sft_eval = set().union(*(_prefixes(r["messages"]) for r in chat.eval.to_list()))
    dpo_eval = {json.dumps(x) for x in pairs.eval["prompt"]}
    dpo_train = {json.dumps(x) for x in pairs.train["prompt"]}
    assert len(dpo_eval) > 50 and len(sft_eval) > 50
    assert not dpo_eval & sft_train  # before: 70 of DPO's 71 held-out prompts were SFT-trained
    assert not sft_eval & dpo_train
    assert dpo_eval <= sft_eval  # a held-out pair's prompt is a held-out conversation's prompt


def test_lower_fractions_hold_out_a_subset_of_higher_ones():
    def held(frac):
        s = load_named_dataset({"seed": 5, "datasets": {"c": {"builtin": "chatterbot", "eval_split": frac}}}, "c")
        return {prompt_key(r, "conversation") for r in s.eval.to_list()}

    small, large = held(0.05), held(0.2)
    assert small and small < large and len(large) > 2 * len(small)


def test_a_fraction_that_holds_out_nothing_is_an_error(tmp_path):
    rec = {"seed": 0, "output_dir": str(tmp_path / "run"), "datasets": {
        "t": {"path": _write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(3)]),
              "eval_split": 0.001}}}
    with pytest.raises(ValueError, match=r"datasets\.t\.eval_split: 0\.001 holds out none of the 3 rows"):
        load_named_dataset(rec, "t")


# -- the validate warning ------------------------------------------------------------------------

_HEAD = """name: r
tokenizer: {train: {datasets: [bible], vocab_size: 300}}
model: {arch: transformer, d_model: 32, n_layers: 1, n_heads: 2, d_ff: 64, max_seq_len: 64}
datasets:
  bible: {builtin: kjv, eval_split: 0.02}
"""


def _recipe(tmp_path, datasets: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(_HEAD + datasets + "stages:\n  sft: {type: sft, datasets: {chat: 1}, max_steps: 1}\n")
    return path


def test_validate_warns_when_datasets_sharing_prompts_hold_out_different_fractions(tmp_path, capsys):
    from llmlab.recipe.api import load_recipe
    from llmlab.recipe.cli_support import validate_command

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    path = _recipe(tmp_path, "  chat: {builtin: chatterbot, eval_split: 0.05}\n"
                             "  chat_pairs: {builtin: chatterbot_pairs, eval_split: 0.1}\n"
                             "  prompts: {builtin: chatterbot_prompts, eval_split: 0.05}\n"
                             "  one: {path: a.jsonl, eval_split: 0.1}\n"
                             "  two: {path: ./a.jsonl}\n")
    warnings: list = []
    resolved, errors = load_recipe(path, warnings=warnings)
    assert errors == [] and resolved is not None  # a warning, not an error
    got = {(w.path, w.line): w.message for w in warnings}
    assert set(got) == {("datasets.chat_pairs.eval_split", path.read_text().splitlines().index(
        "  chat_pairs: {builtin: chatterbot_pairs, eval_split: 0.1}") + 1),
        ("datasets.one.eval_split", path.read_text().splitlines().index("  one: {path: a.jsonl, eval_split: 0.1}") + 1)}
    chatter = got[next(k for k in got if "chat_pairs" in k[0])]
    for key in ("datasets.chat.eval_split=0.05", "datasets.chat_pairs.eval_split=0.1",
                "datasets.prompts.eval_split=0.05"):
        assert key in chatter
    assert "bible" not in chatter and "datasets.two.eval_split=0" in got[next(k for k in got if "one" in k[0])]
    assert validate_command([path], [], "text") == 0
    assert "warning: datasets.chat_pairs.eval_split:" in capsys.readouterr().out
    same = _recipe(tmp_path, "  chat: {builtin: chatterbot, eval_split: 0.1}\n"
                             "  chat_pairs: {builtin: chatterbot_pairs, eval_split: 0.1}\n")
    warnings = []
    assert load_recipe(same, warnings=warnings)[1] == [] and warnings == []


# -- fingerprints --------------------------------------------------------------------------------

def test_the_split_rule_is_in_the_fingerprints_of_held_out_datasets_only(monkeypatch, tmp_path):
    from llmlab import fingerprint
    from llmlab.data import store

    rec = {"seed": 1, "datasets": {"h": {"builtin": "chatterbot", "eval_split": 0.1},
                                   "h2": {"builtin": "chatterbot", "eval_split": 0.1},
                                   "w": {"builtin": "chatterbot"}}}

    def fps():
        return {n: (fingerprint.source_fingerprint(rec["datasets"][n]), store.source_fingerprint(rec, n))
                for n in ("h", "w")}

    before = fps()
    assert store.source_fingerprint(rec, "h2") == before["h"][1]  # no dataset name: a shared store
    monkeypatch.setattr(fingerprint, "EVAL_SPLIT_RULE", fingerprint.EVAL_SPLIT_RULE + 1)
    monkeypatch.setattr(store, "EVAL_SPLIT_RULE", fingerprint.EVAL_SPLIT_RULE)
    after = fps()
    assert after["h"][0] != before["h"][0] and after["h"][1] != before["h"][1]
    assert after["w"] == before["w"]


# -- one filter for loaded and streamed rows -----------------------------------------------------

@pytest.mark.parametrize("fmt", ["text", "messages"])
def test_filters_and_split_give_the_same_rows_and_counts_loaded_and_streamed(tmp_path, fmt):
    from llmlab.data.formats import convert_kind
    from llmlab.data.store import stream_texts, streamable

    texts = [f"Line {i} of a corpus with some words." for i in range(300)]
    texts += texts[:40] + ["tiny"] * 3 + ["long " * 40] + [f"Line {i} of a corpus with some words." for i in range(5)]
    if fmt == "text":
        rows = [{"text": t} for t in texts] + [{"text": ""}]
    else:
        rows = [{"messages": [_m(U, t), _m(A, f"reply {len(t) % 7}")]} for t in texts]
        rows += [{"messages": [_m(U, "no reply")]}]
    spec = {"path": _write_jsonl(tmp_path / "d.jsonl", rows), "format": fmt, "eval_split": 0.2,
            "filters": {"dedup": "exact", "min_length": 15, "max_length": 150}}
    rec = {"seed": 9, "output_dir": str(tmp_path / "run"), "datasets": {"d": spec}}
    assert streamable(spec)  # a local file with eval_split is streamed into its token stores
    loaded = load_named_dataset(rec, "d")
    kind = loaded.kind
    assert loaded.dropped == {"bad": 1, "min_length": 3, "max_length": 1, "dedup_exact": 45}
    for split in ("train", "eval"):
        info: dict = {}
        streamed = list(stream_texts(rec, "d", info, split))
        rows_ = getattr(loaded, split).to_list()
        assert streamed == [convert_kind(r, kind, "text")["text"] for r in rows_] and streamed
        assert info["dropped"] == loaded.dropped and info["rows_read"] == loaded.num_raw
