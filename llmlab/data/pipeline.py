"""Per-stage data: tokenisation (cached), mixing, packing, masking and batches.

``build_stage_data(recipe, stage_name, tokenizer)`` turns the datasets a stage names into a
:class:`StageData` whose ``train_batch(index)`` is a pure function of (seed, stage name, index).

Pretraining reads token stores (:mod:`llmlab.data.store`, filled first where missing) lazily:
blocks of ``seq_len`` tokens located by index and mixed by a seeded draw per position
(:mod:`llmlab.data.packed`); nothing proportional to the corpus is held in memory.

SFT, preference and prompt stages:

1. sft, preference and prompt data (sft, dpo, orpo, reward, kto, grpo, ppo) come from the chat
   token store (:mod:`llmlab.data.chat_store`: tokenised once per source, tokenizer, template and
   family into memory-mapped shards, read only when a store is missing; the stage's seq_len,
   truncation and prompt budget are applied from per-example lengths). Only a tokenizer without a
   Rust backend takes the datasets path: each dataset is loaded
   (:func:`llmlab.data.sources.load_named_dataset`), converted to the kind the stage needs and
   tokenised with a batched ``datasets.map`` (the ``_tok_*`` functions, which the store matches
   exactly) whose result is cached under ``<output_dir>/cache/`` in a file keyed by the tokenizer's
   hash, the dataset's identity (its source's content fingerprint,
   :meth:`llmlab.data.source.DatasetSource.identity`) and the stage's sequence settings;
2. the datasets are mixed with ``datasets.interleave_datasets`` (probabilities = the normalised
   weights, the recipe seed, the stage's ``mixing.stopping`` rule) into one fixed sequence of
   examples, pass after seeded pass until it covers the stage's max_steps × grad-accum × batch
   examples (:func:`mix_stream`);
3. example ``p = index * batch_size + j`` of the training stream is element ``p mod N`` of a
   permutation of the N examples drawn for epoch ``p // N`` from a generator seeded by
   (seed, stage name, epoch). No iterator state exists, so a resumed stage sees exactly the batches
   an uninterrupted one would.

Batch keys and shapes are those of docs/architecture.md (all ``torch.long``, right-padded with
``pad_token_id``, labels −100 where ignored; grpo/ppo prompts left-padded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.data import chat_store
from llmlab.data.chat_store import IGNORE_INDEX, require_chat_template
from llmlab.data.formats import convert_kind
from llmlab.data.packed import PackedSource, PretrainStream, eval_blocks, pack_documents  # noqa: F401 (re-export)
from llmlab.data.sources import load_named_dataset, recipe_source
from llmlab.models.padfree import bucket_width
from llmlab.schemafile import schema_filled, top_level
from llmlab.specs import from_section
from llmlab.stage_specs import STAGE_SPECS

log = logging.getLogger(__name__)

DATA_VERSION = "2"  # bump when tokenisation changes, to invalidate cached files
#: stage type -> (family, canonical kind it consumes)
STAGE_FAMILY = {t: (s.family, s.kind) for t, s in STAGE_SPECS.items() if s.family}


# -- helpers -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_datasets():
    """Silence datasets' progress bars (the CLI draws its own) and restore the setting after."""
    import datasets as dtqdm

    was_disabled = dtqdm.are_progress_bars_disabled()
    dtqdm.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            dtqdm.enable_progress_bars()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what tokenisation depends on: the backend tokenizer, special tokens, template.

    Equal for two tokenizers loaded from the same frozen files; used to key the cache.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps([tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()


def _rng(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng([int(seed)] + [zlib.crc32(str(k).encode()) for k in keys])


def _int_list_features(*names: str, extra: dict | None = None):
    from datasets import Features, List, Value

    f = {n: List(Value("int32")) for n in names}
    f.update(extra or {})
    f["_source"] = Value("int32")
    f["_drop"] = Value("string")
    return Features(f)


def _assistant_spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of 1s."""
    spans, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(mask)))
    return spans


def _labels_for_last_spans(ids: list[int], mask: list[int], k: int) -> list[int]:
    """Labels that keep ``ids`` on the last ``k`` assistant spans of ``mask``, −100 elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    for s, e in _assistant_spans(mask)[-k:] if k > 0 else []:
        labels[s:e] = ids[s:e]
    return labels


def _chat(tokenizer, conversations: list, **kw):
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, **kw)


# -- tokenisers per stage family (batched map functions) -----------------------------------------

def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens, in one batched call.

    Goes straight to the Rust tokenizer's ``encode_batch_fast`` (no offsets, no Python-side
    BatchEncoding) when the tokenizer has one; otherwise ``tokenizer(texts)``. Same ids either way.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None:
        return [e.ids for e in fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_documents(tokenizer, texts: list[str], append_id: int | None = None):
    """Token ids of ``texts`` (no special tokens added, ``append_id`` after each) as an arrow
    ``list<int32>`` array of B rows — llmlab's fast path for pretraining text.

    Uses :class:`llmlab.data.fastencode.PieceEncoder` (exact; one per tokenizer, its cache kept
    across calls) when :func:`~llmlab.data.fastencode.supports_piece_cache` holds, else
    :func:`encode_texts`. Same ids either way.
    """
    import pyarrow as pa

    from llmlab.data.fastencode import encode_flat

    ids, offsets = encode_flat(tokenizer, texts, append_id)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids, type=pa.int32()))


def _tok_sft(tokenizer, seq_len: int, cfg: StageDataConfig, source: int, keep_long: bool = False):
    truncate = cfg.truncation == "truncate"

    def fn(batch):
        enc = _chat(tokenizer, batch["messages"], return_assistant_tokens_mask=True)
        out = {"input_ids": [], "labels": [], "_source": [], "_drop": []}
        for ids, mask in zip(enc["input_ids"], enc["assistant_masks"]):
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
            drop = ""
            if len(ids) > seq_len and not keep_long:
                last = _assistant_spans(mask)[-1:]
                if truncate and last and last[0][1] - last[0][0] < seq_len:
                    # cut from the left, keeping the final assistant turn whole
                    cut = len(ids) - seq_len
                    ids, labels = ids[cut:], labels[cut:]
                else:
                    drop = f"too_long:{len(ids)}"
            if not drop and all(x == IGNORE_INDEX for x in labels):
                drop = "no_assistant_tokens"
            out["input_ids"].append([] if drop else ids)
            out["labels"].append([] if drop else labels)
            out["_source"].append(source)
            out["_drop"].append(drop)
        return out
    return fn, _int_list_features("input_ids", "labels")


def _tok_pair(tokenizer, seq_len: int, cfg: StageDataConfig, source: int, keep_long: bool = False):
    def fn(batch):
        out = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                               "rejected_labels", "_source", "_drop")}
        sides = {}
        for side in ("chosen", "rejected"):
            convs = [p + c for p, c in zip(batch["prompt"], batch[side])]
            enc = _chat(tokenizer, convs, return_assistant_tokens_mask=True)
            sides[side] = [(ids, _labels_for_last_spans(ids, mask, sum(
                m["role"] == "assistant" for m in comp)))
                for ids, mask, comp in zip(enc["input_ids"], enc["assistant_masks"], batch[side])]
        for (c_ids, c_lab), (r_ids, r_lab) in zip(sides["chosen"], sides["rejected"]):
            longest = max(len(c_ids), len(r_ids))
            drop = f"too_long:{longest}" if longest > seq_len and not keep_long else ""
            if not drop and (all(x == IGNORE_INDEX for x in c_lab)
                             or all(x == IGNORE_INDEX for x in r_lab)):
                drop = "no_assistant_tokens"
            for k, v in (("chosen_input_ids", c_ids), ("chosen_labels", c_lab),
                         ("rejected_input_ids", r_ids), ("rejected_labels", r_lab)):
                out[k].append([] if drop else v)
            out["_source"].append(source)
            out["_drop"].append(drop)
        return out
    return fn, _int_list_features("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                  "rejected_labels")


def _tok_unpaired(tokenizer, seq_len: int, cfg: StageDataConfig, source: int, keep_long: bool = False):
    """Unpaired preference rows (kto): prompt + completion, labels on the completion's assistant
    turns, ``desirable`` the row's label; ``keep_long``: rows longer than ``seq_len`` are kept whole
    (held-out rows, cut from the left when scored: :mod:`llmlab.heldout`)."""
    def fn(batch):
        out = {k: [] for k in ("input_ids", "labels", "desirable", "_source", "_drop")}
        convs = [p + c for p, c in zip(batch["prompt"], batch["completion"])]
        enc = _chat(tokenizer, convs, return_assistant_tokens_mask=True)
        for ids, mask, comp, label in zip(enc["input_ids"], enc["assistant_masks"], batch["completion"],
                                          batch["label"]):
            labels = _labels_for_last_spans(ids, mask, sum(m["role"] == "assistant" for m in comp))
            drop = f"too_long:{len(ids)}" if len(ids) > seq_len and not keep_long else ""
            if not drop and all(x == IGNORE_INDEX for x in labels):
                drop = "no_assistant_tokens"
            out["input_ids"].append([] if drop else ids)
            out["labels"].append([] if drop else labels)
            out["desirable"].append(int(bool(label)))
            out["_source"].append(source)
            out["_drop"].append(drop)
        return out
    from datasets import Value

    return fn, _int_list_features("input_ids", "labels", extra={"desirable": Value("int64")})


def _tok_prompt(tokenizer, seq_len: int, cfg: StageDataConfig, source: int, keep_long: bool = False):
    from datasets import List, Value  # keep_long does not apply: a prompt must leave room to generate

    budget = max(1, seq_len - int(cfg.max_new_tokens))

    def fn(batch):
        enc = _chat(tokenizer, batch["prompt"], add_generation_prompt=True)
        # the length recorded is what seq_len would have to be (prompt + max_new_tokens)
        drops = [f"too_long:{len(ids) + seq_len - budget}" if len(ids) > budget else "" for ids in enc["input_ids"]]
        return {"prompt_input_ids": [[] if d else ids for ids, d in zip(enc["input_ids"], drops)],
                "prompt": batch["prompt"], "answer": batch["answer"], "_source": [source] * len(drops),
                "_drop": drops}
    msgs = List({"role": Value("string"), "content": Value("string")})
    return fn, _int_list_features("prompt_input_ids", extra={"prompt": msgs, "answer": Value("string")})


_TOKENISERS = {"sft": _tok_sft, "pair": _tok_pair, "prompt": _tok_prompt, "unpaired_preference": _tok_unpaired}
#: stage types whose held-out examples are kept whole at tokenisation, however long: their eval_loss
#: cuts them from the left to the model's context when scoring (llmlab.heldout), never drops them
HELD_OUT_WHOLE = ("sft", "dpo", "orpo", "kto", "reward")


# -- StageData -----------------------------------------------------------------------------------

@dataclass
class HeldOut:
    """The held-out examples a training stage evaluates (:meth:`StageData.heldout`).

    Attributes:
        kind: ``text`` (pretrain), ``conversation`` (sft), ``preference`` (dpo, orpo, reward, kto on
            pairs) or ``unpaired`` (kto on unpaired rows).
        examples: text: token-id lists of documents (no EOS); conversation: ``(ids, scored flags)``;
            preference: ``((chosen ids, flags), (rejected ids, flags))``; unpaired: ``(ids, flags,
            desirable)``. Whole, however long.
        total: the examples of the held-out set they were drawn from (``len(examples)`` when it is
            covered whole).
    """

    kind: str
    examples: list
    total: int


@dataclass
class StageData:
    """The data of one stage: a fixed example sequence and pure batch functions.

    Attributes:
        stage: the stage name; ``type``: its type (pretrain, sft, dpo, orpo, kto, reward, grpo, ppo).
        seed: the recipe seed; ``batch_size``; ``seq_len``.
        pad_token_id: the padding id used in every batch.
        shares: dataset name → realised share of the training examples (documents for pretrain).
        token_shares: dataset name → share of the training tokens.
        num_train_examples: N, the examples of one epoch (packed blocks for pretrain).
        dropped: dataset name → {reason: count} (bad rows, each filter, too_long, ...).
    """

    stage: str
    type: str
    seed: int
    batch_size: int
    seq_len: int
    pad_token_id: int
    eval_steps: int
    shares: dict[str, float]
    token_shares: dict[str, float]
    dropped: dict[str, dict[str, int]]
    _train: Any = field(repr=False, default=None)   # Dataset, or (blocks, positions) for pretrain
    _eval: Any = field(repr=False, default=None)
    _perms: dict = field(repr=False, default_factory=dict)
    _sources: Any = field(repr=False, default=None)  # int array [N]: dataset of each example
    _family: str | None = field(repr=False, default=None)  # set where the data's kind chose it (kto)
    _heldout: Any = field(repr=False, default=None)  # the held-out set in split order (HeldOut for pretrain)
    _group_lengths: Any = field(repr=False, default=None)  # int array [N] with group_by_length, else None

    @property
    def num_train_examples(self) -> int:
        """N: the number of training examples in one epoch (packed blocks for pretrain: one epoch
        of every source)."""
        if isinstance(self._train, PretrainStream):
            return self._train.num_blocks
        return _n_examples(self._train)

    @property
    def family(self) -> str:
        """pretrain | sft | pair (dpo, orpo, kto, reward) | prompt (grpo, ppo) |
        unpaired_preference (kto on unpaired rows)."""
        return self._family or STAGE_FAMILY[self.type][0]

    def train_indices(self, index: int) -> np.ndarray:
        """The example indices (into one epoch) of micro-batch ``index``: shape [batch_size].

        Raises:
            ValueError: ``index`` is negative.
        """
        if index < 0:
            raise ValueError(f"batch index {index} < 0")
        pos = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        if isinstance(self._train, PretrainStream):  # blocks numbered source after source
            src, block = self._train.locate(pos)
            first = np.cumsum([0] + [s.num_blocks for s in self._train.sources])
            return first[src] + block
        n = self.num_train_examples
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = (pos // n) == epoch
            out[sel] = self._epoch_perm(int(epoch))[pos[sel] % n]
        return out

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            perm = _rng(self.seed, "epoch", self.stage, epoch).permutation(self.num_train_examples)
            if self._group_lengths is not None:
                perm = group_by_length(perm, self._group_lengths, self.batch_size,
                                       _rng(self.seed, "length-groups", self.stage, epoch))
            self._perms[epoch] = perm
        return self._perms[epoch]

    def train_sources(self, index: int) -> list[int]:
        """Source-dataset positions (in the stage's ``datasets:`` order) of batch ``index``."""
        idx = self.train_indices(index)
        if self.family == "pretrain":
            raise ValueError("pretrain batches are packed blocks; see shares for documents")
        return [int(s) for s in self._sources[idx]]

    def train_batch(self, index: int) -> dict:
        """The training micro-batch with global index ``index`` (step × grad-accum + micro).

        A pure function of (seed, stage name, index); see the module docstring for the keys.
        Shapes: pretrain [B, seq_len]; sft [B, T] with T the longest example of the batch;
        dpo/reward [B, T] with T the longest of chosen and rejected; grpo/ppo [B, P] left-padded.
        """
        if isinstance(self._train, PretrainStream):
            if index < 0:
                raise ValueError(f"batch index {index} < 0")
            pos = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
            return self._train.batch(pos, self.pad_token_id)
        return self._collate(self._train, self.train_indices(index))

    def eval_batches(self) -> list[dict]:
        """The fixed held-out batches: up to ``eval_steps`` of ``batch_size`` examples (the last may
        be smaller); empty when the stage has no eval data."""
        n = _n_examples(self._eval) if self._eval is not None else 0
        batches = []
        for b in range(self.eval_steps):
            idx = np.arange(b * self.batch_size, min((b + 1) * self.batch_size, n))
            if len(idx) == 0:
                break
            batches.append(self._collate(self._eval, idx))
        return batches

    def heldout(self) -> HeldOut | None:
        """The held-out examples the stage's ``eval_loss`` covers (:mod:`llmlab.heldout`), or None when
        the stage has no held-out data.

        At most ``eval_steps × batch_size`` examples, evenly spaced over the held-out set in its
        split order (:func:`llmlab.heldout.spread`, the rows ``llmlab eval --limit`` keeps);
        for pretrain, documents (see :func:`heldout_documents`).
        """
        if isinstance(self._heldout, HeldOut) or self._heldout is None:
            return self._heldout
        from llmlab.heldout import spread

        n = _n_examples(self._heldout)
        idx = np.asarray(spread(list(range(n)), self.eval_steps * self.batch_size), dtype=np.int64)
        if idx.size == 0:
            return None
        rows = _take(self._heldout, idx)
        flags = lambda labels: [x != IGNORE_INDEX for x in labels]  # noqa: E731
        if self.family == "sft":
            ex = [(ids, flags(lab)) for ids, lab in zip(rows["input_ids"], rows["labels"])]
            return HeldOut("conversation", ex, n)
        if self.family == "unpaired_preference":
            ex = [(ids, flags(lab), bool(d))
                  for ids, lab, d in zip(rows["input_ids"], rows["labels"], rows["desirable"])]
            return HeldOut("unpaired", ex, n)
        ex = [((ci, flags(cl)), (ri, flags(rl))) for ci, cl, ri, rl in zip(
            rows["chosen_input_ids"], rows["chosen_labels"], rows["rejected_input_ids"], rows["rejected_labels"])]
        return HeldOut("preference", ex, n)

    # -- collation ---------------------------------------------------------------------------
    def _collate(self, data, idx: np.ndarray) -> dict:
        if self.family == "pretrain":
            blocks, positions = data
            ids = torch.from_numpy(blocks[idx].astype(np.int64))
            labels = ids.clone()
            labels[ids == self.pad_token_id] = IGNORE_INDEX
            return {"input_ids": ids, "labels": labels,
                    "position_ids": torch.from_numpy(positions[idx].astype(np.int64))}
        rows = _take(data, idx)
        if self.family in ("sft", "unpaired_preference"):
            width = bucket_width(max(map(len, rows["input_ids"])), self.seq_len)
            ids, attn = _pad(rows["input_ids"], self.pad_token_id, width)
            labels, _ = _pad(rows["labels"], IGNORE_INDEX, width)
            out = {"input_ids": ids, "labels": labels, "attention_mask": attn}
            if self.family == "unpaired_preference":
                out["desirable"] = torch.tensor(rows["desirable"], dtype=torch.bool)
            return out
        if self.family == "pair":
            width = bucket_width(max(max(map(len, rows["chosen_input_ids"])),
                                     max(map(len, rows["rejected_input_ids"]))), self.seq_len)
            out = {}
            for side in ("chosen", "rejected"):
                ids, attn = _pad(rows[f"{side}_input_ids"], self.pad_token_id, width)
                labels, _ = _pad(rows[f"{side}_labels"], IGNORE_INDEX, width)
                out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn,
                            f"{side}_labels": labels})
            return out
        ids, attn = _pad(rows["prompt_input_ids"], self.pad_token_id, left=True)
        return {"prompt_input_ids": ids, "prompt_attention_mask": attn,
                "prompts": [list(p) for p in rows["prompt"]], "answers": list(rows["answer"])}


#: examples per length group of :func:`group_by_length`, in batches (transformers' LengthGroupedSampler: 50)
LENGTH_GROUP_BATCHES = 50


def group_by_length(perm: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Reorder one epoch's permutation so that each micro-batch holds examples of similar length.

    The permutation is cut into groups of :data:`LENGTH_GROUP_BATCHES` × ``batch_size`` examples;
    each group is sorted by length, longest first, cut into batches, and its batches are put in a
    random order (the scheme of transformers' ``LengthGroupedSampler``, ``group_by_length`` in the
    Trainer and Axolotl, with the batch order inside a group shuffled too). Every example still
    appears once per epoch; only the order changes.

    Args:
        perm: int array [N], the epoch's random permutation of example indices.
        lengths: int array [N], the padded length of each example (tokens; pairs: the longer side).
        batch_size: examples per micro-batch.
        rng: the generator of the batch order (seeded per stage and epoch).

    Returns:
        int array [N]: the same indices, length-grouped.
    """
    group = LENGTH_GROUP_BATCHES * batch_size
    out = []
    for start in range(0, len(perm), group):
        chunk = perm[start:start + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        full = len(chunk) // batch_size  # a short last batch keeps its place at the group's end
        order = list(rng.permutation(full)) + list(range(full, len(batches)))
        out.extend(batches[i] for i in order)
    return np.concatenate(out) if out else perm


def _padded_lengths(ds, family: str, lengths: np.ndarray) -> np.ndarray:
    """The width each example needs in a padded batch: ``lengths`` (of the family's id column), for
    pairs the longer of chosen and rejected."""
    if hasattr(ds, "padded_lengths"):  # chat-store examples
        return ds.padded_lengths()
    return np.maximum(lengths, _lengths(ds, "rejected_input_ids")) if family == "pair" else lengths


def column(ds, name: str):
    """Column ``name`` of a ``datasets.Dataset`` as one pyarrow Array (vectorised; honours an
    indices mapping); of chat-store examples, ``_source`` only."""
    if hasattr(ds, "take_rows") and name == "_source":
        import pyarrow as pa

        return pa.array(ds.sources)
    return ds.with_format("arrow")[:].column(name).combine_chunks()


def _lengths(ds, name: str) -> np.ndarray:
    import pyarrow.compute as pc

    if hasattr(ds, "take_rows"):  # chat-store examples (their first sequence: what ``name`` is)
        return ds.lengths()
    return pc.list_value_length(column(ds, name)).to_numpy(zero_copy_only=False)


def _take(ds, idx: np.ndarray) -> dict[str, list]:
    """Rows ``idx`` of ``ds`` as {column: python list} via one arrow take (chat-store examples:
    read from their memory maps)."""
    if hasattr(ds, "take_rows"):
        return ds.take_rows(idx)
    table = ds.with_format("arrow")[idx.tolist()]
    return {c: table.column(c).to_pylist() for c in table.column_names}


def _n_examples(data) -> int:
    if isinstance(data, tuple):
        return int(data[0].shape[0])
    return len(data)


def _pad(seqs: list[list[int]], value: int, width: int | None = None, left: bool = False):
    """Pad to ``width`` (default: the longest); returns (LongTensor [B, W], attention mask [B, W])."""
    width = width or max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        t = torch.as_tensor(s, dtype=torch.long)
        if left:
            out[i, width - len(s):] = t
            mask[i, width - len(s):] = 1
        else:
            out[i, : len(s)] = t
            mask[i, : len(s)] = 1
    return out, mask


# -- mixing --------------------------------------------------------------------------------------

def mix(datasets_: list, weights: list[float], seed: int, stopping: str = "all_exhausted"):
    """Interleave ``datasets_`` with sampling probabilities ∝ ``weights``.

    Uses ``datasets.interleave_datasets(probabilities=..., seed=seed, stopping_strategy=stopping)``;
    one dataset is returned unchanged.

    Raises:
        ValueError: a weight is not > 0, or an unknown stopping rule.
    """
    from datasets import interleave_datasets

    if any(w <= 0 for w in weights):
        raise ValueError(f"mixture weights must be > 0, got {weights}")
    if stopping not in ("first_exhausted", "all_exhausted"):
        raise ValueError(f"mixing.stopping: {stopping!r} is not first_exhausted/all_exhausted")
    if hasattr(datasets_[0], "index_dataset"):  # chat-store parts: the same draw over their indices
        return chat_store.ChatExamples.mixed(datasets_, lambda ds: mix(ds, weights, seed, stopping))
    if len(datasets_) == 1:
        return datasets_[0]
    total = float(sum(weights))
    return interleave_datasets(datasets_, probabilities=[w / total for w in weights], seed=int(seed),
                               stopping_strategy=stopping)


def mix_stream(parts: list, weights: list[float], seed: int, stopping: str, needed: int,
               token_column: str | None = None):
    """The stage's fixed training stream: seeded interleaving passes until ``needed`` is reached.

    One pass is :func:`mix` of ``parts`` (pass k seeded by (seed, k)); passes are concatenated
    until they hold ``needed`` examples (or, with ``token_column``, ``needed`` tokens), so the
    realised shares over a whole run follow the weights as closely as independent sampling would
    instead of repeating one short realisation. A single dataset is one pass.

    Returns:
        a ``datasets.Dataset`` with the parts' columns (``_source`` = index into ``parts``).
    """
    from datasets import concatenate_datasets

    if hasattr(parts[0], "index_dataset"):  # chat-store parts: the same passes over their indices
        return chat_store.ChatExamples.mixed(parts, lambda ds: mix_stream(ds, weights, seed, stopping, needed, token_column))
    if len(parts) == 1:
        return parts[0]
    passes, total, k = [], 0, 0
    while True:
        pass_seed = seed if k == 0 else int(_rng(seed, "mix-pass", k).integers(2**31 - 1))
        m = mix(parts, weights, pass_seed, stopping)
        passes.append(m)
        total += int(_lengths(m, token_column).sum()) if token_column else len(m)
        k += 1
        if total >= needed or k >= 10_000:
            break
    return passes[0] if len(passes) == 1 else concatenate_datasets(passes)


def _examples_needed(cfg: StageDataConfig, family: str) -> int:
    """Examples (tokens for pretrain) the stage consumes: max_steps × grad-accum × batch size."""
    n = cfg.max_steps * cfg.gradient_accumulation_steps * cfg.batch_size
    return n * cfg.seq_len if family == "pretrain" else n


# -- build ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageDataConfig:
    """What the data layer reads of a training stage's config: the ``$defs/stage_common`` keys that
    shape its batches and the type's own ones. Built by :func:`_stage_config` from the config
    filled with the schema's defaults (:func:`llmlab.specs.from_section`; no default is written
    here: None only for keys a stage type may lack)."""

    type: str
    """The stage type (its family: :data:`STAGE_FAMILY`)."""
    datasets: dict
    """Training datasets: name → mixture weight."""
    batch_size: int
    """Examples per micro-batch."""
    gradient_accumulation_steps: int
    """Micro-batches per optimizer step."""
    eval_steps: int
    """Held-out batches per evaluation."""
    mixing: dict
    """``mixing``: ``stopping`` is first_exhausted | all_exhausted."""
    max_dropped_fraction: float
    """Most of a split that tokenisation may drop before the stage is refused."""
    group_by_length: bool
    """Micro-batches of examples of similar length (:func:`group_by_length`)."""
    eval_datasets: dict | None = None
    """Held-out datasets: name → weight (None: the training datasets' held-out splits)."""
    seq_len: int | None = None
    """Tokens per sequence (None in the section: the model's max_seq_len, resolution's rule)."""
    max_steps: int | None = None
    """Optimizer steps (None in a bare config, 0 here: nothing to size ahead)."""
    truncation: str | None = None
    """sft: drop | truncate an over-long conversation; None for other types."""
    max_new_tokens: int | None = None
    """grpo / ppo: tokens generated per completion (the prompt budget is seq_len minus it)."""

    @property
    def stopping(self) -> str:
        """``mixing.stopping``."""
        return self.mixing["stopping"]


def _stage_config(recipe: dict, stage_name: str) -> StageDataConfig:
    """The :class:`StageDataConfig` of stage ``stage_name`` (a bare stage too: the schema's defaults).

    Raises:
        KeyError: no such stage. ValueError: a stage type with no data family, or no dataset.
    """
    stages = top_level(recipe, "stages") or {}
    if stage_name not in stages:
        raise KeyError(f"stages.{stage_name}: no such stage")
    filled = schema_filled("#/$defs/stage", stages[stage_name])
    if filled.get("type") not in STAGE_FAMILY:
        raise ValueError(f"stages.{stage_name}.type: {filled.get('type')!r} is not one of "
                         f"{', '.join(STAGE_FAMILY)}")
    cfg = from_section(StageDataConfig, filled)
    if not cfg.datasets:
        raise ValueError(f"stages.{stage_name}.datasets: name at least one dataset")
    seq_len = cfg.seq_len  # resolution's rule when absent: the model's max_seq_len
    if seq_len is None:
        seq_len = schema_filled("#/properties/model", top_level(recipe, "model"))["max_seq_len"]
    return replace(cfg, seq_len=int(seq_len), max_steps=int(cfg.max_steps or 0))


def _tokenise(recipe: dict, name: str, split: str, rows, cfg: StageDataConfig, family: str, kind_src: str,
              kind_dst: str, tokenizer, tok_hash: str, source: int):
    """Tokenise one dataset split (cached); returns (tokenised dataset, {reason: dropped}).

    Rows of a chat-store source (:class:`llmlab.data.chat_store.StoredRows`) come from their
    memory-mapped store instead (:func:`llmlab.data.chat_store.tokenised_part`)."""
    keep_long = split == "eval" and cfg.type in HELD_OUT_WHOLE
    if isinstance(rows, chat_store.StoredRows):
        part, counts, needed = chat_store.tokenised_part(rows, cfg, family, kind_dst, source, keep_long)
        if counts:
            _announce_drops(name, split, counts, len(rows), needed, cfg)
        return part, counts
    if kind_src != kind_dst:
        try:
            rows = rows.map(lambda r: convert_kind(r, kind_src, kind_dst),
                            remove_columns=rows.column_names, keep_in_memory=True,
                            load_from_cache_file=False)
        except ValueError as e:
            raise ValueError(f"datasets.{name}: {e} (stage type {cfg.type})") from None
    fn, features = _TOKENISERS[family](tokenizer, cfg.seq_len, cfg, source, keep_long)
    seed = int(top_level(recipe, "seed"))
    key = hashlib.sha256(json.dumps({
        "v": DATA_VERSION, "tok": tok_hash, "split": split, "seed": seed, "family": family,
        "seq_len": cfg.seq_len, "truncation": cfg.truncation, "max_new_tokens": cfg.max_new_tokens,
        "source": source, "n": len(rows), **({"keep_long": True} if keep_long else {}),
        # the dataset's one identity (its source's content fingerprint, as stage fingerprints and
        # the token store hash it), so edited data never hits a stale cache
        "data": recipe_source(recipe, name).identity(seed)}, sort_keys=True, default=str).encode()).hexdigest()[:20]
    kwargs: dict[str, Any] = {"keep_in_memory": True}
    out_dir = top_level(recipe, "output_dir")
    if out_dir and len(rows):
        cache = Path(out_dir) / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        kwargs = {"cache_file_name": str(cache / f"{family}-{name}-{split}-{key}.arrow")}
    if len(rows) == 0:
        return None, {}
    tokd = rows.map(fn, batched=True, batch_size=1000 if family == "pretrain" else 256, remove_columns=rows.column_names,
                    features=features, new_fingerprint=key, **kwargs)
    drops = column(tokd, "_drop").to_pylist()
    counts: dict[str, int] = {}
    needed = 0  # the seq_len that would keep every over-long example
    for d in drops:
        if d:
            reason, _, length = d.partition(":")
            counts[reason] = counts.get(reason, 0) + 1
            needed = max(needed, int(length or 0))
    if counts:
        _announce_drops(name, split, counts, len(drops), needed, cfg)
        keep = [i for i, d in enumerate(drops) if not d]
        tokd = tokd.select(keep)
    return tokd.remove_columns("_drop"), counts


def _announce_drops(name: str, split: str, counts: dict[str, int], total: int, needed: int,
                    cfg: StageDataConfig) -> None:
    """Say what tokenisation dropped from one dataset split, and what would keep it.

    Raises:
        ValueError: more than ``max_dropped_fraction`` of the split was dropped.
    """
    parts = []
    if counts.get("too_long"):
        hint = f"seq_len {needed} would keep them" if needed else "a larger seq_len would keep them"
        if cfg.type == "sft" and cfg.truncation == "drop":
            hint += ", or truncation: truncate"
        parts.append(f"{counts['too_long']} longer than seq_len {cfg.seq_len} ({hint})")
    if counts.get("no_assistant_tokens"):
        parts.append(f"{counts['no_assistant_tokens']} with no assistant token to train on")
    dropped = sum(counts.values())
    message = f"datasets.{name} ({split}): dropped {dropped} of {total} examples at tokenisation: {'; '.join(parts)}"
    limit = cfg.max_dropped_fraction
    if dropped / max(total, 1) > limit:
        raise ValueError(f"{message}; that is more than the stage's max_dropped_fraction {limit:g}")
    log.warning("%s", message)


def stage_family(stage_type: str, kinds: dict[str, str], stage_name: str) -> tuple[str, str]:
    """``(family, kind)`` a stage's rows go through: the spec's, unless its datasets (name → loaded
    kind) are of one of the spec's ``own_kinds`` (kto's ``unpaired_preference``), which keep their kind and the
    family of that name.

    Raises:
        ValueError: the datasets mix such a kind with another (kto on pairs and unpaired rows at once).
    """
    spec = STAGE_SPECS[stage_type]
    own = sorted({k for k in kinds.values() if k in spec.own_kinds})
    if not own:
        return spec.family, spec.kind
    others = sorted(n for n, k in kinds.items() if k != own[0])
    if others:
        raise ValueError(f"stages.{stage_name}: a {stage_type} stage takes {own[0]} rows or "
                         f"{spec.kind} rows, not both; {', '.join(others)} are not {own[0]}")
    return own[0], own[0]


def build_stage_data(recipe: dict, stage_name: str, tokenizer) -> StageData:
    """Build the data of stage ``stage_name``: tokenised, mixed, (packed,) with pure batch access.

    Args:
        recipe: the resolved recipe (plain dict).
        stage_name: a key of ``recipe["stages"]``.
        tokenizer: the run's ``PreTrainedTokenizerFast`` (eos and pad set; a chat template for
            every stage type but pretrain).

    Returns:
        :class:`StageData`.

    Raises:
        KeyError: unknown stage or dataset.
        ValueError: a dataset cannot feed this stage type (e.g. text for sft), a dataset's bad rows
            exceed ``max_bad_fraction``, the tokenizer has no chat template where one is needed,
            or nothing is left to train on after dropping over-long examples.
    """
    cfg = _stage_config(recipe, stage_name)
    seed = int(top_level(recipe, "seed"))
    seq_len = cfg.seq_len
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if STAGE_FAMILY[cfg.type][0] == "pretrain" and tokenizer.eos_token_id is None:
        raise ValueError("pretraining needs a tokenizer with an eos token")
    tok_hash = tokenizer_fingerprint(tokenizer)
    names = list(cfg.datasets)
    weights = [float(cfg.datasets[n]) for n in names]
    eval_spec = cfg.eval_datasets
    eval_names = list(eval_spec) if eval_spec else names
    # the held-out mixture follows eval_datasets' weights (null: 1), else the training weights
    eval_w = [float(eval_spec[n]) if eval_spec[n] is not None else 1.0 for n in eval_names] \
        if eval_spec else weights

    if STAGE_FAMILY[cfg.type][0] == "pretrain":
        return _build_pretrain(recipe, stage_name, cfg, tokenizer, names, weights, eval_names, eval_w,
                               bool(eval_spec))
    dropped: dict[str, dict[str, int]] = {}
    train_parts = []
    with _quiet_datasets():
        # sft, preference and prompt data through chat token stores (llmlab.data.chat_store)
        loaded = {name: chat_store.stored_source(recipe, name, cfg.type, tokenizer, tok_hash)
                  or load_named_dataset(recipe, name)
                  for name in dict.fromkeys(names + eval_names)}
        family, kind_dst = stage_family(cfg.type, {n: s.kind for n, s in loaded.items()}, stage_name)
        for i, name in enumerate(names):
            splits = loaded[name]
            tokd, counts = _tokenise(recipe, name, "train", splits.train, cfg, family, splits.kind,
                                     kind_dst, tokenizer, tok_hash, i)
            dropped[name] = {**splits.dropped, **counts}
            if tokd is None or len(tokd) == 0:
                raise ValueError(f"stages.{stage_name}: dataset {name!r} has no usable training "
                                 f"examples (dropped: {dropped[name]})")
            train_parts.append(tokd)
        eval_mixed = _heldout_mixture(recipe, stage_name, cfg, loaded, names, eval_names, eval_w, bool(eval_spec),
                                      (family, kind_dst), tokenizer, tok_hash, dropped)

        id_col = ID_COLUMN[family]
        mixed = mix_stream(train_parts, weights, seed, cfg.stopping,
                           _examples_needed(cfg, family), id_col if family == "pretrain" else None)
        src = column(mixed, "_source").to_numpy()
        lens = _lengths(mixed, id_col)
        shares = {n: float((src == i).mean()) for i, n in enumerate(names)}
        tok_total = max(int(lens.sum()), 1)
        token_shares = {n: float(lens[src == i].sum() / tok_total) for i, n in enumerate(names)}

        train = mixed
        eval_ = None
        if eval_mixed is not None:
            perm = _rng(seed, "eval", stage_name).permutation(len(eval_mixed))
            eval_ = eval_mixed.select(perm.tolist())

    data = StageData(stage=stage_name, type=cfg.type, seed=seed, batch_size=cfg.batch_size, seq_len=seq_len,
                     pad_token_id=int(pad_id), eval_steps=cfg.eval_steps, shares=shares,
                     token_shares=token_shares, dropped=dropped, _train=train, _eval=eval_,
                     _sources=src.astype(np.int64), _family=family,
                     _heldout=eval_mixed if cfg.type in HELD_OUT_WHOLE else None,
                     _group_lengths=_padded_lengths(train, family, lens) if cfg.group_by_length else None)
    log.info("stage %s: %d training examples, shares %s, dropped %s", stage_name,
             data.num_train_examples, {k: round(v, 4) for k, v in shares.items()}, dropped)
    return data


#: the token-id column whose lengths count a family's tokens (a pair's: the chosen reply's)
ID_COLUMN = {"pretrain": "input_ids", "sft": "input_ids", "pair": "chosen_input_ids", "prompt": "prompt_input_ids",
             "unpaired_preference": "input_ids"}


def _heldout_mixture(recipe: dict, stage_name: str, cfg: StageDataConfig, loaded: dict, names: list[str],
                     eval_names: list[str], eval_w: list[float], eval_named: bool, kinds: tuple[str, str], tokenizer,
                     tok_hash: str, dropped: dict):
    """The held-out examples of a fine-tuning stage (:func:`build_stage_data`): each held-out
    dataset's eval split (a dataset named only in ``eval_datasets`` whole) tokenised, then mixed ∝
    ``eval_w`` until the first runs out; None when there are none. Drops go into ``dropped`` as
    ``eval_<reason>``."""
    family, kind_dst = kinds
    parts, weights = [], []
    for name in eval_names:
        splits = loaded[name]
        rows = splits.eval if (not eval_named or len(splits.eval)) else splits.train
        tokd, counts = _tokenise(recipe, name, "eval", rows, cfg, family, splits.kind, kind_dst, tokenizer, tok_hash,
                                 names.index(name) if name in names else len(names) + eval_names.index(name))
        if counts:
            dropped.setdefault(name, {})
            dropped[name].update({f"eval_{k}": v for k, v in counts.items()})
        if tokd is not None and len(tokd):
            parts.append(tokd)
            weights.append(eval_w[eval_names.index(name)])
    if not parts:
        return None
    seed = int(top_level(recipe, "seed"))
    return mix(parts, weights, int(_rng(seed, "eval-mix", stage_name).integers(2**31 - 1)), "first_exhausted")


def _build_pretrain(recipe: dict, stage_name: str, cfg: StageDataConfig, tokenizer, names: list[str],
                    weights: list[float], eval_names: list[str], eval_w: list[float],
                    eval_named: bool, processes: int | None = None, progress: bool = False) -> StageData:
    """A pretraining stage's data, read lazily from token stores (filled first where missing):
    training blocks by :class:`~llmlab.data.packed.PretrainStream`, held-out blocks by
    :func:`~llmlab.data.packed.eval_blocks` (at most ``eval_steps × batch_size``)."""
    from llmlab.data.store import ensure_text_store

    seed, seq_len, batch = int(top_level(recipe, "seed")), cfg.seq_len, cfg.batch_size
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sources, dropped = [], {}
    for name in names:
        st = ensure_text_store(recipe, name, "train", tokenizer, processes=processes, progress=progress)
        dropped[name] = dict(st.manifest.get("dropped") or {})
        if st.tokens == 0:
            raise ValueError(f"stages.{stage_name}: dataset {name!r} has no usable training "
                             f"examples (dropped: {dropped[name]})")
        sources.append(PackedSource(st, seq_len, eos, pad_id))
    stream = PretrainStream(sources, names, weights, seed, stage_name)
    needed = cfg.max_steps * cfg.gradient_accumulation_steps * batch
    shares = stream.shares(needed)  # over the blocks the stage consumes
    ev_stores, ev_weights = [], []
    for name, w in zip(eval_names, eval_w):
        # the held-out split; a dataset named only for evaluation is used whole
        split = "eval" if recipe_source(recipe, name).eval_split > 0 else \
            ("train" if eval_named else None)
        if split is None:
            continue
        st = ensure_text_store(recipe, name, split, tokenizer, processes=processes, progress=progress)
        if st.documents:
            ev_stores.append(st)
            ev_weights.append(w)
    budget = cfg.eval_steps * batch
    eval_ = eval_blocks(ev_stores, ev_weights, seed, stage_name, seq_len, eos, pad_id, budget) if ev_stores else None
    heldout = heldout_documents(ev_stores, ev_weights, budget * seq_len) if ev_stores else None
    data = StageData(stage=stage_name, type=cfg.type, seed=seed, batch_size=batch, seq_len=seq_len,
                     pad_token_id=int(pad_id), eval_steps=cfg.eval_steps,
                     shares=shares, token_shares=dict(shares), dropped=dropped, _train=stream,
                     _eval=eval_, _heldout=heldout)
    log.info("stage %s: %d blocks of %d tokens, shares %s, dropped %s", stage_name, stream.num_blocks,
             seq_len, {k: round(v, 4) for k, v in shares.items()}, dropped)
    return data


def heldout_documents(stores: list, weights: list[float], tokens: int) -> HeldOut | None:
    """A pretraining stage's held-out documents: from each store, ``k`` documents evenly spaced over
    it (:func:`llmlab.heldout.spread`, the documents ``llmlab eval -d NAME --limit k``
    scores), ``k`` such that their expected length fills the store's share (∝ ``weights``) of
    ``tokens``; each document without its EOS. None when no document is drawn.
    """
    from llmlab.heldout import spread

    docs, total = [], 0
    w = np.asarray(weights, dtype=np.float64)
    for st, share in zip(stores, w / w.sum()):
        mean = max(st.tokens / max(st.documents, 1), 1.0)
        k = min(st.documents, max(1, int(np.ceil(tokens * share / mean))))
        total += st.documents
        for d in spread(list(range(st.documents)), k):
            doc = st.document(d)
            docs.append(doc[:-1].tolist())  # its EOS: the separator, not text
    return HeldOut("text", docs, total) if docs else None
