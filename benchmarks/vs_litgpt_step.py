"""llmlab's training step against LitGPT's, step for step in ONE process (the same load for each):
CPU time per step of the 5.26 M model of benchmarks/vs_litgpt.py (issue 27).

    python benchmarks/vs_litgpt_step.py                        # fp32: llmlab eager, compiled, LitGPT
    python benchmarks/vs_litgpt_step.py --precision bf16 --steps 16

On a machine shared with other work, whole runs in fresh processes (vs_litgpt.py) see different
load; here every contender runs one step in turn (the order alternating), so each sees the same.
A step: forward, loss, backward, gradient clipping at 1.0, AdamW, on 8 × 256 batches whose
position ids restart mid-row in every third row (packed documents). llmlab: ``LlmlabForCausalLM``
with its model loss (chunked on a CPU), fused AdamW as ``llmlab run`` uses; ``compile``:
``torch.compile`` of it. LitGPT: its ``GPT`` imported from the LitGPT venv (made as vs_litgpt.py
says; its site-packages go last on ``sys.path``, so torch is this venv's), compiled, with
``chunked_cross_entropy`` outside the graph and AdamW unfused, as ``litgpt.pretrain`` runs them on
a CPU. Prints the median and best CPU ms per step, tokens per CPU-second, the ratio to the last
contender, and each one's start-up (building, compiling and 3 untimed steps). One thread.
``llmlab run``'s allocator setting (llmlab.train.setup.keep_freed_memory) is left out: in one
process it would apply to every contender.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from vs_litgpt import MODEL  # noqa: E402

import torch  # noqa: E402

VOCAB, BATCH, SEQ = 4096, 8, 256


def packed_batch(g: torch.Generator) -> dict:
    """Random tokens [8, 256]; position ids restart mid-row in rows 0, 3, 6."""
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).repeat(BATCH, 1)
    for r in range(0, BATCH, 3):
        cut = int(torch.randint(1, SEQ, (1,), generator=g))
        pos[r, cut:] = torch.arange(SEQ - cut)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}


def llmlab_step(compiled: bool, autocast):
    """One training step of llmlab's Transformer (a closure over model and optimizer)."""
    from llmlab.models.configuration_llmlab import LlmlabConfig
    from llmlab.models.modeling_llmlab import LlmlabForCausalLM

    torch.manual_seed(0)
    cfg = LlmlabConfig(vocab_size=VOCAB, max_seq_len=SEQ, tie_word_embeddings=False, **MODEL)
    model = LlmlabForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    fwd = torch.compile(model) if compiled else model

    def step(b):
        with autocast():
            loss = fwd(**b, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def litgpt_step(litgpt_python: str, autocast):
    """One training step of LitGPT's GPT, compiled, as litgpt.pretrain runs it on a CPU."""
    purelib = subprocess.run([litgpt_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    sys.path.append(purelib)
    from litgpt.model import GPT, Config
    from litgpt.utils import chunked_cross_entropy

    torch.manual_seed(0)
    config = Config(name="vs-llmlab", block_size=SEQ, vocab_size=VOCAB, padded_vocab_size=VOCAB,
                    n_layer=MODEL["n_layers"], n_head=MODEL["n_heads"], n_query_groups=MODEL["n_kv_heads"],
                    n_embd=MODEL["d_model"], head_size=MODEL["d_model"] // MODEL["n_heads"], rotary_percentage=1.0,
                    parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=1e-5,
                    mlp_class_name="LLaMAMLP", intermediate_size=MODEL["d_ff"], rope_base=10000)
    model = GPT(config)
    model.max_seq_length = SEQ - 1
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fwd = torch.compile(model)

    def step(b):
        ids = b["input_ids"]
        with autocast():
            loss = chunked_cross_entropy(fwd(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    ap.add_argument("--contenders", nargs="+", choices=["eager", "compile", "litgpt"],
                    default=["eager", "compile", "litgpt"])
    ap.add_argument("--litgpt-python", default="/work/litgpt-venv/bin/python")
    args = ap.parse_args()
    torch.set_num_threads(1)
    C.quiet()
    print(C.machine_note())
    bf16 = args.precision == "bf16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    makers = {"eager": lambda: llmlab_step(False, autocast), "compile": lambda: llmlab_step(True, autocast),
              "litgpt": lambda: litgpt_step(args.litgpt_python, autocast)}
    g = torch.Generator().manual_seed(1)
    warm = [packed_batch(g) for _ in range(3)]
    steps, startup = {}, {}
    for name in args.contenders:
        t0, w0 = time.process_time(), time.time()
        steps[name] = makers[name]()
        for b in warm:
            steps[name](b)
        startup[name] = (time.process_time() - t0, time.time() - w0)
    times: dict[str, list[float]] = {n: [] for n in args.contenders}
    for i in range(args.steps):
        b = packed_batch(g)
        for name in args.contenders if i % 2 == 0 else args.contenders[::-1]:
            t = time.process_time()
            steps[name](b)
            times[name].append(time.process_time() - t)
    base = statistics.median(times[args.contenders[-1]])
    for name in args.contenders:
        med = statistics.median(times[name])
        print(f"{args.precision} {name:<8} median {med * 1e3:7.1f} ms  best {min(times[name]) * 1e3:7.1f} ms  "
              f"{BATCH * SEQ / med:6,.0f} tok/CPU-s  vs {args.contenders[-1]} {base / med:.3f}  "
              f"start-up CPU {startup[name][0]:.1f} s, wall {startup[name][1]:.1f} s")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
