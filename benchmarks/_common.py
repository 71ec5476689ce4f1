"""Shared set-up for the llmlab benchmarks: a recipe dict, its resolved form, the run's tokenizer,
llmlab's stage data, machine notes, MFU and small timing helpers.

Not a benchmark itself. Everything here goes through llmlab's public pieces (``load_recipe``,
``Runner.ensure_tokenizer``, ``build_stage_data``, ``build_model``) so that every contender of a
benchmark sees exactly the tokenizer, model config and batches that ``llmlab run`` would.
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
if os.environ.get("LLMLAB_BENCH_THREADS"):  # set by --threads; inherited by the RSS subprocesses
    import torch as _torch

    _torch.set_num_threads(int(os.environ["LLMLAB_BENCH_THREADS"]))


def add_threads_arg(ap) -> None:
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, one per core). On a machine shared with other "
                         "busy processes use --threads 1: several threads that wait for each other at every op "
                         "lose far more to descheduling than one thread does, and the comparison gets noisy")


def apply_threads(n: int | None) -> None:
    if n:
        import torch

        os.environ["LLMLAB_BENCH_THREADS"] = str(n)
        torch.set_num_threads(n)

# Model sizes (Llama-style: rope + rmsnorm + swiglu, GQA, tied embeddings) with a 4,096-token
# tokenizer trained on the King James Bible. Parameter counts include the (tied) embedding.
SIZES = {
    "1m": dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384),     # ~0.9 M (smoke tests)
    "5m": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=768),     # ~5.7 M
    "25m": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1408),   # ~25.7 M
    "124m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048),  # GPT-2-small class
}


def base_recipe(size: str = "5m", seq_len: int = 128, batch_size: int = 8, max_steps: int = 20,
                vocab_size: int = 4096, kjv_docs: int = 300, chat_docs: int = 600) -> dict:
    """A quick-start-shaped recipe (pretrain → sft → dpo) sized for benchmarking."""
    dims = SIZES[size]
    opt = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}
    common = {"seq_len": seq_len, "batch_size": batch_size, "max_steps": max_steps,
              "optimizer": opt, "scheduler": {"name": "cosine", "warmup_steps": 2},
              "eval_every": 10**6, "eval_steps": 1, "save_every": 10**6, "log_every": 10}
    return {
        "name": f"bench-{size}",
        "seed": 1234,
        "precision": "fp32",
        "device": "cpu",
        "tokenizer": {"train": {"datasets": ["bible"], "vocab_size": vocab_size, "max_documents": 400},
                      "chat_template": "chatml"},
        "model": {"arch": "transformer", **dims, "attention_type": "gqa" if dims["n_kv_heads"] < dims["n_heads"] else "mha",
                  "max_seq_len": max(seq_len, 256), "positional_encoding": "rope", "norm_type": "rmsnorm",
                  "activation": "swiglu", "tie_embeddings": True},
        "datasets": {
            "bible": {"builtin": "kjv", "format": "text", "eval_split": 0.01, "max_samples": kjv_docs},
            "chat": {"builtin": "chatterbot", "format": "messages", "eval_split": 0.05, "max_samples": chat_docs},
            "chat_pairs": {"builtin": "chatterbot_pairs", "format": "preference", "eval_split": 0.05,
                           "max_samples": chat_docs},
        },
        "stages": {
            "pretrain": {"type": "pretrain", "datasets": {"bible": 1.0}, **copy.deepcopy(common)},
            "sft": {"type": "sft", "datasets": {"chat": 1.0}, **copy.deepcopy(common)},
            "dpo": {"type": "dpo", "datasets": {"chat_pairs": 1.0}, "beta": 0.1, **copy.deepcopy(common)},
        },
    }


def resolve(recipe: dict, workdir: Path) -> dict:
    """Write ``recipe`` as YAML into ``workdir`` and load it with llmlab's loader (validated,
    defaults filled, paths absolute). Raises SystemExit with the errors when invalid."""
    import yaml

    from llmlab.recipe import load_recipe

    rec = copy.deepcopy(recipe)
    rec["output_dir"] = str(workdir / "run")
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    resolved, errors = load_recipe(path)
    if errors:
        raise SystemExit("invalid benchmark recipe:\n" + "\n".join(map(str, errors)))
    return resolved


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("llmlab").setLevel(logging.ERROR)
    try:
        from llmlab.commands.run import quiet_libraries

        quiet_libraries()
    except Exception:  # pragma: no cover
        pass


def tokenizer_for(resolved: dict):
    """The run's tokenizer, trained (or reused) exactly as ``llmlab run`` does."""
    from rich.console import Console

    from llmlab.runner import Runner

    runner = Runner(resolved, console=Console(quiet=True))
    Path(resolved["output_dir"]).mkdir(parents=True, exist_ok=True)
    tok, _ = runner.ensure_tokenizer()
    return tok


def stage_data(resolved: dict, stage: str, tokenizer):
    from llmlab.data.pipeline import build_stage_data

    return build_stage_data(resolved, stage, tokenizer)


def make_workdir(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"llmlab-bench-{tag}-"))


def machine_note() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    la = os.getloadavg()
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {cpu} | {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads) | load average "
            f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so contenders in one process each set their own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def n_params(model) -> int:
    """Unique parameters (a tied embedding counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def flops_per_token(n: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    """nanoGPT / PaLM (appendix B): 6N + 12·L·H·Q·T training FLOPs per token."""
    return 6.0 * n + 12.0 * n_layers * n_heads * head_dim * seq_len


def hf_trainer_kwargs(cfg: dict, output_dir: Path, seed: int) -> dict:
    """TrainingArguments keywords that reproduce an llmlab stage's optimizer and schedule (AdamW
    beta 0.9/0.95, eps 1e-8, clip 1.0, cosine to 10% after warmup) with no eval, save or logging, so
    every Hugging Face contender (Trainer, TRL) trains exactly as llmlab does. fp32 and no
    activation checkpointing, stated explicitly: TRL's configs default to ``bf16=True`` and
    ``gradient_checkpointing=True`` (override ``bf16`` for a bf16 comparison)."""
    ocfg, scfg = cfg["optimizer"], cfg["scheduler"]
    return dict(
        output_dir=str(output_dir), per_device_train_batch_size=cfg["batch_size"], max_steps=cfg["max_steps"],
        learning_rate=float(ocfg["lr"]), weight_decay=float(ocfg["weight_decay"]), adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch", lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=int(scfg["warmup_steps"]), logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, seed=seed,
        disable_tqdm=True, bf16=False, gradient_checkpointing=False)


def step_clock(marks: dict, steps: tuple[int, ...]):
    """A TrainerCallback that records ``time.perf_counter()`` into ``marks`` at the given global steps."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in steps:
                marks[state.global_step] = time.perf_counter()

    return Clock()


def median(xs):
    xs = sorted(xs)
    k = len(xs)
    return xs[k // 2] if k % 2 else 0.5 * (xs[k // 2 - 1] + xs[k // 2])


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * x for x in w)] + [line(r) for r in cells[1:]])
