"""Padded batch shapes: padding each batch to its longest row against bucketed widths
(``llmlab.data.pipeline.bucket_width``), measured side by side in one run.

    python benchmarks/batch_shapes.py [--steps 60] [--batch-size 8] [--seq-len 256] [--threads N]

The quick-start's SFT data (built-in ``chatterbot`` conversations, a 4,096-token tokenizer trained
on the fly) is batched as the sft stage batches it; for each of the first ``--steps`` batches the
longest row's length is kept. Then, each in its own Python process (so that its RSS is its own),
the quick-start's model (d_model 128, 4 layers, GQA, SwiGLU, RoPE; 1.3 M parameters) trains one
AdamW step per batch on the real token ids, laid out in one of four ways:

padfree         the rows' real tokens end to end in one row (``pack_rows(bucket=False)``: what
                llmlab's sft/dpo/reward stages did on its Transformer): a new length nearly every step;
padfree+bucket  the same row padded to ``bucket_width(N)`` (``pack_rows``: llmlab now);
padded          each batch padded to its longest row (models that cannot pack: TRL's default);
padded+bucket   padded to ``bucket_width(longest, seq_len)`` (llmlab now, for those models);

under bf16 autocast (what ``precision: auto`` picks on a CPU with native bf16) and in fp32.
Printed per contender: distinct shapes, wall time for all steps (each shape's first use
included, as a user meets it), real (unpadded) tokens per second, padding share, and RSS growth
from the first step to the last; then the bucketed / unbucketed ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(arch="transformer", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, attention_type="gqa", d_ff=384,
             max_seq_len=256, positional_encoding="rope", norm_type="rmsnorm", activation="swiglu",
             tie_embeddings=True)

#: one contender, in its own process: trains one step per batch, prints a JSON line
CONTENDER = textwrap.dedent("""
    import json, sys, time
    import torch
    sys.path.insert(0, {root!r})
    from llmlab.models.build import build_model
    from llmlab.models.padfree import bucket_width, pack_rows
    if {threads}:
        torch.set_num_threads({threads})
    rows = json.load(open({rows!r}))
    torch.manual_seed(0)
    model = build_model({model!r}, vocab_size={vocab})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
    shapes, real, padded = set(), 0, 0
    rss0 = None
    t0 = time.perf_counter()
    for batch in rows:
        longest = max(map(len, batch))
        width = bucket_width(longest, {seq_len}) if {bucketed} and not {padfree} else longest
        ids = torch.full((len(batch), width), {pad}, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        if {padfree}:
            p = pack_rows(ids, mask, labels, bucket={bucketed})
            inputs = dict(input_ids=p.input_ids, position_ids=p.position_ids, labels=p.labels)
        else:
            inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled={bf16}):
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        shapes.add(tuple(inputs["input_ids"].shape))
        real += int(mask.sum())
        padded += inputs["input_ids"].numel()
        if rss0 is None:
            rss0 = rss()
    wall = time.perf_counter() - t0
    print("RESULT", json.dumps({{"wall": wall, "shapes": len(shapes), "real": real, "padded": padded,
                                 "rss_growth": rss() - rss0, "rss": rss()}}))
""")


def batch_rows(steps: int, batch_size: int, seq_len: int, workdir: Path) -> tuple[list, int, int]:
    """The token ids of the rows of the sft stage's first ``steps`` batches, its vocabulary size
    and pad id."""
    from llmlab.data.pipeline import build_stage_data
    from llmlab.data.tokenizer import build_tokenizer

    recipe = {"name": "shapes", "seed": 1, "output_dir": str(workdir),
              "tokenizer": {"train": {"datasets": ["bible"], "vocab_size": 4096}, "chat_template": "chatml"},
              "model": dict(MODEL, max_seq_len=seq_len),
              "datasets": {"bible": {"builtin": "kjv", "format": "text"},
                           "chat": {"builtin": "chatterbot", "format": "messages"}},
              "stages": {"sft": {"type": "sft", "datasets": {"chat": 1.0}, "seq_len": seq_len,
                                 "batch_size": batch_size, "max_steps": steps, "max_dropped_fraction": 1.0}}}
    tok = build_tokenizer(recipe, workdir / "tokenizer")
    data = build_stage_data(recipe, "sft", tok)
    rows = []
    for i in range(steps):
        b = data.train_batch(i)
        rows.append([r[m.bool()].tolist() for r, m in zip(b["input_ids"], b["attention_mask"])])
    return rows, len(tok), data.pad_token_id


def main() -> None:
    from benchmarks._common import add_threads_arg, machine_note

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    add_threads_arg(ap)
    args = ap.parse_args()
    print(machine_note())
    with tempfile.TemporaryDirectory() as tmp:
        rows, vocab, pad = batch_rows(args.steps, args.batch_size, args.seq_len, Path(tmp))
        (Path(tmp) / "rows.json").write_text(json.dumps(rows))
        res = {}
        for bf16 in (True, False):
            for padfree in (True, False):
                for bucketed in (False, True):
                    code = CONTENDER.format(root=str(ROOT), rows=str(Path(tmp) / "rows.json"), model=MODEL,
                                            vocab=vocab, seq_len=args.seq_len, bucketed=bucketed, padfree=padfree,
                                            pad=pad, bf16=bf16, threads=args.threads or 0)
                    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True).stdout
                    res[bf16, padfree, bucketed] = r = json.loads(out.split("RESULT", 1)[1])
                    name = ("padfree" if padfree else "padded") + ("+bucket" if bucketed else "")
                    print(f"{'bf16' if bf16 else 'fp32'} {name:15s}: {r['shapes']:3d} shapes, {r['wall']:6.1f} s "
                          f"for {args.steps} steps, {r['real'] / r['wall']:8,.0f} real tokens/s, padding "
                          f"{1 - r['real'] / r['padded']:.0%}, RSS +{r['rss_growth'] / 2**20:.0f} MiB "
                          f"(to {r['rss'] / 2**20:.0f} MiB)", flush=True)
        for bf16 in (True, False):
            for padfree in (True, False):
                a, b = res[bf16, padfree, False], res[bf16, padfree, True]
                print(f"{'bf16' if bf16 else 'fp32'} {'padfree' if padfree else 'padded'}: bucketed / not: real "
                      f"tokens/s x{a['wall'] / b['wall']:.2f}, RSS growth {b['rss_growth'] / 2**20:.0f} vs "
                      f"{a['rss_growth'] / 2**20:.0f} MiB")

if __name__ == "__main__":
    main()
