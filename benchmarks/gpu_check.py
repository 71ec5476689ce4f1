"""The first-contact GPU check's Python parts (driven by benchmarks/gpu_check.sh), each a function
that prints one line and returns a JSON-able record.

    python benchmarks/gpu_check.py PART [--cpu-dry-run] [--out DIR] [--steps N]

Parts (no internet needed: the data is llmlab's builtin King James Bible and chatterbot corpus):

throughput  ``llmlab run`` of recipes/gpu_124m_fineweb.yaml's pretrain stage with local data (the
            recipe's model, optimizer, precision and compile; the builtin KJV instead of the
            streamed FineWeb-Edu; ``--steps`` steps, gradient accumulation 2): steady-state
            tokens/s (median of the log records after the first fifth of the steps: compile and
            warm-up excluded) and MFU = tokens/s × (6N + 12·L·H·Q·T) / the measured bf16 matmul peak
            (benchmarks/peak_flops.py; the goal on an H100/H200 is ≥ 45 %).
packed      one batch of documents packed into rows (restarting position ids: flash-attn's varlen
            kernel on CUDA) against the same documents padded one per row: per-token loss of
            both, in bf16, and of the packed batch in fp32; reports which attention kernel ran.
qlora       ``llmlab run`` of a small pretrain → sft stage with ``lora: {quantize: 4bit}``
            (bitsandbytes; the quantization is left out in a CPU dry run, where bitsandbytes has no
            kernels): the sft loss must fall and final/ must be merged.
mamba2      a few training steps of a small Mamba2 model; reports whether transformers found the
            mamba_ssm / causal_conv1d kernels (fast path) and the tokens/s.
fsdp1       ``distributed.strategy: fsdp``'s sharding (llmlab.train.fsdp.shard_model) on a world of
            one process (nccl on CUDA, gloo on CPU): one optimizer step of the 124 M model
            (a tiny one in a dry run) with a finite loss and a full state dict gathered back.

``--cpu-dry-run`` runs every part on the CPU at tiny sizes, so the script's first run on a GPU
is not its first run (tests/test_gpu_check.py runs it in the suite).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import yaml  # noqa: E402

GPU_RECIPE = ROOT / "recipes" / "gpu_124m_fineweb.yaml"
TINY_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "attention_type": "gqa", "d_ff": 128,
              "max_seq_len": 128}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def _run_recipe(recipe: dict, workdir: Path) -> list[dict]:
    """``llmlab run`` the recipe in ``workdir`` (a subprocess, as a user runs it); returns the
    pretrain or last stage's metrics records.

    Raises:
        RuntimeError: the run failed (its output's tail in the message).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "llmlab.cli", "run", str(path)], cwd=workdir, env=_env(),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llmlab run failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return [json.loads(x) for x in (workdir / "run" / list(recipe["stages"])[-1] / "metrics.jsonl").read_text().splitlines()]


def local_gpu_recipe(steps: int, dry: bool) -> dict:
    """recipes/gpu_124m_fineweb.yaml's pretrain stage on the builtin KJV (no internet): its model,
    optimizer, schedule, precision and compile; tiny sizes on the CPU in a dry run."""
    rec = yaml.safe_load(GPU_RECIPE.read_text())
    rec["datasets"] = {"kjv": {"builtin": "kjv", "format": "text", "eval_split": 0.01}}
    rec["tokenizer"] = {"train": {"datasets": ["kjv"], "vocab_size": rec["tokenizer"]["train"]["vocab_size"],
                                  "max_documents": 2000}}
    pre = rec["stages"]["pretrain"]
    pre.update(datasets={"kjv": 1.0}, max_steps=steps, gradient_accumulation_steps=2, eval_every=steps, eval_steps=2,
               save_every=steps, log_every=max(1, steps // 20))
    pre["scheduler"]["warmup_steps"] = max(1, steps // 10)
    rec["stages"] = {"pretrain": pre}
    rec["output_dir"] = "run"
    if dry:
        rec.update(device="cpu", precision="fp32", compile=False)
        rec["model"].update(TINY_MODEL)
        rec["tokenizer"]["train"].update(vocab_size=512, max_documents=200)
        rec["datasets"]["kjv"]["max_samples"] = 300
        pre.update(seq_len=64, batch_size=4)
        pre["optimizer"]["fused"] = False
    return rec


def part_throughput(out: Path, steps: int, dry: bool) -> dict:
    from _common import flops_per_token
    from peak_flops import measure_peak

    import torch

    from llmlab.models.params import count_parameters

    rec = local_gpu_recipe(steps, dry)
    records = [r for r in _run_recipe(rec, out / "throughput") if "tokens_per_s" in r]
    steady = [r["tokens_per_s"] for r in records if r["step"] > steps // 5] or [records[-1]["tokens_per_s"]]
    tps = statistics.median(steady)
    m, seq = rec["model"], rec["stages"]["pretrain"]["seq_len"]
    vocab = json.loads((out / "throughput" / "run" / "pretrain" / "final" / "config.json").read_text())["vocab_size"]
    n = count_parameters(m, vocab)
    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    dtype = torch.bfloat16 if rec["precision"] == "bf16" else torch.float32
    peak = measure_peak(dtype, device, size=4096 if device == "cuda" else 512, seconds=2.0 if device == "cuda" else 0.5)
    mfu = tps * flops_per_token(n, m["n_layers"], m["n_heads"], m["d_model"] // m["n_heads"], seq) / peak
    return {"part": "throughput", "params": n, "steps": steps, "tokens_per_s": round(tps, 1), "mfu": round(mfu, 4),
            "peak_flops": peak, "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "goal_mfu": 0.45, "meets_goal": mfu >= 0.45}


def _packed_and_padded(vocab: int, lengths: list[int], row: int, device):
    """Documents of ``lengths`` tokens, packed into rows of ``row`` tokens (position ids restart)
    and padded one per row; labels mask nothing but padding."""
    import torch

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    flat, pos = torch.cat(docs), torch.cat([torch.arange(n) for n in lengths])
    assert flat.numel() % row == 0, "lengths must fill whole rows"
    packed = (flat.view(-1, row).to(device), pos.view(-1, row).to(device))
    longest = max(lengths)
    ids = torch.zeros(len(docs), longest, dtype=torch.long)
    att = torch.zeros(len(docs), longest, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)], att[i, : len(d)] = d, 1
    return packed, (ids.to(device), att.to(device))


def _doc_loss_sum(logits, ids, keep):
    """Sum of next-token losses inside each document (``keep``: [B, T] bool, True where token t+1
    is in the same document as t) and their count."""
    import torch.nn.functional as F

    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    k = keep[:, :-1].reshape(-1)
    return float(nll[k].sum()), int(k.sum())


def part_packed(out: Path, dry: bool) -> dict:
    import torch

    import llmlab.models.modeling_llmlab as ml
    from llmlab.models.build import build_model

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    cfg = yaml.safe_load(GPU_RECIPE.read_text())["model"]
    if dry:
        cfg.update(TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=50304 if not dry else 512).to(device).eval()
    vocab = model.config.vocab_size
    row = 1024 if not dry else 64
    lengths = [row // 4, row // 2, row // 4, row // 8, 7 * row // 8]  # 2 rows
    (p_ids, p_pos), (d_ids, d_att) = _packed_and_padded(vocab, lengths, row, device)
    calls = {"varlen": 0}
    real = ml._flash_attn_varlen_func
    if real is not None:
        def counted(*a, **k):
            calls["varlen"] += 1
            return real(*a, **k)
        ml._flash_attn_varlen_func = counted
    res = {}
    try:
        with torch.no_grad():
            for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                model.to(dtype)
                packed = model(p_ids, position_ids=p_pos).logits
                keep = torch.ones_like(p_pos, dtype=torch.bool)
                keep[:, :-1] = p_pos[:, 1:] != 0
                s, n = _doc_loss_sum(packed, p_ids, keep)
                res[f"packed_loss_{name}"] = s / n
                padded = model(d_ids, attention_mask=d_att).logits
                keep = d_att.bool().clone()
                keep[:, :-1] &= d_att[:, 1:].bool()
                s2, n2 = _doc_loss_sum(padded, d_ids, keep)
                res[f"padded_loss_{name}"] = s2 / n2
                assert n == n2, (n, n2)
    finally:
        ml._flash_attn_varlen_func = real
    diff = abs(res["packed_loss_bf16"] - res["padded_loss_bf16"])
    return {"part": "packed", "device": device.type, "varlen_kernel_calls": calls["varlen"],
            "kernel": "flash_attn_varlen_func" if calls["varlen"] else "sdpa (per-document mask)",
            **{k: round(v, 5) for k, v in res.items()}, "packed_vs_padded_bf16": round(diff, 5),
            "ok": diff < 0.02 and abs(res["packed_loss_fp32"] - res["padded_loss_fp32"]) < 1e-3}


def part_qlora(out: Path, steps: int, dry: bool) -> dict:
    import torch

    rec = local_gpu_recipe(steps, dry=True)  # a small model: QLoRA checks the plumbing, not speed
    rec["datasets"]["chat"] = {"builtin": "chatterbot", "format": "messages", "eval_split": 0.1, "max_samples": 400}
    rec["tokenizer"]["chat_template"] = "chatml"
    rec["stages"]["sft"] = {"type": "sft", "datasets": {"chat": 1.0}, "seq_len": 64, "batch_size": 8,
                            "max_steps": steps, "max_dropped_fraction": 0.9, "eval_every": steps, "eval_steps": 2,
                            "save_every": steps, "log_every": 1, "optimizer": {"name": "adamw", "lr": 5e-3},
                            "lora": {"r": 8, "alpha": 16, "quantize": None if dry else "4bit"}}
    if torch.cuda.is_available() and not dry:
        rec.update(device="cuda", precision="bf16")
    records = [r for r in _run_recipe(rec, out / "qlora") if "loss" in r]
    final = out / "qlora" / "run" / "sft" / "final"
    return {"part": "qlora", "quantize": rec["stages"]["sft"]["lora"]["quantize"], "first_loss": records[0]["loss"],
            "last_loss": records[-1]["loss"], "final_is_merged": (final / "config.json").is_file()
            and not (out / "qlora" / "run" / "sft" / "adapter").exists(), "steps": steps,
            # a few steps of a tiny model prove the plumbing; 20 steps on the GPU must also learn
            "ok": all(r["loss"] == r["loss"] for r in records) and (steps < 10 or records[-1]["loss"] < records[0]["loss"])}


def part_mamba2(out: Path, steps: int, dry: bool) -> dict:
    import torch
    import transformers.models.mamba2.modeling_mamba2 as mm

    from llmlab.models.build import build_model

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    dims = {"d_model": 768, "n_layers": 12, "state_size": 128, "head_dim": 64, "chunk_size": 256} if cuda else \
        {"d_model": 64, "n_layers": 2, "state_size": 16, "head_dim": 16, "chunk_size": 16}
    torch.manual_seed(0)
    model = build_model({"arch": "mamba2", **dims}, vocab_size=50304 if cuda else 512).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b, t = (8, 1024) if cuda else (2, 64)
    x = torch.randint(0, model.config.vocab_size, (b, t), device=device)
    losses, t0 = [], None
    for i in range(steps):
        if i == 1:  # the first step (kernel compilation / autotuning) is not timed
            torch.cuda.synchronize() if cuda else None
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    torch.cuda.synchronize() if cuda else None
    tps = b * t * (steps - 1) / (time.perf_counter() - t0) if steps > 1 else None
    fast = bool(getattr(mm, "is_fast_path_available", False))
    return {"part": "mamba2", "device": device.type, "fast_path_kernels": fast, "tokens_per_s": tps and round(tps, 1),
            "first_loss": losses[0], "last_loss": losses[-1], "ok": all(map(lambda v: v == v, losses))}


def part_fsdp1(out: Path, dry: bool) -> dict:
    import torch
    import torch.distributed as dist

    from llmlab.config import DistributedConfig
    from llmlab.models.build import build_model
    from llmlab.train.fsdp import ShardedStateIO, shard_model

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    try:
        cfg = yaml.safe_load(GPU_RECIPE.read_text())["model"]
        if dry:
            cfg.update(TINY_MODEL)
        torch.manual_seed(0)
        model = build_model(cfg, vocab_size=512 if dry else 50304).to(device).train()
        shard_model(model, DistributedConfig.from_dict({"strategy": "fsdp"}), device, "bf16" if cuda else "no")
        sharded = type(model).__name__
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 512, (2, 64), device=device)
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        state = ShardedStateIO().model_state(model)
        return {"part": "fsdp1", "device": device.type, "module": sharded, "loss": float(loss),
                "gathered_tensors": len(state), "ok": bool(torch.isfinite(loss)) and len(state) > 0}
    finally:
        dist.destroy_process_group()


PARTS = ("throughput", "packed", "qlora", "mamba2", "fsdp1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=PARTS)
    ap.add_argument("--cpu-dry-run", action="store_true", help="every part on the CPU at tiny sizes")
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="work and result folder")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 200 on a GPU, 3 dry)")
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    steps = args.steps or (3 if dry else 200)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fn = {"throughput": lambda: part_throughput(args.out, steps, dry), "packed": lambda: part_packed(args.out, dry),
          "qlora": lambda: part_qlora(args.out, min(steps, 20) if not dry else steps, dry),
          "mamba2": lambda: part_mamba2(args.out, min(steps, 20) if not dry else steps, dry),
          "fsdp1": lambda: part_fsdp1(args.out, dry)}[args.part]
    result = {**fn(), "wall_s": round(time.perf_counter() - t0, 1), "dry_run": dry}
    (args.out / f"{args.part}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
