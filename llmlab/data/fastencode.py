"""Fast, exact document encoding for pretraining: memoised pieces over the Rust tokenizer.

A byte-level BPE tokenizer with GPT-2's pre-tokenizer regex (``ByteLevel(use_regex=True,
add_prefix_space=False)``, no normaliser; llmlab's trained tokenizers, GPT-2, GPT-NeoX, Pythia,
OLMo, ...) splits text into pre-tokens that never cross a space followed by a non-space
character: every alternative of the pattern
``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`` either starts
a new pre-token at such a space (the three ``" ?"`` alternatives) or, for a run of whitespace,
stops one character before it (``\\s+(?!\\S)``). The token ids of a document are therefore the
concatenation of the ids of its *pieces*, the substrings between those positions, each encoded on
its own. Natural text has few distinct pieces (the 1,189 chapters of the King James Bible, 1.0 M
tokens, have 29 k), so :class:`PieceEncoder` encodes each distinct piece once, with the Rust
tokenizer itself, and assembles documents by a vectorised gather. The result is identical to
``tokenizer(text, add_special_tokens=False)`` (tested on the real corpus and on adversarial
whitespace, unicode, digits and special-token text); tokenizers that do not meet the conditions
(:func:`supports_piece_cache`) are encoded by the batched Rust call instead.

The same idea is the word cache inside tokenizers' BPE model and tiktoken's piece cache; here it
also skips the per-document ``Encoding`` objects and the regex pass over repeated text.
"""

from __future__ import annotations

import re
import weakref

import numpy as np

#: a split point: the position of a space followed by a non-whitespace character
_SPLIT = re.compile(r"(?= \S)")
#: a space that is not a split point (followed by whitespace or the end)
_BAD_SPACE = re.compile(r" (?!\S)")
MAX_PIECES = 2_000_000  # distinct pieces kept; beyond it the cache starts over (memory bound)


def supports_piece_cache(tokenizer) -> bool:
    """Whether :class:`PieceEncoder` is exact for ``tokenizer``.

    True for a fast tokenizer whose backend has no normaliser, a ``ByteLevel`` pre-tokenizer with
    GPT-2's regex and no prefix space, a deterministic model (no BPE dropout), and added tokens
    that neither contain a space nor strip whitespace around them.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "eos_token_id", None) is None:
        return False
    pre = backend.pre_tokenizer
    if backend.normalizer is not None or type(pre).__name__ != "ByteLevel":
        return False
    if getattr(pre, "add_prefix_space", True) or not getattr(pre, "use_regex", False):
        return False
    if type(backend.model).__name__ != "BPE" or backend.model.dropout:
        return False
    for t in backend.get_added_tokens_decoder().values():
        if t.lstrip or t.rstrip or t.single_word or " " in t.content:
            return False
    return True


class PieceEncoder:
    """Encode documents to token ids through a cache of distinct pieces (see the module docstring).

    Args:
        tokenizer: a ``PreTrainedTokenizerFast`` for which :func:`supports_piece_cache` holds
            (checked: ``ValueError`` otherwise).

    The cache lives as long as the encoder; keep one encoder per stage preparation.
    """

    def __init__(self, tokenizer):
        if not supports_piece_cache(tokenizer):
            raise ValueError("this tokenizer's pre-tokenizer is not GPT-2 byte-level BPE; "
                             "use llmlab.data.pipeline.encode_texts")
        self._backend = tokenizer.backend_tokenizer
        self._sep = tokenizer.eos_token
        self._sep_id = tokenizer.eos_token_id
        added = sorted({t.content for t in self._backend.get_added_tokens_decoder().values()}, key=len,
                       reverse=True)
        self._special = re.compile("|".join(map(re.escape, added))) if added else None
        self._reset()

    def _reset(self) -> None:
        self._first: dict[str, int] = {}          # a document's first piece -> piece id
        self._rest: dict[str, int] = {}           # a later piece, without its leading space -> id
        self._n_pieces = 0
        self._flat = np.zeros(0, np.int32)       # the pieces' ids, concatenated in piece-id order
        self._starts = np.zeros(0, np.int64)     # where each piece's ids start in _flat
        self._piece_lens = np.zeros(0, np.int64)  # how many ids each piece has

    def encode(self, texts: list[str], append_id: int | None = None, *,
               plain: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of ``texts`` (no special tokens added), as a flat stream with offsets.

        Args:
            texts: B documents.
            append_id: a token id appended to every document (e.g. EOS), or None.
            plain: the caller knows that no text holds an added token's content (the segments
                :class:`ChatEncoder` cut at them): the per-text search for one is skipped.

        Returns:
            ``(ids, offsets)``: int32 [L] and int64 [B + 1]; document b is
            ``ids[offsets[b]:offsets[b + 1]]``, equal to
            ``tokenizer(texts[b], add_special_tokens=False)["input_ids"]`` (+ ``append_id``).
        """
        if len(self._first) + len(self._rest) > MAX_PIECES:
            self._reset()
        # Every document is cut before each space followed by a non-whitespace character. For
        # a document without a space before whitespace (nearly all natural text), that is
        # str.split(" "), with the space kept off the keys of the pieces after the first; other
        # documents go through the regex, and those holding an added token's text stay whole.
        first_dict, rest_dict, new = self._first, self._rest, []
        firsts: list[str] = []
        rest: list[str] = []
        n_parts: list[int] = []
        special = None if plain else self._special
        for text in texts:
            if special is not None and special.search(text) is not None:
                # an added token splits the text before pre-tokenisation, and a space before it
                # ends the previous segment: such a document is one piece, encoded whole
                parts = [text]
            elif _BAD_SPACE.search(text) is None:
                parts = text.split(" ")
            else:
                parts = _SPLIT.split(text)
                parts[1:] = [p[1:] for p in parts[1:]]
            firsts.append(parts[0])
            rest.extend(parts[1:])
            n_parts.append(len(parts))
        counts = np.asarray(n_parts, dtype=np.int64)
        try:
            rest_uid = np.fromiter(map(rest_dict.__getitem__, rest), dtype=np.int64, count=len(rest))
        except KeyError:  # unseen pieces: number them in order of first appearance
            for p in dict.fromkeys(rest):
                if p not in rest_dict:
                    rest_dict[p] = self._n_pieces + len(new)
                    new.append(" " + p)
            rest_uid = np.fromiter(map(rest_dict.__getitem__, rest), dtype=np.int64, count=len(rest))
        first_uid = []
        for p in firsts:
            u = first_dict.get(p)
            if u is None:
                u = first_dict[p] = self._n_pieces + len(new)
                new.append(p)
            first_uid.append(u)
        is_first = np.zeros(int(counts.sum()), dtype=bool)
        is_first[np.cumsum(counts) - counts] = True
        uid = np.empty(is_first.size, dtype=np.int64)
        uid[is_first] = first_uid
        uid[~is_first] = rest_uid
        if new:
            self._add(new)
        lens = self._piece_lens[uid]
        ends = np.concatenate([[0], np.cumsum(lens)])  # token offset of each piece in the output
        # output token t of piece i comes from _flat[starts[uid_i] + (t - ends[i])]
        gather = np.repeat(self._starts[uid] - ends[:-1], lens) + np.arange(int(ends[-1]))
        ids = self._flat[gather]
        doc_end = ends[np.cumsum(counts)]  # token offset where each document ends
        if append_id is not None:
            ids = np.insert(ids, doc_end, np.int32(append_id))
            doc_end = doc_end + np.arange(1, len(texts) + 1)
        offsets = np.concatenate([[0], doc_end]).astype(np.int64)
        return ids.astype(np.int32, copy=False), offsets

    def _add(self, pieces: list[str]) -> None:
        """Encode new distinct pieces: joined by the EOS token, which the tokenizer splits on
        before pre-tokenising, so each piece is encoded exactly as on its own; a few long strings
        instead of one ``Encoding`` object per piece, in parallel across cores."""
        n_chunks = max(1, min(16, len(pieces) // 2000))
        k = -(-len(pieces) // n_chunks)
        chunks = [self._sep.join(pieces[i:i + k]) + self._sep for i in range(0, len(pieces), k)]
        encs = self._backend.encode_batch_fast(chunks, add_special_tokens=False)
        flat = np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encs])
        seps = np.flatnonzero(flat == self._sep_id)
        if len(seps) != len(pieces):  # a piece holds the EOS text itself: encode one by one
            encs = self._backend.encode_batch_fast(pieces, add_special_tokens=False)
            lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(pieces))
            flat = np.fromiter((i for e in encs for i in e.ids), dtype=np.int32, count=int(lens.sum()))
        else:
            lens = np.diff(seps, prepend=-1) - 1
            flat = np.delete(flat, seps)
        base = self._flat.size
        self._starts = np.concatenate([self._starts, base + np.cumsum(lens) - lens])
        self._piece_lens = np.concatenate([self._piece_lens, lens])
        self._flat = np.concatenate([self._flat, flat])
        self._n_pieces += len(pieces)


_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def encode_flat(tokenizer, texts: list[str], append_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` (no special tokens added, ``append_id`` after each) as a flat stream.

    Uses a :class:`PieceEncoder` (one per tokenizer, its cache kept across calls) when
    :func:`supports_piece_cache` holds, else the tokenizer's batched Rust ``encode_batch_fast``
    (or ``tokenizer(texts)``). Same ids either way.

    Returns:
        ``(ids, offsets)``: int32 [L] and int64 [B + 1]; document b is ``ids[offsets[b]:offsets[b+1]]``.
    """
    enc = _ENCODERS.get(tokenizer)
    if enc is None and tokenizer not in _ENCODERS:
        enc = PieceEncoder(tokenizer) if supports_piece_cache(tokenizer) else None
        _ENCODERS[tokenizer] = enc
    if enc is not None:
        return enc.encode(texts, append_id)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    rows = [e.ids for e in fast(texts, add_special_tokens=False)] if fast is not None \
        else tokenizer(texts, add_special_tokens=False)["input_ids"]
    if append_id is not None:
        rows = [list(r) + [append_id] for r in rows]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    ids = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
    return ids, offsets


class ChatEncoder:
    """Token ids *and* character offsets of rendered chat texts, exactly as the Rust tokenizer's
    ``encode_batch`` gives them, through the piece cache (:class:`PieceEncoder`).

    A chat text holds added tokens (``<|im_start|>``, ...). The tokenizer cuts them out before
    pre-tokenising (they neither strip whitespace nor contain a space: :func:`supports_piece_cache`),
    so each text between two of them is encoded on its own: the ids of a text are those of its
    segments (piece-cached) with the added tokens' ids between. The offsets follow from the ids: a
    byte-level BPE token stands for as many bytes of the text as its vocabulary string has
    characters (an added token: its content's UTF-8 bytes), the tokens cover the text's bytes in
    order, and a token's character offsets are those of its first and last byte's characters (a
    character split over two tokens is in both, as the Rust tokenizer's offsets have it).

    Args:
        tokenizer: anything with ``backend_tokenizer``, ``eos_token`` and ``eos_token_id`` for which
            :func:`supports_piece_cache` holds (``ValueError`` otherwise).
    """

    def __init__(self, tokenizer):
        self._pieces = PieceEncoder(tokenizer)
        backend = tokenizer.backend_tokenizer
        added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._added_id = {c: i for i, c in added.items()}
        alternatives = "|".join(map(re.escape, sorted(self._added_id, key=len, reverse=True)))
        self._split = re.compile(f"({alternatives})") if added else None
        vocab = backend.get_vocab(with_added_tokens=True)
        self._nbytes = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
        for piece, i in vocab.items():
            self._nbytes[i] = len(piece)  # one character of the byte-level alphabet per byte
        for i, content in added.items():
            self._nbytes[i] = len(content.encode("utf-8"))

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(ids, offsets, chars)`` of ``texts``: int32 [L], int64 [B + 1] (text b's tokens are
        ``offsets[b]:offsets[b + 1]``) and int64 [L, 2], each token's [start, end) characters in
        the texts joined (``"".join(texts)``); None when the tokens' bytes do not cover the texts' (a vocabulary that is not
        byte-level after all): the caller encodes them otherwise."""
        segments, items = [], []  # per text, its segment numbers (>= 0) and added ids (-1 - id)
        counts = np.zeros(len(texts), dtype=np.int64)
        for b, text in enumerate(texts):
            parts = self._split.split(text) if self._split is not None else [text]
            before = len(items)
            for k, p in enumerate(parts):
                if k % 2:
                    items.append(-1 - self._added_id[p])
                elif p:
                    items.append(len(segments))
                    segments.append(p)
            counts[b] = len(items) - before
        seg_ids, seg_off = self._pieces.encode(segments, plain=True)
        it = np.asarray(items, dtype=np.int64)
        is_seg = it >= 0
        # every item's ids gathered from seg_ids followed by the added ids (one per added item)
        source = np.concatenate([seg_ids, (-1 - it[~is_seg]).astype(np.int32)])
        start = np.empty(it.size, dtype=np.int64)
        start[is_seg] = seg_off[it[is_seg]]
        start[~is_seg] = seg_ids.size + np.arange(int((~is_seg).sum()))
        length = np.where(is_seg, np.diff(seg_off)[np.where(is_seg, it, 0)] if segments else 0, 1)
        item_end = np.cumsum(length)
        ids = source[np.repeat(start - (item_end - length), length) + np.arange(int(item_end[-1]) if it.size else 0)]
        ids = ids.astype(np.int32, copy=False)
        offsets = np.concatenate([[0], item_end[np.cumsum(counts) - 1]]) if it.size else np.zeros(len(texts) + 1, np.int64)
        offsets[1:][counts == 0] = 0
        offsets = np.maximum.accumulate(offsets)  # a text without items ends where the previous one did
        joined = "".join(texts)
        raw = joined.encode("utf-8")
        nbytes = self._nbytes[ids]
        ends = np.cumsum(nbytes)
        if ids.size and (ends[-1] != len(raw) or (nbytes == 0).any()):
            return None
        if len(raw) == len(joined):  # ASCII: a byte is a character
            chars = np.stack([ends - nbytes, ends], axis=1) if ids.size else np.zeros((0, 2), np.int64)
        else:
            char_of_byte = np.cumsum((np.frombuffer(raw, np.uint8) & 0xC0) != 0x80) - 1
            chars = np.stack([char_of_byte[ends - nbytes], char_of_byte[ends - 1] + 1], axis=1) \
                if ids.size else np.zeros((0, 2), np.int64)
        return ids, offsets.astype(np.int64), chars


_CHAT_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def chat_encoder(tokenizer) -> ChatEncoder | None:
    """The :class:`ChatEncoder` of ``tokenizer`` (one per tokenizer, its cache kept across calls),
    or None where :func:`supports_piece_cache` does not hold."""
    if tokenizer not in _CHAT_ENCODERS:
        _CHAT_ENCODERS[tokenizer] = ChatEncoder(tokenizer) if supports_piece_cache(tokenizer) else None
    return _CHAT_ENCODERS[tokenizer]
