"""Where bf16 autocast starts to pay on this CPU: train-step time, fp32 against bf16 autocast, of
Llama-style and Mamba2 models of growing width (issue #27 item 5: ``precision: auto``).

    python benchmarks/precision_crossover.py --threads 1
    python benchmarks/precision_crossover.py --widths 64,128,256,512 --steps 8

Each model (transformers' ``LlamaForCausalLM`` / ``Mamba2ForCausalLM`` built from a config: d_model
given, 4 layers, head_dim 32, d_ff = 8/3 d_model rounded to 16, vocab 4,096, batch 8 x 128 random
tokens) takes ``--steps`` AdamW steps (after 2 warm-up steps; with ``--varied`` fine-tuning's changing batch
widths, first uses included), in fp32 and under ``torch.autocast("cpu", torch.bfloat16)``,
interleaved (fp32, bf16, fp32, bf16, ...); the table gives the CPU time per step of each (process
time, so other processes on a shared machine barely move it; run with ``--threads 1``) and
fp32 / bf16 (> 1: bf16 is faster). ``llmlab.train.precision``'s
rule (:data:`~llmlab.train.precision.CPU_BF16_MIN_D_MODEL`) comes from this table; its figures are in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import add_threads_arg, apply_threads, machine_note, table


def _model(arch: str, d: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    if arch == "mamba2":
        heads = (2 * d) // 32
        cfg = Mamba2Config(vocab_size=4096, hidden_size=d, num_hidden_layers=4, state_size=32, head_dim=32,
                           num_heads=heads, expand=2, n_groups=1, chunk_size=64, tie_word_embeddings=True)
        return Mamba2ForCausalLM(cfg)
    d_ff = ((8 * d // 3) + 15) // 16 * 16
    cfg = LlamaConfig(vocab_size=4096, hidden_size=d, intermediate_size=d_ff, num_hidden_layers=4,
                      num_attention_heads=max(d // 32, 1), num_key_value_heads=max(d // 32, 1),
                      max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


#: batch widths of a fine-tuning stage's padded batches (llmlab.models.padfree.bucket_width's values
#: below 256): each step takes the next, so every step but the first few meets a shape seen before
#: only ``len(WIDTHS)`` steps ago, as an SFT or DPO stage does
WIDTHS = (48, 64, 80, 96, 112, 128, 160, 192)


def step_times(arch: str, d: int, steps: int, varied: bool, rounds: int = 2) -> tuple[float, float]:
    """Mean CPU seconds (this process's user + system time: robust to other processes on a shared
    machine, exact with one thread) per train step, (fp32, bf16 autocast), interleaved rounds.
    ``varied``: batches 16 x ``WIDTHS[i % 8]`` (fine-tuning's shapes, first uses included), else
    8 x 128 (pretraining's one shape, after 2 warm-up steps)."""
    g = torch.Generator().manual_seed(0)
    times = {False: [], True: []}
    for _ in range(rounds):
        for bf16 in (False, True):
            model = _model(arch, d)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            warm = 0 if varied else 2
            t0 = 0.0
            for i in range(steps + warm):
                if i == warm:
                    t0 = time.process_time()
                ids = torch.randint(0, 4096, (16, WIDTHS[i % len(WIDTHS)]) if varied else (8, 128), generator=g)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            times[bf16].append((time.process_time() - t0) / steps)
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,128,192,256,384,512")
    ap.add_argument("--archs", default="llama,mamba2")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--varied", action="store_true", help="fine-tuning's varied batch widths (default: one shape)")
    add_threads_arg(ap)
    args = ap.parse_args()
    apply_threads(args.threads)
    print(machine_note())
    rows = []
    for arch in args.archs.split(","):
        for d in map(int, args.widths.split(",")):
            fp32, bf16 = step_times(arch, d, args.steps, args.varied)
            rows.append([arch, d, f"{fp32 * 1e3:.1f}", f"{bf16 * 1e3:.1f}", f"{fp32 / bf16:.2f}"])
            print(table(rows[-1:], ["model", "d_model", "fp32 CPU ms/step", "bf16 CPU ms/step", "fp32 / bf16"]), flush=True)
    print(table(rows, ["model", "d_model", "fp32 CPU ms/step", "bf16 CPU ms/step", "fp32 / bf16"]))


if __name__ == "__main__":
    main()
