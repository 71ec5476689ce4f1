"""The chat token store: SFT, preference and prompt data tokenised once, on disk, memory-mapped.

One store holds one split (train | eval) of one named dataset tokenised for one stage *family*
(:data:`llmlab.data.pipeline.STAGE_FAMILY`: ``sft``, ``pair``, ``unpaired_preference`` or
``prompt``) with one
tokenizer and chat template, every example whole (no seq_len applied)::

    <root>/<key>/manifest.json                   written last: the store is complete when it exists
    <root>/<key>/shard-00000.<seq>_ids.npy       token ids (uint16 when the vocabulary fits, else uint32)
    <root>/<key>/shard-00000.<seq>_labels.npy    uint8 [tokens]: 1 where the token is a label
    <root>/<key>/shard-00000.<seq>_offsets.npy   int64 [examples + 1]: example j is ids[offsets[j]:offsets[j+1]]
    <root>/<key>/shard-00000.<seq>_info.npy      int32 [examples, 3]: labels, [start, end) of the last
                                                 run of assistant tokens (sft truncation keeps it whole)
    <root>/<key>/shard-00000.desirable.npy       uint8 [examples] (unpaired_preference only)
    <root>/<key>/shard-00000.json                the shard's counts and sha256s, written after its arrays
    <root>/<key>/shard-00000.verified            the last check of the shard's content (see Trust)

``<seq>`` is ``input`` (sft, unpaired_preference) or ``chosen`` and ``rejected`` (pair). A prompt
store (grpo, ppo) holds ``prompt_ids`` and ``prompt_offsets`` (each prompt rendered with the
template's generation prompt, no labels or info) and ``record_bytes`` / ``record_offsets``: each
row's ``[prompt messages, reference answer]`` as JSON, what the stage's batches and reward
functions read besides the ids. Labels
are exactly those of ``llmlab.data.pipeline``'s tokenisers: every assistant token of the
conversation (sft), the tokens of the completion's assistant turns (the last k runs of
assistant tokens, pair and unpaired). What a stage's ``seq_len``, ``truncation`` and held-out rule
drop or cut is decided when a stage opens the store (:func:`tokenised_part`), from the per-example
lengths and ``info``: a store is shared by every stage, run and recipe with the same data,
tokenizer and template, whatever their sequence settings.

**Key.** sha256 of (:data:`CHAT_STORE_VERSION`, :func:`source_identity` of the dataset, the
tokenizer's fingerprint (:func:`llmlab.data.pipeline.tokenizer_fingerprint`: its JSON, chat
template, eos and pad ids), the family and the split). **Root**: the token store's
(:func:`llmlab.data.store.store_root`).

**Writing** (:func:`ensure_chat_store` for loaded rows, :func:`build_streamed` for a streamable
source's train and eval stores at once): this process only reads the canonical rows (streamed
where the source allows, so a first run never holds the dataset) and hands shards of
:data:`SHARD_EXAMPLES` rows to a pool of spawned worker processes (:func:`_init_chat_worker`: they
die with their parent), once it has written the first :data:`LOCAL_SHARDS` itself (a worker's
start costs about a shard's CPU time). A worker renders each
conversation once with the chat template (:class:`ChatTemplate`: from the skeletons of
:mod:`llmlab.data.chat_render`, verified against Jinja, where the template allows), with
its generation spans, tokenises the texts through the piece cache
(:class:`llmlab.data.fastencode.ChatEncoder`: the Rust tokenizer's ids and character offsets; the
batched Rust ``encode_batch`` for other tokenizers) and flags the tokens that overlap a span; each
shard's arrays are written as ``*.tmp`` and renamed, its JSON last, into ``<key>.partial``, renamed
to ``<key>`` once the manifest is written. A killed build resumes at the first missing shard; a
concurrent builder waits on ``<key>.lock``.

**Trust**, as the token store's (:mod:`llmlab.data.store`): each shard is checked the first time a
process reads it (sizes, sha256s, ids below the manifest's ``vocab_size``), a passing check leaves
``shard-NNNNN.verified`` so later processes trust an unchanged shard after a ``stat``; the writer
checks its store once. A damaged store stops with an error naming the store, the file and the
commands that delete and rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.schemafile import top_level

log = logging.getLogger(__name__)

CHAT_STORE_VERSION = "2"  # 2: manifest.json records vocab_size; shards checked on first read
#: examples per shard (a pure function of the rows, so a resumed build cuts the same shards)
SHARD_EXAMPLES = 8192
#: shards a build writes in its own process before starting worker processes (see ``_ShardPool``)
LOCAL_SHARDS = 3
#: stage family -> the token sequences of one example
SEQUENCES = {"sft": ("input",), "pair": ("chosen", "rejected"), "unpaired_preference": ("input",),
             "prompt": ("prompt",)}
#: the label of a token that is not trained on (torch's cross-entropy ``ignore_index``)
IGNORE_INDEX = -100


def require_chat_template(tokenizer) -> None:
    """Raise ValueError (naming the stage types and the templates to choose from) when the
    tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        from llmlab.chat_templates import choices_message

        raise ValueError("the tokenizer has no chat template (tokenizer.chat_template: none, or a "
                         "pretrained tokenizer without one); sft, dpo, orpo, kto, reward, grpo and "
                         f"ppo stages need one: {choices_message()}")


# -- keys ----------------------------------------------------------------------------------------

def source_identity(recipe: dict, name: str) -> str:
    """The content identity of dataset ``name``'s canonical rows: its source's one identity
    (:meth:`llmlab.data.source.DatasetSource.identity`: the content fingerprint stage fingerprints,
    the pretraining token store and the tokenised-Arrow cache hash too, plus the recipe seed where
    it draws the rows: the held-out split, chatterbot_pairs' rejected replies)."""
    from llmlab.data.sources import recipe_source
    from llmlab.fingerprint import sha256_json

    return sha256_json(recipe_source(recipe, name).identity(int(top_level(recipe, "seed"))))


def chat_store_path(recipe: dict, name: str, family: str, split: str, tok_hash: str) -> Path:
    """The folder of the store of ``split`` of dataset ``name`` tokenised for ``family``."""
    from llmlab.data.store import store_root

    blob = json.dumps({"v": CHAT_STORE_VERSION, "src": source_identity(recipe, name), "tok": tok_hash,
                       "family": family, "split": split}, sort_keys=True)
    return store_root(recipe) / ("chat-" + hashlib.sha256(blob.encode()).hexdigest()[:32])


# -- reading -------------------------------------------------------------------------------------

class ChatStore:
    """A complete chat store, memory-mapped (layout: the module docstring), never trusted blindly:
    each shard is checked the first time this process reads it, as the token store's are
    (:func:`llmlab.data.store.check_shard_content`: sizes against the manifest, then the sha256 of
    every file and every id below the vocabulary unless the shard's verification record
    ``shard-NNNNN.verified`` vouches for the files as they are; the writer leaves those records).

    Attributes:
        path: the folder. manifest: its ``manifest.json``. examples: how many. sequences: the
        sequence names of one example. vocab_size: the tokenizer's ids.

    Raises:
        llmlab.data.store.StoreError: naming the store folder, the file, what is wrong and the
            commands that delete and rebuild it: no or an unreadable manifest; on a shard's first
            read, a file missing, unreadable or of another size than the manifest's, bytes whose
            sha256 differs, or an id at or above the vocabulary size.
    """

    def __init__(self, path: str | os.PathLike):
        from llmlab.data.store import StoreError, incomplete_store_error, rebuild_hint

        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise incomplete_store_error(self.path)
        try:
            self.manifest = json.loads(mf.read_text())
            self.examples = int(self.manifest["examples"])
            self.sequences = tuple(SEQUENCES[self.manifest["family"]])
            self.vocab_size = int(self.manifest["vocab_size"])
            counts = [s["examples"] for s in self.manifest["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{mf}: not a chat token store manifest ({type(e).__name__}: {e}); "
                             f"{rebuild_hint(self.path)}") from None
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._checked: set[int] = set()
        self._desirable: np.ndarray | None = None
        try:  # the folder's mtime is its last use (`llmlab cache --prune` removes stores unused for long)
            os.utime(self.path)
        except OSError:  # a read-only store root
            pass

    def _damaged(self, file: str, what: str):
        from llmlab.data.store import damaged_store_error

        return damaged_store_error(self.path, self.manifest, file, what, "chat token store")

    def _files(self, shard: int) -> dict[str, Path]:
        """Shard ``shard``'s files by array name."""
        return {k: self.path / f for k, f in self.manifest["shards"][shard]["files"].items()}

    def _map(self, shard: int) -> None:
        """Memory-map every file of ``shard`` and check its length against the manifest."""
        meta = self.manifest["shards"][shard]
        for name, f in self._files(shard).items():
            try:
                arr = np.load(f, mmap_mode="r")
            except FileNotFoundError:
                raise self._damaged(f.name, "shard file missing") from None
            except (ValueError, EOFError, OSError) as e:  # empty, truncated, or an overwritten header
                raise self._damaged(f.name, f"not a readable shard (empty or truncated: {e})") from None
            if arr.shape[0] != meta["sizes"][name]:
                raise self._damaged(f.name, f"holds {arr.shape[0]} entries, manifest.json says {meta['sizes'][name]}")
            self._maps[(shard, name)] = arr

    def _check(self, shard: int, force: bool) -> None:
        """Map ``shard`` and check its content (:func:`llmlab.data.store.check_shard_content`)."""
        from llmlab.data.store import check_shard_content

        self._map(shard)
        meta = self.manifest["shards"][shard]
        flat = {"index": meta["index"], **{f"{k}_sha256": v for k, v in meta["sha256"].items()}}
        ids = {k: self._maps[(shard, k)] for k in meta["files"] if k.endswith("_ids")}
        check_shard_content(self.path, flat, self._files(shard), ids, self.vocab_size, self._damaged, force)
        self._checked.add(shard)

    def _array(self, shard: int, name: str) -> np.ndarray:
        if shard not in self._checked:
            self._check(shard, force=False)
        return self._maps[(shard, name)]

    def check(self) -> None:
        """Check every shard as its first read does (cheap for shards a record vouches for).

        Raises:
            llmlab.data.store.StoreError: as the class says, for the first damaged shard.
        """
        for i in range(len(self.manifest["shards"])):
            self._array(i, next(iter(self.manifest["shards"][i]["files"])))

    def verify(self) -> None:
        """Check every shard's sizes, sha256s and ids whatever its verification record says.

        Raises:
            llmlab.data.store.StoreError: naming the first damaged file.
        """
        for i in range(len(self.manifest["shards"])):
            self._check(i, force=True)

    def _whole(self, name: str) -> np.ndarray:
        parts = [np.asarray(self._array(i, name)) for i in range(len(self.manifest["shards"]))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def lengths(self, seq: str) -> np.ndarray:
        """Tokens of sequence ``seq`` of every example: int64 [examples]."""
        parts = [np.diff(np.asarray(self._array(i, f"{seq}_offsets")))
                 for i in range(len(self.manifest["shards"]))]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def info(self, seq: str) -> np.ndarray:
        """int32 [examples, 3]: labelled tokens, [start, end) of the last run of assistant tokens
        ((0, 0) when there is none)."""
        return self._whole(f"{seq}_info").reshape(-1, 3)

    def desirable(self) -> np.ndarray:
        """uint8 [examples]: the unpaired rows' labels (unpaired_preference stores only; read once)."""
        if self._desirable is None:
            self._desirable = self._whole("desirable")
        return self._desirable

    def _span(self, name: str, j: int) -> tuple[int, int, int]:
        """(shard, start, end) of example ``j`` in the arrays ``<name>_offsets`` index."""
        s = int(np.searchsorted(self._first, j, side="right")) - 1
        k = j - int(self._first[s])
        off = self._array(s, f"{name}_offsets")
        return s, int(off[k]), int(off[k + 1])

    def sequence(self, seq: str, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Example ``j``'s sequence ``seq``: (token ids int64 [T], label flags bool [T])."""
        s, lo, hi = self._span(seq, j)
        return (np.asarray(self._array(s, f"{seq}_ids")[lo:hi], dtype=np.int64),
                np.asarray(self._array(s, f"{seq}_labels")[lo:hi], dtype=bool))

    def ids(self, seq: str, j: int) -> np.ndarray:
        """Example ``j``'s token ids of sequence ``seq``: int64 [T] (prompt stores have no labels)."""
        s, lo, hi = self._span(seq, j)
        return np.asarray(self._array(s, f"{seq}_ids")[lo:hi], dtype=np.int64)

    def record(self, j: int) -> Any:
        """Example ``j``'s canonical record (prompt stores: ``[prompt messages, answer]``), decoded
        from its JSON bytes in ``record_bytes``."""
        s, lo, hi = self._span("record", j)
        return json.loads(bytes(self._array(s, "record_bytes")[lo:hi]))


@dataclass
class ChatPart:
    """One dataset split as a stage sees it: the kept examples of a store (in store order), the
    tokens cut from the left of each (sft truncation) and the stage's source number."""

    store: ChatStore
    keep: np.ndarray  # int64 [n]: store example of each kept example
    cut: np.ndarray   # int64 [n]
    source: int

    def __len__(self) -> int:
        return int(self.keep.size)

    def index_dataset(self, part: int):
        """A ``datasets.Dataset`` of (``_part``, ``_row``): what mixing needs of this part (its
        length), so the stage's mixture is drawn by the same ``datasets`` functions as ever."""
        from datasets import Dataset

        return Dataset.from_dict({"_part": np.full(len(self), part, dtype=np.int32),
                                  "_row": np.arange(len(self), dtype=np.int64)})

    def lengths(self) -> np.ndarray:
        """Tokens of each kept example's first sequence as batched: int64 [n]."""
        return self.store.lengths(self.store.sequences[0])[self.keep] - self.cut

    def padded_lengths(self) -> np.ndarray:
        """The width each kept example needs in a padded batch: the longest of its sequences as
        batched (pairs: chosen or rejected), int64 [n]."""
        others = [self.store.lengths(s)[self.keep] for s in self.store.sequences[1:]]
        return np.max([self.lengths(), *others], axis=0)

    def row(self, r: int) -> dict:
        """Kept example ``r`` as the columns of the datasets path (python lists)."""
        j, cut = int(self.keep[r]), int(self.cut[r])
        out: dict[str, Any] = {"_source": self.source}
        family = self.store.manifest["family"]
        if family == "prompt":  # the columns of pipeline._tok_prompt: ids, the messages, the answer
            prompt, answer = self.store.record(j)
            return {**out, "prompt_input_ids": self.store.ids("prompt", j).tolist(), "prompt": prompt,
                    "answer": answer}
        for seq in self.store.sequences:
            ids, flags = self.store.sequence(seq, j)
            ids, flags = ids[cut:], flags[cut:]
            prefix = "" if family != "pair" else f"{seq}_"
            out[f"{prefix}input_ids"] = ids.tolist()
            out[f"{prefix}labels"] = np.where(flags, ids, IGNORE_INDEX).tolist()
        if family == "unpaired_preference":
            out["desirable"] = int(self.store.desirable()[j])
        return out


class ChatExamples:
    """A stage's example sequence over chat-store parts: example i is row ``row[i]`` of part
    ``part[i]``. Stands where the datasets path has a ``datasets.Dataset``: ``len``, ``select``,
    :meth:`take_rows`, and ``ds[column]`` / ``ds[i]`` (whole columns: for tests and small sets)."""

    def __init__(self, parts: list[ChatPart], part: np.ndarray, row: np.ndarray):
        self.parts, self.part, self.row = parts, part.astype(np.int32), row.astype(np.int64)

    @classmethod
    def mixed(cls, parts: list[ChatPart], mixer) -> ChatExamples:
        """The sequence ``mixer`` (list of ``datasets.Dataset`` → one Dataset: the datasets path's
        :func:`~llmlab.data.pipeline.mix` or :func:`~llmlab.data.pipeline.mix_stream`) draws over
        the parts' index datasets."""
        m = mixer([p.index_dataset(i) for i, p in enumerate(parts)]).with_format("arrow")[:]
        return cls(parts, m.column("_part").to_numpy(), m.column("_row").to_numpy())

    def __len__(self) -> int:
        return int(self.part.size)

    def select(self, idx) -> ChatExamples:
        """The examples at ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        return ChatExamples(self.parts, self.part[idx], self.row[idx])

    @property
    def sources(self) -> np.ndarray:
        """The stage's source number of each example: int64 [len]."""
        return np.asarray([p.source for p in self.parts], dtype=np.int64)[self.part]

    def lengths(self) -> np.ndarray:
        """Tokens of each example's first sequence (as batched): int64 [len]."""
        return self._per_example(ChatPart.lengths)

    def padded_lengths(self) -> np.ndarray:
        """The width each example needs in a padded batch (:meth:`ChatPart.padded_lengths`): int64 [len]."""
        return self._per_example(ChatPart.padded_lengths)

    def _per_example(self, per_row) -> np.ndarray:
        """``per_row(part)`` (an int array over a part's kept rows) gathered for each example: int64 [len]."""
        out = np.empty(len(self), dtype=np.int64)
        for i, p in enumerate(self.parts):
            sel = self.part == i
            out[sel] = per_row(p)[self.row[sel]]
        return out

    def take_rows(self, idx: np.ndarray) -> dict[str, list]:
        """Examples ``idx`` as {column: python list}: the columns of the datasets path."""
        rows = [self.parts[int(self.part[i])].row(int(self.row[i])) for i in np.asarray(idx, dtype=np.int64)]
        return {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.take_rows(np.arange(len(self)))[key]
        return {k: v[0] for k, v in self.take_rows(np.asarray([int(key)])).items()}


# -- writing -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template and special tokens: what rendering a conversation needs, free of
    the tokenizer (picklable, so each tokenising worker renders its own shards; transformers
    compiles the template once per process).

    Attributes:
        template: the Jinja source (``tokenizer.get_chat_template()``). special: the tokenizer's
        ``special_tokens_map`` (the template's ``bos_token``, ``eos_token``, ... variables).
    """

    template: str
    special: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, tokenizer) -> ChatTemplate:
        """``tokenizer``'s template.

        Raises:
            ValueError: the tokenizer has no chat template.
        """
        require_chat_template(tokenizer)
        return cls(tokenizer.get_chat_template(None, None), tuple(sorted(tokenizer.special_tokens_map.items())))

    def __reduce__(self):
        """Pickled with this process's verified skeletons (:func:`llmlab.data.chat_render.shipped_state`)."""
        from llmlab.data.chat_render import shipped_state

        return ChatTemplate._with_state, (self.template, self.special, shipped_state(self.template, self.special))

    @staticmethod
    def _with_state(template: str, special: tuple, state: tuple | None) -> ChatTemplate:
        if state is not None:
            from llmlab.data.chat_render import renderer

            renderer(template, special, state)
        return ChatTemplate(template, special)

    def render(self, conversations: list[list[dict]]) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """Each conversation rendered once, as ``tokenizer.apply_chat_template(...,
        return_assistant_tokens_mask=True)`` renders it: the text and the [start, end) character
        spans of its generation blocks (the assistant turns). From per-shape skeletons where the
        template only writes contents out (:mod:`llmlab.data.chat_render`: the same text and
        spans, checked against Jinja's), else by Jinja per conversation."""
        from llmlab.data.chat_render import renderer

        return renderer(self.template, self.special).render(conversations)

    def render_prompts(self, conversations: list[list[dict]]) -> list[str]:
        """Each prompt rendered as ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``
        renders it (the template's opening of the assistant turn appended), by Jinja."""
        from llmlab.data.chat_render import render_by_jinja

        return render_by_jinja(self.template, dict(self.special), conversations, generation_prompt=True)[0]


def _assistant_flags(enc, spans: list[tuple[int, int]]) -> np.ndarray:
    """bool [tokens]: the tokens of the ``tokenizers.Encoding`` ``enc`` that overlap a span (the rule
    of ``apply_chat_template``'s assistant mask), from two character lookups per span."""
    n = len(enc.ids)
    flags = np.zeros(n, dtype=bool)
    for s, e in spans:
        a, b = (enc.char_to_token(s), enc.char_to_token(e - 1)) if e > s else (None, None)
        if a is None or b is None:  # a character no token covers (trimmed offsets), an empty span
            return _flags_from_offsets(np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2), spans)
        while b + 1 < n and enc.token_to_chars(b + 1)[0] < e:  # a character split over several tokens
            b += 1
        flags[a: b + 1] = True
    return flags


def _flags_from_offsets(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """:func:`_assistant_flags` from the tokens' character offsets [tokens, 2]: a token is flagged
    when it ends after the start of the first span that ends after its start."""
    if not spans:
        return np.zeros(len(offsets), dtype=bool)
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    k = np.searchsorted(sp[:, 1], offsets[:, 0], side="right")
    inside = k < len(sp)
    return inside & (offsets[:, 1] > sp[np.minimum(k, len(sp) - 1), 0])


def _encode_sequence(tok, texts: list[str], spans: list, last_k: list[int], dtype: str) -> dict:
    """Tokenise one sequence of a shard's examples: ids, label flags, offsets and info arrays.

    ``tok``: a tokenizer or a worker's :class:`llmlab.data.store._RustTokenizer`. ``last_k[i]`` < 0:
    every assistant token is a label (sft); else the last ``last_k[i]`` runs of assistant tokens
    (the completion's turns: ``pipeline._labels_for_last_spans``). Vectorised over the shard: runs
    of flagged tokens never cross an example's end."""
    n = len(texts)
    ids, offsets, flags = _encoded_flags(tok, texts, spans)
    doc_of = np.repeat(np.arange(n), np.diff(offsets))
    f = np.concatenate([[False], flags, [False]])
    same_left = np.concatenate([[False], doc_of[1:] == doc_of[:-1]])  # token t's left neighbour is in its example
    same_right = np.concatenate([doc_of[:-1] == doc_of[1:], [False]])
    starts = np.flatnonzero(flags & ~(f[:-2] & same_left))
    ends = np.flatnonzero(flags & ~(f[2:] & same_right)) + 1
    run_doc = doc_of[starts]
    per_doc = np.bincount(run_doc, minlength=n)
    from_end = np.cumsum(per_doc)[run_doc] - np.arange(run_doc.size) - 1  # 0: the example's last run
    k = np.asarray(last_k, dtype=np.int64)[run_doc] if n else np.zeros(0, np.int64)
    keep = (k < 0) | (from_end < k)
    starts, ends, run_doc = starts[keep], ends[keep], run_doc[keep]
    delta = np.zeros(ids.size + 1, dtype=np.int64)
    np.add.at(delta, starts, 1)
    np.add.at(delta, ends, -1)
    labels = np.cumsum(delta[:-1]) > 0
    info = np.zeros((n, 3), dtype=np.int32)
    info[:, 0] = np.bincount(run_doc, weights=ends - starts, minlength=n).astype(np.int32) if n else 0
    last = np.full(n, -1, dtype=np.int64)
    last[run_doc] = np.arange(run_doc.size)  # the last kept run of each example (runs are in order)
    has = last >= 0
    info[has, 1] = starts[last[has]] - offsets[:-1][has]
    info[has, 2] = ends[last[has]] - offsets[:-1][has]
    return {"ids": ids.astype(dtype), "labels": labels.astype(np.uint8), "offsets": offsets,
            "info": info.reshape(-1)}


def _encoded_flags(tok, texts: list[str], spans: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The texts' token ids (int64 [L]), token offsets (int64 [n + 1]) and assistant flags (bool
    [L]): through the piece cache (:class:`llmlab.data.fastencode.ChatEncoder`: ids and character
    offsets without one ``Encoding`` object per text) where the tokenizer allows, else the Rust
    ``encode_batch``."""
    from llmlab.data.fastencode import chat_encoder

    enc = chat_encoder(tok)
    got = enc.encode(texts) if enc is not None and texts else None
    if got is None:
        encs = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        offsets = np.concatenate([[0], np.cumsum([len(e.ids) for e in encs])]).astype(np.int64)
        ids = np.fromiter((t for e in encs for t in e.ids), dtype=np.int64, count=int(offsets[-1]))
        flags = [_assistant_flags(e, spans[i]) for i, e in enumerate(encs)]
        return ids, offsets, np.concatenate(flags) if flags else np.zeros(0, dtype=bool)
    ids, offsets, chars = got  # chars: each token's characters in the texts joined
    base = np.concatenate([[0], np.cumsum([len(t) for t in texts])])
    joined = [(s + base[i], e + base[i]) for i, sp in enumerate(spans) for s, e in sp]
    return ids.astype(np.int64), offsets, _flags_from_offsets(chars, joined)


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to turn a shard's canonical rows into arrays (picklable).

    Attributes:
        family: sft | pair | unpaired_preference | prompt. kind_src: the rows' kind; kind_dst: the kind the
        family consumes. name, stage_type: for error messages. dtype: the ids' dtype.
        template: the chat template that renders the rows.
    """

    family: str
    kind_src: str
    kind_dst: str
    name: str
    stage_type: str
    dtype: str
    vocab_size: int
    template: ChatTemplate


def _encode_shard(folder: str, index: int, rows: list[dict], job: ShardJob, tokenizer=None) -> dict:
    """Render and tokenise one shard's canonical ``rows`` and write its arrays atomically (``*.tmp``
    renamed), its JSON last. Runs in a pool worker (:func:`_init_chat_worker`) or in-process.

    Raises:
        ValueError: a row that cannot become ``job.kind_dst`` (naming the dataset and stage type)."""
    from llmlab.data.store import _WORKER, _write_json

    tok = tokenizer if tokenizer is not None else _WORKER["tokenizer"]
    if job.family == "prompt":
        arrays = _prompt_arrays(tok, rows, job)
    else:
        sequences, arrays = _shard_payload(rows, job)
        for seq, (texts, spans, last_k) in sequences.items():
            for k, arr in _encode_sequence(tok, texts, spans, last_k, job.dtype).items():
                arrays[f"{seq}_{k}"] = arr
    stem = f"shard-{index:05d}"
    meta: dict[str, Any] = {"index": index, "examples": len(rows), "files": {}, "sizes": {}, "sha256": {}}
    for name, arr in arrays.items():
        final = Path(folder) / f"{stem}.{name}.npy"
        meta["files"][name], meta["sizes"][name] = final.name, int(arr.shape[0])
        meta["sha256"][name] = _save_npy(final, arr)
    meta["tokens"] = {seq: int(arrays[f"{seq}_ids"].size) for seq in SEQUENCES[job.family]}
    _write_json(Path(folder) / f"{stem}.json", meta)
    return meta


def _save_npy(final: Path, arr: np.ndarray) -> str:
    """Write ``arr`` to ``final`` through ``final.tmp`` (fsynced, then renamed); its sha256."""
    from llmlab.fingerprint import sha256_file

    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
        fh.flush()
        os.fsync(fh.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, final)
    return digest


def _converted(rows: list[dict], job: ShardJob) -> list[dict]:
    """Canonical ``rows`` of kind ``job.kind_src`` as rows of ``job.kind_dst``.

    Raises:
        ValueError: naming the dataset and stage type, where the kinds have no conversion."""
    from llmlab.data.formats import convert_kind

    if job.kind_src == job.kind_dst:
        return rows
    try:
        return [convert_kind(r, job.kind_src, job.kind_dst) for r in rows]
    except ValueError as e:
        raise ValueError(f"datasets.{job.name}: {e} (stage type {job.stage_type})") from None


def _shard_payload(rows: list[dict], job: ShardJob) -> tuple[dict, dict]:
    """The rendered sequences (text, generation spans, label runs kept) and per-example arrays of
    one shard's canonical ``rows`` (of kind ``job.kind_src``)."""
    rows = _converted(rows, job)
    n_asst = lambda msgs: sum(m["role"] == "assistant" for m in msgs)  # noqa: E731
    if job.family == "sft":
        texts, spans = job.template.render([r["messages"] for r in rows])
        return {"input": (texts, spans, [-1] * len(texts))}, {}
    sides = ("chosen", "rejected") if job.family == "pair" else ("completion",)
    seqs = {}
    for side in sides:
        texts, spans = job.template.render([r["prompt"] + r[side] for r in rows])
        seqs["input" if side == "completion" else side] = (texts, spans, [n_asst(r[side]) for r in rows])
    extras = {"desirable": np.asarray([bool(r["label"]) for r in rows], dtype=np.uint8)} \
        if job.family == "unpaired_preference" else {}
    return seqs, extras


def _prompt_arrays(tok, rows: list[dict], job: ShardJob) -> dict[str, np.ndarray]:
    """One shard of a prompt store (grpo, ppo) from canonical ``rows``: each prompt rendered with the
    generation prompt and tokenised as ``pipeline._tok_prompt`` tokenises it
    (``apply_chat_template(prompt, add_generation_prompt=True)``): ``prompt_ids`` [tokens],
    ``prompt_offsets`` int64 [n + 1]; and each row's ``[prompt messages, answer]`` as JSON
    (``record_bytes`` uint8 [bytes], ``record_offsets`` int64 [n + 1]), the messages as the datasets
    path's Arrow column holds them (``role`` and ``content``), so a batch's ``prompts`` and
    ``answers`` are the same values."""
    rows = _converted(rows, job)
    prompts = [[{"role": m["role"], "content": m["content"]} for m in r["prompt"]] for r in rows]
    ids, offsets, _ = _encoded_flags(tok, job.template.render_prompts(prompts), [[] for _ in prompts])
    recs = [json.dumps([p, r["answer"]]).encode() for p, r in zip(prompts, rows)]
    rec_off = np.concatenate([[0], np.cumsum([len(b) for b in recs], dtype=np.int64)]).astype(np.int64)
    return {"prompt_ids": ids.astype(job.dtype), "prompt_offsets": offsets,
            "record_bytes": np.frombuffer(b"".join(recs), dtype=np.uint8), "record_offsets": rec_off}


def _init_chat_worker(tokenizer, parent: int) -> None:
    """A tokenising worker's set-up (:func:`llmlab.data.store._init_worker`). Transformers' Jinja
    renderer is imported only when needed: the shard jobs bring the skeletons the parent verified
    (:meth:`ChatTemplate.__reduce__`)."""
    from llmlab.data.store import _init_worker

    _init_worker(tokenizer, parent)


class _ShardPool:
    """The shards of one build, rendered and tokenised by :func:`_encode_shard`: the first
    :data:`LOCAL_SHARDS` in this process, the rest in a pool of ``processes`` spawned workers (they
    die with their parent: :func:`llmlab.data.store.die_with_parent`), or all in this process when
    ``pooled`` is false. A worker costs about a shard's CPU time to start (interpreter, the template
    renderer's imports, a cold piece cache), so a small dataset is written faster here. This
    process hands out rows; at most ``processes + 1`` shards wait in memory. Use as a context
    manager (the pool is shut down)."""

    def __init__(self, tokenizer, job: ShardJob, processes: int, pooled: bool):
        self.tokenizer, self.job, self.processes = tokenizer, job, processes
        self.pooled = pooled and processes > 1
        self.pool: ProcessPoolExecutor | None = None
        self.pending: dict[tuple[str, int], Future] = {}
        self.metas: dict[str, dict[int, dict]] = {}
        self.local = 0  # shards written in this process

    def __enter__(self) -> _ShardPool:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, split: str, part: Path, index: int, rows: list[dict], done: dict[int, dict]) -> None:
        """Shard ``index`` of ``split`` (folder ``part``): kept when ``done`` (finished by a killed
        build) holds it with as many examples, else written."""
        metas = self.metas.setdefault(split, {})
        if index in done and done[index]["examples"] == len(rows):
            metas[index] = done[index]
            return
        if not self.pooled or self.local < LOCAL_SHARDS:
            self.local += 1
            metas[index] = _encode_shard(str(part), index, rows, self.job, self.tokenizer)
            return
        if self.pool is None:  # spawned, not forked: see store._run_shards
            import multiprocessing as mp

            from llmlab.data.store import _worker_tokenizer

            self.pool = ProcessPoolExecutor(self.processes, mp_context=mp.get_context("spawn"),
                                            initializer=_init_chat_worker,
                                            initargs=(_worker_tokenizer(self.tokenizer), os.getpid()))
        self.pending[(split, index)] = self.pool.submit(_encode_shard, str(part), index, rows, self.job)
        while len(self.pending) > self.processes:  # bound what waits in memory
            self._collect()

    def _collect(self) -> None:
        key = next(iter(self.pending))
        self.metas[key[0]][key[1]] = self.pending.pop(key).result()

    def finish(self) -> dict[str, list[dict]]:
        """Every shard's meta, per split, in order."""
        while self.pending:
            self._collect()
        return {split: [m[i] for i in sorted(m)] for split, m in self.metas.items()}


def _done_shards(part: Path) -> dict[int, dict]:
    """The shards a killed build finished in ``part`` (their JSON and every file present)."""
    done = {}
    for f in part.glob("shard-*.json"):
        meta = json.loads(f.read_text())
        if all((part / fn).is_file() for fn in meta["files"].values()):
            done[int(meta["index"])] = meta
    return done


def _rows_of(batch: dict) -> list[dict]:
    """A ``datasets`` column batch as a list of rows."""
    cols = list(batch)
    return [dict(zip(cols, vals)) for vals in zip(*batch.values())]


def ensure_chat_store(path: Path, rows, *, family: str, kind_src: str, kind_dst: str, name: str, split: str,
                      stage_type: str, tokenizer, info: dict, processes: int | None = None) -> ChatStore:
    """The chat store at ``path``: opened when complete, else ``rows`` (a ``datasets.Dataset`` of
    canonical rows of kind ``kind_src``, or a callable returning it) tokenised into it.

    Args:
        family: sft | pair | unpaired_preference | prompt; ``kind_dst``: the kind it consumes.
        info: manifest fields (the source's kind, rows dropped at load, its split sizes, ...).
        processes: tokenising processes (default: all cores); 1 tokenises in this process.

    Concurrent builders are serialised by an ``flock`` on ``<path>.lock`` (the second opens the
    complete store).

    Raises:
        ValueError: the rows cannot become ``kind_dst``, or the tokenizer has no chat template.
        OSError: ENOSPC, naming the disk (finished shards are kept for the next run to resume).
    """
    from llmlab.data.store import _full_disk_named

    if chat_store_complete(path):
        return ChatStore(path)
    with _store_lock(path):
        if chat_store_complete(path):
            return ChatStore(path)
        rows = rows() if callable(rows) else rows
        job = _job(family, kind_src, kind_dst, name, stage_type, tokenizer)
        part, t0 = _start_part(path), time.perf_counter()
        n = len(rows)
        done = _done_shards(part)
        todo = [i for i in range(-(-n // SHARD_EXAMPLES))
                if done.get(i, {}).get("examples") != min(SHARD_EXAMPLES, n - i * SHARD_EXAMPLES)]
        with _full_disk_named(part, path), _ShardPool(tokenizer, job, _processes(processes),
                                                           pooled=len(todo) > LOCAL_SHARDS) as pool:
            for i in range(0, n, SHARD_EXAMPLES):
                pool.submit(split, part, i // SHARD_EXAMPLES, _rows_of(rows[i: i + SHARD_EXAMPLES]), done)
            metas = pool.finish().get(split, [])
        return _finish_store(path, part, metas, job, split, info, t0)


def _store_lock(path: Path):
    """The ``flock`` on ``<path>.lock`` that serialises the builders of one store."""
    from llmlab.runguard import file_lock

    return file_lock(path.with_name(path.name + ".lock"), wait=True,
                     on_busy=lambda who: log.warning("chat store %s is being written by %s; waiting", path, who))


def _processes(processes: int | None) -> int:
    return max(1, int(processes or os.cpu_count() or 1))


def _job(family: str, kind_src: str, kind_dst: str, name: str, stage_type: str, tokenizer) -> ShardJob:
    dtype = "uint16" if len(tokenizer) <= 65536 else "uint32"
    return ShardJob(family, kind_src, kind_dst, name, stage_type, dtype, len(tokenizer), ChatTemplate.of(tokenizer))


def _start_part(path: Path) -> Path:
    """The ``<key>.partial`` folder a store is written in (kept from a killed build)."""
    from llmlab.ownership import make_dir

    part = path.with_name(path.name + ".partial")
    make_dir(part, "token-store")  # the marker that lets `llmlab cache --prune` delete it
    return part


def chat_store_complete(path: Path) -> bool:
    """Whether ``path`` holds a complete chat store."""
    return (Path(path) / "manifest.json").is_file()


def _finish_store(path: Path, part: Path, metas: list[dict], job: ShardJob, split: str, info: dict,
                  t0: float) -> ChatStore:
    """Write the manifest of the shards ``metas`` in ``part`` and rename it to ``path``."""
    from llmlab.data.store import _full_disk_named, _write_json, checked_when_settled
    from llmlab.ownership import try_remove_owned

    family = job.family
    tokens = {seq: sum(m["tokens"][seq] for m in metas) for seq in SEQUENCES[family]}
    manifest = {"version": CHAT_STORE_VERSION, "family": family, "kind_dst": job.kind_dst, "dataset": job.name,
                "split": split, "dtype": job.dtype, "vocab_size": job.vocab_size, "examples": sum(m["examples"] for m in metas),
                "documents": sum(m["examples"] for m in metas), "tokens": sum(tokens.values()),
                "sequence_tokens": tokens, "shards": metas,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
    with _full_disk_named(part, path):
        _write_json(part / "manifest.json", manifest)
    if path.exists():  # a concurrent builder without the lock (another host) finished first
        try_remove_owned(part)
    else:
        os.replace(part, path)
    log.info("chat store %s: %s %s of %s, %d examples, %d tokens in %.1f s", path, family, split, job.name,
             manifest["examples"], manifest["tokens"], time.perf_counter() - t0)
    return checked_when_settled(ChatStore(path))


def build_streamed(paths: dict[str, Path], src, seed: int, hf_cache: str | None, *, family: str, kind_src: str,
                   kind_dst: str, stage_type: str, tokenizer, info: dict, processes: int | None = None) -> None:
    """Fill the stores ``paths`` (train and eval) of the streamed source ``src`` in one pass over its
    rows (:func:`llmlab.data.sources.stream_split_rows`: the loaded dataset's rules, the same rows
    on each side), never holding them: this process reads and routes the rows, the workers render
    and tokenise them. The eval store is written only when rows are held out. ``info``: the
    manifest fields; ``kind``, ``load_dropped`` and ``rows`` are added once the stream ends.

    Raises:
        ValueError: as loading the dataset raises (bad rows, no usable rows, an eval_split that holds
            out nothing or everything), or rows that cannot become ``kind_dst``.
    """
    from contextlib import ExitStack

    from llmlab.data.sources import check_split, stream_split_rows
    from llmlab.data.store import _full_disk_named

    job = _job(family, kind_src, kind_dst, src.name, stage_type, tokenizer)
    with ExitStack() as stack:
        for p in paths.values():
            stack.enter_context(_store_lock(p))
        todo = {s: p for s, p in paths.items() if not chat_store_complete(p)}
        parts: dict[str, Path] = {}
        dones: dict[str, dict] = {}
        buffers: dict[str, list] = {s: [] for s in paths}
        counts = dict.fromkeys(paths, 0)
        t0, stream_info = time.perf_counter(), {}
        pool = stack.enter_context(_ShardPool(tokenizer, job, _processes(processes), pooled=True))

        def flush(side: str) -> None:
            if side not in parts:
                parts[side] = _start_part(todo[side])
                dones[side] = _done_shards(parts[side])
                stack.enter_context(_full_disk_named(parts[side], todo[side]))
            pool.submit(side, parts[side], (counts[side] - 1) // SHARD_EXAMPLES, buffers[side], dones[side])
            buffers[side] = []

        for row, _, side in stream_split_rows(src, seed, hf_cache, stream_info):
            counts[side] += 1
            if side in todo:
                buffers[side].append(row)
                if len(buffers[side]) == SHARD_EXAMPLES:
                    flush(side)
        for side in todo:
            if buffers[side]:
                flush(side)
        if "train" in todo and "train" not in parts:  # no training rows: an empty store records it
            parts["train"] = _start_part(todo["train"])
        metas = pool.finish()
        if stream_info["rows_read"] == stream_info["bad_rows"]:
            raise ValueError(f"datasets.{src.name}: no usable rows")
        if counts["train"] + counts["eval"]:
            check_split(src.name, float(src.eval_split), counts["train"], counts["eval"])
        info = {**info, "kind": kind_src, "load_dropped": stream_info["dropped"], "rows": counts}
        for side, p in todo.items():
            if counts[side] or side == "train":
                _finish_store(p, parts[side], metas.get(side, []), job, side, info, t0)


# -- a stage's sources ---------------------------------------------------------------------------

class StoredSource:
    """A named dataset that reaches a stage through chat stores: what ``build_stage_data`` reads of
    a :class:`llmlab.data.sources.DatasetSplits` (``kind``, ``dropped``, ``train``, ``eval``),
    taken from a complete store's manifest where one exists, so a prepared dataset is not loaded.
    Where a store is missing, a streamable source (:attr:`llmlab.data.source.DatasetSource.streamable`:
    all but MinHash-deduplicated ones) fills its train and eval stores in one pass over its rows
    (:func:`build_streamed`, never holding them; ``dropped`` and the split sizes are known once it
    has run); any other is loaded (:func:`llmlab.data.sources.load_named_dataset`)."""

    def __init__(self, recipe: dict, name: str, stage_type: str, tok_hash: str, tokenizer):
        from llmlab.data.sources import recipe_source
        from llmlab.stage_specs import STAGE_SPECS

        self.recipe, self.name, self.tok_hash, self.tokenizer = recipe, name, tok_hash, tokenizer
        self.spec = STAGE_SPECS[stage_type]
        self.src = recipe_source(recipe, name)
        self._splits = None
        self._meta: tuple[dict, dict] | None = None  # (dropped, rows)
        for family in [f for f in (self.spec.family, *self.spec.own_kinds) if f in SEQUENCES]:
            if self._read_meta(chat_store_path(recipe, name, family, "train", tok_hash)):
                break
        else:
            if self.src.streamable:
                self.kind = self._peek_kind()
            else:
                s = self.splits()
                self.kind = s.kind
                self._meta = (s.dropped, {"train": len(s.train), "eval": len(s.eval)})
        self.train, self.eval = StoredRows(self, "train"), StoredRows(self, "eval")

    def _read_meta(self, path: Path) -> bool:
        """Take ``kind``, ``dropped`` and the split sizes from the complete store at ``path``."""
        if not chat_store_complete(path):
            return False
        m = json.loads((path / "manifest.json").read_text())
        self.kind, self._meta = m["kind"], (dict(m["load_dropped"]), dict(m["rows"]))
        return True

    def _peek_kind(self) -> str:
        """The canonical kind of a streamed source: its format's, or that of its first row."""
        from llmlab.data.formats import KIND_OF_FORMAT
        from llmlab.data.sources import cache_dir, stream_split_rows

        if self.src.row_format in KIND_OF_FORMAT:
            return KIND_OF_FORMAT[self.src.row_format]
        seed = int(top_level(self.recipe, "seed"))
        for _, kind, _ in stream_split_rows(self.src, seed, cache_dir(self.recipe), {}):
            return kind
        raise ValueError(f"datasets.{self.name}: no usable rows")

    @property
    def dropped(self) -> dict[str, int]:
        """Rows dropped at load (``bad`` and per filter)."""
        return self._metadata()[0]

    @property
    def rows(self) -> dict[str, int]:
        """Rows of each split (``train``, ``eval``)."""
        return self._metadata()[1]

    def _metadata(self) -> tuple[dict, dict]:
        if self._meta is None:  # a streamed source: fill the stores of the stage's family
            family, kind_dst = (self.kind, self.kind) if self.kind in self.spec.own_kinds \
                else (self.spec.family, self.spec.kind)
            self.store("train", family, kind_dst, self.spec.type)
        assert self._meta is not None
        return self._meta

    def splits(self):
        """The loaded dataset (memoised by :func:`~llmlab.data.sources.load_named_dataset`)."""
        if self._splits is None:
            from llmlab.data.sources import load_named_dataset

            self._splits = load_named_dataset(self.recipe, self.name)
        return self._splits

    def store(self, split: str, family: str, kind_dst: str, stage_type: str) -> ChatStore:
        """The complete store of ``split`` for ``family`` (built first where missing)."""
        path = chat_store_path(self.recipe, self.name, family, split, self.tok_hash)
        info = {"source": source_identity(self.recipe, self.name), "tokenizer": self.tok_hash}
        if not chat_store_complete(path) and self.src.streamable:
            from llmlab.data.sources import cache_dir

            paths = {s: chat_store_path(self.recipe, self.name, family, s, self.tok_hash) for s in ("train", "eval")}
            build_streamed(paths, self.src, int(top_level(self.recipe, "seed")), cache_dir(self.recipe), family=family,
                           kind_src=self.kind, kind_dst=kind_dst, stage_type=stage_type, tokenizer=self.tokenizer,
                           info=info)
            self._read_meta(paths["train"])
            return ChatStore(path)
        info.update(kind=self.kind, load_dropped=self.dropped, rows=self.rows)
        return ensure_chat_store(path, lambda: getattr(self.splits(), split), family=family, kind_src=self.kind,
                                 kind_dst=kind_dst, name=self.name, split=split, stage_type=stage_type,
                                 tokenizer=self.tokenizer, info=info)


@dataclass
class StoredRows:
    """One split of a :class:`StoredSource` (stands where the datasets path has its rows)."""

    source: StoredSource
    split: str

    def __len__(self) -> int:
        return int(self.source.rows[self.split])


def stored_source(recipe: dict, name: str, stage_type: str, tokenizer, tok_hash: str) -> StoredSource | None:
    """Dataset ``name`` through chat stores for a stage of ``stage_type``; None where the stage's
    data take another path (pretrain: the token store; a tokenizer without a Rust backend: datasets)."""
    from llmlab.stage_specs import STAGE_SPECS

    if STAGE_SPECS[stage_type].family not in SEQUENCES or getattr(tokenizer, "backend_tokenizer", None) is None:
        return None
    return StoredSource(recipe, name, stage_type, tok_hash, tokenizer)


def tokenised_part(rows: StoredRows, cfg, family: str, kind_dst: str, source: int,
                   keep_long: bool) -> tuple[ChatPart | None, dict[str, int], int]:
    """``rows`` tokenised for a stage (``cfg``: its ``StageDataConfig``; ``keep_long``: no example
    is dropped or cut for its length): the kept examples, cut and dropped by the stage's
    ``seq_len`` / ``truncation`` exactly as the datasets path's tokenisers do
    (``llmlab.data.pipeline._tok_*``), ``{reason: dropped}`` in order of first occurrence, and the
    seq_len that would keep every over-long example (0 when none is)."""
    if len(rows) == 0:
        return None, {}, 0
    store = rows.source.store(rows.split, family, kind_dst, cfg.type)
    if family == "prompt":
        return _prompt_part(store, cfg, source)
    seq_len = cfg.seq_len
    seqs = store.sequences
    lens = np.stack([store.lengths(s) for s in seqs], axis=1)
    infos = [store.info(s) for s in seqs]
    longest = lens.max(axis=1)
    too_long = (longest > seq_len) & (not keep_long)
    cut = np.zeros(len(longest), dtype=np.int64)
    if family == "sft" and cfg.truncation == "truncate":
        last = infos[0][:, 2] - infos[0][:, 1]
        can = too_long & (last > 0) & (last < seq_len)  # keeps the final assistant turn whole
        cut = np.where(can, longest - seq_len, 0)
        too_long &= ~can
    labelled = np.ones(len(longest), dtype=bool)
    for inf in infos:
        labelled &= np.where(cut > 0, inf[:, 2] > cut, inf[:, 0] > 0)
    no_labels = ~too_long & ~labelled
    counts: dict[str, int] = {}
    firsts = {r: int(np.argmax(m)) for r, m in (("too_long", too_long), ("no_assistant_tokens", no_labels)) if m.any()}
    for reason in sorted(firsts, key=firsts.get):  # in order of first occurrence, as the datasets path
        counts[reason] = int((too_long if reason == "too_long" else no_labels).sum())
    needed = int(longest[too_long].max()) if too_long.any() else 0
    keep = np.flatnonzero(~(too_long | no_labels))
    return ChatPart(store, keep, cut[keep], source), counts, needed


def _prompt_part(store: ChatStore, cfg, source: int) -> tuple[ChatPart, dict[str, int], int]:
    """:func:`tokenised_part` of a prompt store (grpo, ppo), by ``pipeline._tok_prompt``'s rule: a
    prompt longer than ``seq_len - max_new_tokens`` (at least 1) is dropped, however ``keep_long``
    is set (a prompt must leave room to generate); the seq_len that would keep it counts the
    tokens generated."""
    budget = max(1, cfg.seq_len - int(cfg.max_new_tokens))
    lens = store.lengths("prompt")
    too_long = lens > budget
    counts = {"too_long": int(too_long.sum())} if too_long.any() else {}
    needed = int(lens[too_long].max()) + cfg.seq_len - budget if too_long.any() else 0
    keep = np.flatnonzero(~too_long)
    return ChatPart(store, keep, np.zeros(keep.size, dtype=np.int64), source), counts, needed
