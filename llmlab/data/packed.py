"""Pretraining examples read lazily from token stores: packed blocks, weighted mixing by index.

A pretraining stage's training example is a *block*: ``seq_len`` consecutive tokens of one
source's stream (its documents in order, each ending with EOS, as written in its
:class:`~llmlab.data.store.TokenStore`). Source ``s`` has ``N_s = tokens_s // seq_len`` blocks
(one right-padded block when it holds fewer than ``seq_len`` tokens); block ``j`` is the window
``[j * seq_len, (j + 1) * seq_len)``, read from the memmaps when a batch asks for it. Position ids
count from 0 at the start of each block and after each EOS (as :func:`pack_documents` does).

Example ``p`` of the training stream (``p = index * batch_size + j``) is found without any
materialised stream:

1. its source: positions are grouped in chunks of :data:`CHUNK`; chunk ``c`` draws how many of
   its positions each source gets, ``multinomial(CHUNK, weights)``, and their order, a
   permutation, from a generator seeded by (seed, "mix", stage, c). The source of ``p`` is read
   off its chunk, and ``k``, the number of earlier positions given to that source, is the sum of
   the earlier chunks' counts plus the count within the chunk;
2. its block: ``k`` is the source's own position; the source is read in epochs, block
   ``perm_e[k mod N_s]`` with ``perm_e`` the permutation of ``N_s`` drawn from a generator seeded
   by (seed, "epoch", stage, epoch) for a single source and (seed, "epoch", stage, source name,
   epoch) in a mixture. A single source thus yields the same batches as packing its whole stream.

So ``batch(index)`` is a pure function of (seed, stage, index, the stores), shares follow the
weights (per block, i.e. per token) as closely as independent draws, memory is the current chunk
and one permutation per source (8 bytes a block), and start-up does not read the corpus.
This is the scheme of Megatron-LM's blended dataset (a source per sample by weight, an index into
that source), with the per-source epochs of nanoGPT-style memmap readers.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

IGNORE_INDEX = -100
CHUNK = 8192  # positions per mixing chunk


def _rng(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng([int(seed)] + [zlib.crc32(str(k).encode()) for k in keys])


def block_positions(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Position ids of one block: 0 at its start and after each ``eos_id``, counting on otherwise.

    Args:
        ids: int array [L]. Returns: int64 [L].
    """
    ar = np.arange(ids.shape[0], dtype=np.int64)
    start = np.zeros(ids.shape[0], dtype=bool)
    start[0] = True
    start[1:] = ids[:-1] == eos_id
    return ar - np.maximum.accumulate(np.where(start, ar, 0))


def pack_documents(flat: np.ndarray, eos_id: int, seq_len: int, pad_id: int):
    """Cut a (small, in-memory) stream of EOS-terminated documents into ``seq_len`` blocks.

    Used for held-out data, bounded by ``eval_steps``; training reads blocks lazily instead.

    Args:
        flat: int array [L], the documents' token ids joined (each document ends with ``eos_id``).

    Returns:
        ``(blocks, positions)``, int32 arrays [N, seq_len], N = L // seq_len (the remainder is
        dropped; when L < seq_len one right-padded block). Position ids as :func:`block_positions`.

    Raises:
        ValueError: empty stream.
    """
    flat = np.asarray(flat, dtype=np.int32)
    if flat.size == 0:
        raise ValueError("no tokens to pack")
    if flat.size < seq_len:
        flat = np.concatenate([flat, np.full(seq_len - flat.size, pad_id, dtype=np.int32)])
    n = flat.size // seq_len
    flat = flat[: n * seq_len]
    ar = np.arange(flat.size, dtype=np.int64)
    start = np.zeros(flat.size, dtype=bool)
    start[0] = True
    start[1:] = flat[:-1] == eos_id
    start[::seq_len] = True
    positions = (ar - np.maximum.accumulate(np.where(start, ar, 0))).astype(np.int32)
    return flat.reshape(n, seq_len), positions.reshape(n, seq_len)


class PackedSource:
    """The ``seq_len`` blocks of one store's token stream, read on demand.

    Args:
        store: a :class:`~llmlab.data.store.TokenStore` (or anything with ``tokens`` and
            ``window(start, stop)``).
        seq_len, eos_id, pad_id: as named.
    """

    def __init__(self, store, seq_len: int, eos_id: int, pad_id: int):
        if store.tokens == 0:
            raise ValueError("no tokens to pack")
        self.store, self.seq_len, self.eos_id, self.pad_id = store, seq_len, eos_id, pad_id
        self.num_blocks = max(1, store.tokens // seq_len)

    def block(self, j: int) -> np.ndarray:
        """Token ids of block ``j``: int64 [seq_len] (right-padded when the store is shorter)."""
        lo = j * self.seq_len
        hi = min(lo + self.seq_len, self.store.tokens)
        ids = self.store.window(lo, hi)
        if ids.shape[0] < self.seq_len:
            ids = np.concatenate([ids, np.full(self.seq_len - ids.shape[0], self.pad_id, dtype=np.int64)])
        return ids


class PretrainStream:
    """A pretraining stage's training examples: blocks of weighted sources, located by index.

    Args:
        sources: one :class:`PackedSource` per dataset, in the stage's ``datasets:`` order.
        names: the datasets' names. weights: their weights (> 0). seed, stage: the generator keys.

    Raises:
        ValueError: no source, or a weight that is not > 0.
    """

    def __init__(self, sources: list[PackedSource], names: list[str], weights: list[float], seed: int,
                 stage: str):
        if not sources or any(w <= 0 for w in weights):
            raise ValueError(f"mixture weights must be > 0, got {weights}")
        self.sources, self.names, self.seed, self.stage = sources, names, int(seed), stage
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self._base = np.zeros((1, len(sources)), dtype=np.int64)  # counts before chunk c
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def num_blocks(self) -> int:
        """Blocks of all sources together (one epoch of each)."""
        return int(sum(s.num_blocks for s in self.sources))

    # -- mixing ------------------------------------------------------------------------------
    def _counts(self, c: int) -> np.ndarray:
        return _rng(self.seed, "mix", self.stage, c).multinomial(CHUNK, self.weights)

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position, its rank among the chunk's positions of that source)."""
        if c not in self._chunks:
            if len(self._chunks) > 8:
                self._chunks.clear()
            rng = _rng(self.seed, "mix", self.stage, c)
            counts = rng.multinomial(CHUNK, self.weights)
            order = rng.permutation(np.repeat(np.arange(len(self.sources)), counts))
            rank = np.empty(CHUNK, dtype=np.int64)
            for s in range(len(self.sources)):
                at = np.flatnonzero(order == s)
                rank[at] = np.arange(at.size)
            self._chunks[c] = (order, rank)
        return self._chunks[c]

    def _base_counts(self, c: int) -> np.ndarray:
        """Positions given to each source before chunk ``c``: int64 [S]."""
        if c >= self._base.shape[0]:
            start = self._base.shape[0] - 1
            add = np.stack([self._counts(k) for k in range(start, c)])
            self._base = np.concatenate([self._base, self._base[-1] + np.cumsum(add, axis=0)])
        return self._base[c]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source and block of each stream position.

        Args:
            positions: int array [B] (>= 0). Returns: ``(source, block)``, int64 [B] each.
        """
        positions = np.asarray(positions, dtype=np.int64)
        if len(self.sources) == 1:
            src = np.zeros(positions.shape[0], dtype=np.int64)
            k = positions
        else:
            src = np.empty(positions.shape[0], dtype=np.int64)
            k = np.empty(positions.shape[0], dtype=np.int64)
            for i, p in enumerate(positions):
                c, l = divmod(int(p), CHUNK)
                order, rank = self._chunk(c)
                src[i] = order[l]
                k[i] = self._base_counts(c)[order[l]] + rank[l]
        block = np.empty_like(k)
        for i, (s, kk) in enumerate(zip(src, k)):
            n = self.sources[s].num_blocks
            block[i] = self._perm(int(s), int(kk // n))[kk % n]
        return src, block

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        if (s, epoch) not in self._perms:
            if len(self._perms) > 2 * len(self.sources) + 2:
                self._perms.clear()
            keys = ("epoch", self.stage, epoch) if len(self.sources) == 1 else \
                ("epoch", self.stage, self.names[s], epoch)
            self._perms[(s, epoch)] = _rng(self.seed, *keys).permutation(self.sources[s].num_blocks)
        return self._perms[(s, epoch)]

    def shares(self, n: int) -> dict[str, float]:
        """Realised share of each source among the first ``n`` positions (blocks, so tokens)."""
        n = max(int(n), 1)
        if len(self.sources) == 1:
            return {self.names[0]: 1.0}
        c, l = divmod(n, CHUNK)
        counts = self._base_counts(c).astype(np.float64)
        if l:
            counts = counts + np.bincount(self._chunk(c)[0][:l], minlength=len(self.sources))
        return {name: float(v / n) for name, v in zip(self.names, counts)}

    # -- batches -----------------------------------------------------------------------------
    def batch(self, positions: np.ndarray, pad_token_id: int) -> dict:
        """The examples at ``positions`` as a batch: ``input_ids``, ``labels`` (−100 on padding)
        and ``position_ids``, LongTensors [B, seq_len]."""
        src, block = self.locate(positions)
        ids = np.stack([self.sources[s].block(int(j)) for s, j in zip(src, block)])
        eos = self.sources[0].eos_id
        pos = np.stack([block_positions(r, eos) for r in ids])
        ids_t = torch.from_numpy(ids)
        labels = ids_t.clone()
        labels[ids_t == pad_token_id] = IGNORE_INDEX
        return {"input_ids": ids_t, "labels": labels, "position_ids": torch.from_numpy(pos)}


def eval_blocks(stores: list, weights: list[float], seed: int, stage: str, seq_len: int, eos_id: int,
                pad_id: int, max_blocks: int):
    """Held-out blocks: documents drawn from ``stores`` ∝ ``weights`` (one store: in order) until
    one store runs out or ``max_blocks`` blocks are filled, then packed.

    Memory is bounded by ``max_blocks × seq_len`` tokens, whatever the stores hold.

    Returns:
        ``(blocks, positions)`` as :func:`pack_documents` (at most ``max_blocks`` rows), or None
        when the stores hold no document.
    """
    need = max_blocks * seq_len
    docs, total = [], 0
    cursor = [0] * len(stores)
    w = np.asarray(weights, dtype=np.float64)
    rng = _rng(seed, "eval-mix", stage)
    picks: np.ndarray = np.zeros(0, dtype=np.int64)
    while total < need:
        if len(stores) == 1:
            s = 0
        else:
            if picks.size == 0:
                picks = rng.choice(len(stores), size=1024, p=w / w.sum())
            s, picks = int(picks[0]), picks[1:]
        if cursor[s] >= stores[s].documents:
            break  # first exhausted
        doc = stores[s].document(cursor[s])
        cursor[s] += 1
        docs.append(doc)
        total += doc.shape[0]
    if not docs:
        return None
    blocks, positions = pack_documents(np.concatenate(docs), eos_id, seq_len, pad_id)
    return blocks[:max_blocks], positions[:max_blocks]
