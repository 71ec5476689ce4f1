"""The piece-cached encoder gives exactly the tokenizer's own ids, and knows when it may not be used."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llmlab.data.fastencode import PieceEncoder, supports_piece_cache
from llmlab.data.pipeline import encode_documents
from llmlab.data.sources import kjv_chapters

# characters and fragments around which byte-level pre-tokenisation has special cases: runs of
# spaces and other whitespace, contractions, digits, non-Latin letters, emoji, special tokens
ALPHABET = [" ", "  ", "   ", "\n", "\t", "\r\n", "\u00a0", "\u3000", "a", "B", "é", "ß", "中", "ы",
            "1", "23", "456", "'s", "'ll", "'", "!", ".", ",", "😀", "’", "<|endoftext|>",
            "<|im_start|>", "x y", " 's", "-", "__"]


def _reference(tokenizer, texts, append_id=None):
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        out.append(ids + ([append_id] if append_id is not None else []))
    return out


def _split(ids, offsets):
    return [ids[offsets[b]:offsets[b + 1]].tolist() for b in range(len(offsets) - 1)]


def test_trained_tokenizer_qualifies(tokenizer):
    assert supports_piece_cache(tokenizer)


def test_real_corpus_identical_to_tokenizer(tokenizer):
    """Every chapter of the King James Bible, and the same chapters again from a warm cache."""
    texts = [r["text"] for r in kjv_chapters()][:400]
    enc = PieceEncoder(tokenizer)
    eos = tokenizer.eos_token_id
    ref = _reference(tokenizer, texts, eos)
    for _ in range(2):
        ids, offsets = enc.encode(texts, append_id=eos)
        assert ids.dtype == np.int32 and offsets.shape == (len(texts) + 1,)
        assert _split(ids, offsets) == ref


def _adversarial(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30))) for _ in range(n)]
    return texts + ["", " ", "  a", "a  ", "a ", "\n\n a", " <|endoftext|> x", "x\n  y", "\t a", "a \n"]


@pytest.fixture(scope="module")
def whitespace_tokenizer():
    """A byte-level BPE trained on the adversarial text itself, so that its merges join
    whitespace runs ("\n ", "  ", "\t ") — the cases a wrong split would get wrong."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_adversarial(3000, seed=1), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    vocab = tok.get_vocab()
    assert {"ĊĠ", "ĠĠ", "ĉĠ"} <= set(vocab)  # merges across whitespace kinds exist
    return tok


@pytest.mark.parametrize("which", ["kjv", "whitespace"])
def test_adversarial_text_identical_to_tokenizer(tokenizer, whitespace_tokenizer, which):
    tokenizer = tokenizer if which == "kjv" else whitespace_tokenizer
    texts = _adversarial(2000, seed=0)
    enc = PieceEncoder(tokenizer)
    # in two batches, so the second one mixes cached and new pieces
    half = len(texts) // 2
    got = _split(*enc.encode(texts[:half])) + _split(*enc.encode(texts[half:]))
    assert got == _reference(tokenizer, texts)


def test_eos_text_inside_new_pieces_falls_back(tokenizer):
    """A piece that contains the EOS text itself cannot be encoded EOS-joined; still exact."""
    texts = ["a<|endoftext|>b c<|endoftext|>", "<|endoftext|>", "plain words here"]
    assert _split(*PieceEncoder(tokenizer).encode(texts)) == _reference(tokenizer, texts)


def _variant(tokenizer, tmp_path, edit):
    """A copy of ``tokenizer`` with its backend changed by ``edit(backend)``."""
    from transformers import PreTrainedTokenizerFast

    tokenizer.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    edit(tok.backend_tokenizer)
    return tok


@pytest.mark.parametrize("edit", ["prefix_space", "normalizer", "metaspace", "lstrip_token"])
def test_unsupported_tokenizers_use_the_general_path(tokenizer, tmp_path, edit):
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    def change(backend):
        if edit == "prefix_space":
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
        elif edit == "normalizer":
            backend.normalizer = normalizers.Lowercase()
        elif edit == "metaspace":
            backend.pre_tokenizer = pre_tokenizers.Metaspace()
        else:
            backend.add_special_tokens([AddedToken("<mask>", lstrip=True)])

    tok = _variant(tokenizer, tmp_path, change)
    assert not supports_piece_cache(tok)
    with pytest.raises(ValueError, match="pre-tokenizer"):
        PieceEncoder(tok)
    texts = ["In the beginning  God <mask> created", " the heaven\nand the earth."]
    got = encode_documents(tok, texts, tok.eos_token_id).to_pylist()
    assert got == _reference(tok, texts, tok.eos_token_id)


def test_encode_documents_arrow_rows(tokenizer):
    texts = ["In the beginning", "", "God created the heaven and the earth."]
    arr = encode_documents(tokenizer, texts, tokenizer.eos_token_id)
    assert str(arr.type) == "list<item: int32>"
    assert arr.to_pylist() == _reference(tokenizer, texts, tokenizer.eos_token_id)
