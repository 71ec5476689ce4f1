"""The Mamba2 example's SFT and DPO batches packed (padding-free) vs padded: padding share, CPU time
and peak RSS of a training step.

    python benchmarks/mamba2_padding.py                         # sft and dpo, bf16 autocast, ~6 min
    python benchmarks/mamba2_padding.py --precision fp32 --steps 3
    python benchmarks/mamba2_padding.py --stages dpo --group-by-length off   # dpo without grouping
    python benchmarks/mamba2_padding.py --stages pretrain                   # time and RSS only

Data: the batches ``recipes/mamba2_sft_dpo.yaml``'s sft and dpo stages train on (its tokenizer,
trained as ``llmlab run`` does; StageData's micro-batches in order: sft 8 conversations, dpo 4 pairs
= 8 rows, with the recipe's gradient accumulation 2 / 4 and ``group_by_length`` where it sets it).

Padding share = padding positions / all positions fed to the model, over all of a stage's
micro-batches (``max_steps`` x accumulation): padded batches are ``rows x width`` (the pipeline's
bucketed width; dpo: chosen and rejected to one width, as ``concat_pairs``), packed rows are the
real tokens laid end to end, rounded up to :func:`llmlab.models.padfree.bucket_width`.

pretrain (packed documents, position ids restarting at each): "padded" carries the SSM state across
document boundaries (transformers), "packed" resets it (llmlab); no padding either way.

Step: the stage's micro-batches of one optimizer step, forward + backward + AdamW step, under the
given precision, one thread. sft: ``SFTStage.compute_loss`` (packed through padfree.py when the
model packs); dpo: LoRA (the recipe's preset, r, alpha) on the policy, the reference = the adapter
disabled, sigmoid DPO loss + ``rpo_alpha`` x chosen NLL, log-probs through
``pair_sequence_logps``. "padded" is transformers' plain ``Mamba2ForCausalLM`` (refused by
``packs_documents``, so padded batches); "packed" the Mamba2 llmlab builds
(:mod:`llmlab.models.mamba2_packed`). Each (stage, mode) runs in a fresh process: CPU seconds per
step (``time.process_time``, after one untimed step) and the process's peak RSS (``ru_maxrss``:
interpreter, data and model included). Weights are freshly initialised: time and memory do not
depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "mamba2_sft_dpo.yaml"


def setup(workdir: Path, group_by_length: str = "recipe"):
    """(resolved recipe with output_dir in workdir, tokenizer); ``group_by_length`` ``on``/``off``
    overrides the key on the sft and dpo stages."""
    import yaml

    rec = yaml.safe_load(RECIPE.read_text())
    if group_by_length != "recipe":
        for stage in ("sft", "dpo"):
            rec["stages"][stage]["group_by_length"] = group_by_length == "on"
    resolved = C.resolve(rec, workdir)
    return resolved, C.tokenizer_for(resolved)


def padding_shares(data, stage: str, n_micro: int, pad_id: int) -> tuple[float, float, int]:
    """(padded share, packed share, real tokens) over the first ``n_micro`` micro-batches."""
    from llmlab.models.padfree import bucket_width, concat_pairs

    padded = packed = real = 0
    for i in range(n_micro):
        b = data.train_batch(i)
        att = concat_pairs(b, pad_id)[1] if stage == "dpo" else b["attention_mask"]
        n = int(att.sum())
        real += n
        padded += att.numel()
        packed += bucket_width(n)
    return 1 - real / padded, 1 - real / packed, real


def dpo_loss(policy, batch: dict, pad_id: int, beta: float, rpo_alpha: float) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023) against the adapter-disabled policy, + rpo_alpha x chosen NLL."""
    from llmlab.models.padfree import concat_pairs
    from llmlab.stages.dpo import pair_sequence_logps

    ids, att, labels = concat_pairs(batch, pad_id)
    with torch.no_grad(), policy.disable_adapter():
        ref, _ = pair_sequence_logps(policy, ids, att, labels)
    logps, n = pair_sequence_logps(policy, ids, att, labels)
    half = len(ids) // 2
    margin = (logps[:half] - ref[:half]) - (logps[half:] - ref[half:])
    nll = -logps[:half].sum() / n[:half].sum().clamp(min=1)
    return -torch.nn.functional.logsigmoid(beta * margin).mean() + rpo_alpha * nll


def child(args) -> dict:
    """One (stage, mode) in this process: CPU s/step and peak RSS."""
    from transformers import Mamba2ForCausalLM

    from llmlab.data.pipeline import build_stage_data
    from llmlab.models.build import apply_lora, build_model
    from llmlab.stages.lm import SFTStage

    torch.set_num_threads(1)
    C.quiet()
    resolved, tok = setup(Path(args.workdir), args.group_by_length)
    cfg = resolved["stages"][args.stage]
    data = build_stage_data(resolved, args.stage, tok)
    torch.manual_seed(0)
    model = build_model(resolved["model"], tokenizer=tok)
    if args.mode == "padded":
        model = Mamba2ForCausalLM(model.config)
    if args.stage == "dpo":
        model = apply_lora(model, cfg["lora"])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gas = int(cfg["gradient_accumulation_steps"])
    pad_id = data.pad_token_id
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    times = []
    for step in range(args.steps + 1):
        t0 = time.process_time()
        for micro in range(gas):
            batch = data.train_batch(step * gas + micro)
            with autocast:
                if args.stage != "dpo":
                    loss, _ = object.__new__(SFTStage).compute_loss(model, batch)
                else:
                    loss = dpo_loss(model, batch, pad_id, float(cfg["beta"]), float(cfg["rpo_alpha"] or 0.0))
            (loss / gas).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - t0)
    return {"stage": args.stage, "mode": args.mode, "precision": args.precision,
            "cpu_s_per_step": sum(times[1:]) / args.steps, "first_step_cpu_s": times[0],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", default=["sft", "dpo"], choices=["pretrain", "sft", "dpo"])
    ap.add_argument("--group-by-length", default="recipe", choices=["recipe", "on", "off"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after one untimed)")
    ap.add_argument("--workdir", default=None, help="reuse a folder (its trained tokenizer)")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.stage, args.mode = args.child
        print(json.dumps(child(args)))
        return
    from llmlab.data.pipeline import build_stage_data

    C.quiet()
    workdir = Path(args.workdir) if args.workdir else C.make_workdir("mamba2-padding")
    workdir.mkdir(parents=True, exist_ok=True)
    resolved, tok = setup(workdir, args.group_by_length)
    print(f"# {RECIPE.name}; {C.machine_note()}; precision {args.precision}, 1 thread, {args.steps} steps, "
          f"group_by_length {args.group_by_length}")
    rows = []
    for stage in args.stages:
        cfg = resolved["stages"][stage]
        data = build_stage_data(resolved, stage, tok)
        n_micro = int(cfg["max_steps"]) * int(cfg["gradient_accumulation_steps"])
        pad, pack, real = padding_shares(data, stage, n_micro, data.pad_token_id) if stage != "pretrain" else (0, 0, 0)
        res = {}
        for mode in ("padded", "packed"):
            cmd = [sys.executable, __file__, "--child", stage, mode, "--workdir", str(workdir), "--precision",
                   args.precision, "--steps", str(args.steps), "--group-by-length", args.group_by_length]
            res[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows.append([stage, f"{n_micro} x {real / n_micro:.0f}", f"{pad:.1%}", f"{pack:.1%}",
                     f"{res['padded']['cpu_s_per_step']:.2f}", f"{res['packed']['cpu_s_per_step']:.2f}",
                     f"{res['padded']['cpu_s_per_step'] / res['packed']['cpu_s_per_step']:.2f}x",
                     f"{res['padded']['peak_rss_mb']:.0f}", f"{res['packed']['peak_rss_mb']:.0f}"])
    print(C.table(rows, ["stage", "micro-batches x real tokens", "padding, padded", "padding, packed",
                         "CPU s/step padded", "packed", "speed-up", "peak RSS MB padded", "packed"]))


if __name__ == "__main__":
    main()
