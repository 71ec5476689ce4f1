"""The trained tokenizer: frozen, hashed, deterministic, with a ChatML template that marks the
assistant tokens."""

from __future__ import annotations

import json

import pytest

from llmlab.data.tokenizer import (EOS_TOKEN, HASH_FILE, IM_END, IM_START, PAD_TOKEN,
                                   build_tokenizer, load_tokenizer, tokenizer_hash)
from tests.data.conftest import make_recipe


def test_training_twice_gives_the_same_hash(tmp_path):
    rec = make_recipe(tmp_path)
    build_tokenizer(rec, tmp_path / "a")
    build_tokenizer(rec, tmp_path / "b")
    h = tokenizer_hash(tmp_path / "a")
    assert h == tokenizer_hash(tmp_path / "b")
    assert (tmp_path / "a" / HASH_FILE).read_text().strip() == h
    # byte-identical files, not just the same digest by accident
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_hash_changes_with_the_training_data(tmp_path):
    rec = make_recipe(tmp_path)
    build_tokenizer(rec, tmp_path / "a")
    rec["tokenizer"]["train"]["max_documents"] = 100
    build_tokenizer(rec, tmp_path / "b")
    assert tokenizer_hash(tmp_path / "a") != tokenizer_hash(tmp_path / "b")


def test_special_tokens_vocab_and_round_trip(tokenizer):
    assert len(tokenizer) == 1024
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    for t in (IM_START, IM_END):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, t  # never split
    text = "And God said, Let there be light: and there was light. (ünïcode ✓)"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless


def test_chat_template_marks_assistant_content_and_im_end(tokenizer):
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
            {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Well."}]
    enc = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == f"Hi there{IM_END}Well.{IM_END}"
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{IM_START}user\nHello{IM_END}\n{IM_START}assistant\n"


def test_frozen_tokenizer_is_reused_and_tampering_is_detected(tmp_path):
    rec = make_recipe(tmp_path)
    d = tmp_path / "tok"
    build_tokenizer(rec, d)
    h = tokenizer_hash(d)
    tok = load_tokenizer(d)
    assert tok.chat_template and len(tok) == 1024
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["pad_token"] = EOS_TOKEN
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="changed since they were frozen"):
        load_tokenizer(d)
    assert tokenizer_hash(d) != h


def test_vocab_too_small_is_an_error(tmp_path):
    rec = make_recipe(tmp_path)
    rec["tokenizer"]["train"]["vocab_size"] = 200
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(rec, tmp_path / "tok")


def test_vocab_coverage_check(tokenizer):
    from llmlab.data.tokenizer import check_vocab_covers

    check_vocab_covers(tokenizer, 1024)
    check_vocab_covers(tokenizer, 1088)  # padded tables are fine
    with pytest.raises(ValueError, match="1000 rows does not cover the tokenizer's 1024 tokens"):
        check_vocab_covers(tokenizer, 1000)
