"""A grpo stage's data start-up on N prompts: cold (nothing tokenised) and prepared (the stores
exist), wall time, main-process CPU and peak RSS (anonymous and file-backed, sampled every 0.1 s).

    python benchmarks/prompt_data_scale.py --sizes 50000 200000 [--source local|hub] [--tree PATH ...]

``--tree``: the llmlab source trees to time (default: this one), e.g. an older commit unpacked with
``git archive COMMIT | tar -x -C /tmp/old``. ``--source hub``: the prompts are read as a hub dataset
(a local dataset repo, HF_HUB_OFFLINE=1, without ``streaming: true``); ``local``: as a local jsonl.
Each measurement runs in a fresh process (``--child``). The prompts: one user turn of 10-60 random
KJV words, an integer answer; the tokenizer: byte-level BPE (4,096) trained on the KJV, chatml.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _recipe(work: Path, n: int, source: str, out: Path) -> dict:
    data = work / f"hub-{n}"
    ds = {"path": str(data / "train.jsonl")} if source == "local" else {"hub": str(data)}
    return {"name": "bench", "seed": 7, "output_dir": str(out),
            "tokenizer": {"train": {"datasets": ["bible"], "vocab_size": 4096, "max_documents": 400},
                          "chat_template": "chatml"},
            "model": {"arch": "transformer", "max_seq_len": 512},
            "datasets": {"bible": {"builtin": "kjv", "format": "text"}, "p": {**ds, "eval_split": 0.02}},
            "stages": {"grpo": {"type": "grpo", "datasets": {"p": 1.0}, "seq_len": 512, "batch_size": 8,
                                "max_steps": 2, "eval_steps": 1, "max_new_tokens": 64}}}


def _setup(work: Path, sizes: list[int]) -> None:
    """The prompt files (``hub-N/train.jsonl``) and the tokenizer (``tok/``), once."""
    sys.path.insert(0, str(HERE))
    from llmlab.data.builtins import kjv_chapters
    from llmlab.data.tokenizer import build_tokenizer

    words = " ".join(r["text"] for r in kjv_chapters()[:200]).split()
    for n in sizes:
        f = work / f"hub-{n}" / "train.jsonl"
        if f.is_file():
            continue
        f.parent.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        with open(f, "w") as fh:
            for i in range(n):
                q = " ".join(rng.choice(words) for _ in range(rng.randint(10, 60)))
                fh.write(json.dumps({"prompt": [{"role": "user", "content": f"{q}? ({i})"}],
                                     "answer": str(rng.randint(0, 999))}) + "\n")
    if not (work / "tok").is_dir():
        build_tokenizer(_recipe(work, sizes[0], "local", work / "tokrun"), work / "tok")


def _child(tree: str, work: Path, n: int, source: str, out: Path) -> None:
    """One measurement in this process (llmlab imported from ``tree``); prints one JSON line."""
    sys.path.insert(0, tree)
    from llmlab.data.pipeline import build_stage_data
    from llmlab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(work / "tok")
    peaks = {"RssAnon": 0, "RssFile": 0}

    def sample():
        while True:
            for line in open("/proc/self/status"):
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]) // 1024)
            time.sleep(0.1)
    threading.Thread(target=sample, daemon=True).start()
    t0, c0 = time.perf_counter(), time.process_time()
    data = build_stage_data(_recipe(work, n, source, out), "grpo", tok)
    data.train_batch(0)
    data.eval_batches()
    print(json.dumps({"n": n, "wall_s": round(time.perf_counter() - t0, 2),
                      "cpu_s_main": round(time.process_time() - c0, 2), "examples": data.num_train_examples,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "peak_anon_mb": peaks["RssAnon"], "peak_file_mb": peaks["RssFile"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--source", choices=("local", "hub"), default="local")
    ap.add_argument("--tree", nargs="+", default=[str(HERE)])
    ap.add_argument("--work", default="/tmp/llmlab-prompt-bench")
    ap.add_argument("--child", nargs=3, metavar=("TREE", "N", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.child:
        _child(args.child[0], work, int(args.child[1]), args.source, Path(args.child[2]))
        return
    _setup(work, args.sizes)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    for n in args.sizes:
        for tree in args.tree:
            out = work / "run"
            shutil.rmtree(out, ignore_errors=True)
            for phase in ("cold", "prepared"):
                got = subprocess.run([sys.executable, __file__, "--work", str(work), "--source", args.source,
                                      "--child", tree, str(n), str(out)], env=env, capture_output=True, text=True)
                line = got.stdout.strip().splitlines()[-1] if got.returncode == 0 else got.stderr[-2000:]
                print(f"{tree} {phase}: {line}", flush=True)
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
