"""DPO (and SFT) steps/s of llmlab's loop against TRL's DPOTrainer (SFTTrainer), side by side in one run.

    python benchmarks/dpo_throughput.py                  # dpo and sft, 5m model, ~3-4 min on 2 cores
    python benchmarks/dpo_throughput.py --quick          # dpo only, 1 repetition, ~1 min
    python benchmarks/dpo_throughput.py --stages dpo --size 25m --batch-size 8 --reps 3

Both sides train the same freshly initialised ``LlmlabForCausalLM`` (same seed; TRL gets the model
object itself, and for DPO a frozen copy of it as ``ref_model``) on the same micro-batches: the
batches llmlab's StageData gives for the chatterbot preference pairs (``chatterbot_pairs``) or
conversations (``chatterbot``), in the same order. TRL's own data collation is replaced by those
batches, converted to the keys TRL's collators produce (DPO: ``input_ids``/``attention_mask``
[2B, T] chosen over rejected + ``completion_mask`` = llmlab's completion labels; SFT:
``input_ids``/``attention_mask``/``labels``), so sequences, padding and the tokens that carry
loss are identical and what is compared is the training step itself. Same AdamW (β 0.9/0.95,
eps 1e-8, weight decay 0.1), cosine schedule, grad-clip 1.0, batch size, ``beta`` 0.1, sigmoid
loss, ``precompute_ref_log_probs=False``, no eval/save/logging inside the timed window; fp32 and no
activation checkpointing on both sides (TRL's configs default to ``bf16=True`` and
``gradient_checkpointing=True``; both are switched off). llmlab trains these batches padding-free
(its default for its own Transformer: the real tokens end to end, position ids restarting per
sequence; same loss); ``llmlab_padded`` is llmlab with that switched off, to show what it buys.

Timing: ``--warmup-steps`` untimed steps, then ``--timed-steps`` timed ones (end of last warm-up
step → end of last step); repetitions interleaved (order rotates); the best (least disturbed) and
the median steps/s per contender are reported, with ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402


class Setup:
    def __init__(self, args, stage: str):
        self.stage = stage
        self.warm, self.timed = args.warmup_steps, args.timed_steps
        self.steps = self.warm + self.timed
        self.workdir = C.make_workdir(f"{stage}-{args.size}")
        rec = C.base_recipe(args.size, seq_len=args.seq_len, batch_size=args.batch_size, max_steps=self.steps)
        rec["stages"][stage]["log_every"] = self.warm
        self.resolved = C.resolve(rec, self.workdir)
        self.cfg = self.resolved["stages"][stage]
        self.tok = C.tokenizer_for(self.resolved)
        self.data = C.stage_data(self.resolved, stage, self.tok)
        self.batches = [self.data.train_batch(i) for i in range(self.steps)]

    def model(self):
        from llmlab.models.build import build_model

        torch.manual_seed(self.resolved["seed"])
        return build_model(self.resolved["model"], tokenizer=self.tok)

    def tokens(self) -> float:
        """Mean real (attention_mask == 1) tokens per timed step."""
        key = "chosen_attention_mask" if self.stage == "dpo" else "attention_mask"
        n = sum(int(b[key].sum()) + (int(b["rejected_attention_mask"].sum()) if self.stage == "dpo" else 0)
                for b in self.batches[self.warm:])
        return n / self.timed


def run_llmlab_padded(s: Setup, rep: int) -> float:
    return run_llmlab(s, rep, padded=True)


def run_llmlab(s: Setup, rep: int, padded: bool = False) -> float:
    """Seconds of the timed window of ``llmlab.train.loop.train`` on the stage (``padded``: with
    padding-free batching switched off, to show what it buys)."""
    from llmlab.session import resolve_precision, setup_accelerator
    from llmlab.stages import stage_class
    from llmlab.runplan import build_run_plan
    from llmlab.stages.base import StageContext
    from llmlab.train.loop import train

    base = stage_class(s.stage)
    data = s.data

    class Bench(base):
        def setup(self, model):
            if s.stage == "dpo":
                super().setup(model)  # the frozen reference copy
                self._data = data
            else:
                self._data = data

        def compute_loss(self, model, batch):
            import llmlab.stages.dpo as dpo_mod
            import llmlab.stages.lm as lm_mod

            if not padded:
                return super().compute_loss(model, batch)
            saved = dpo_mod.packs_documents, lm_mod.packs_documents
            dpo_mod.packs_documents = lm_mod.packs_documents = lambda m: False
            try:
                return super().compute_loss(model, batch)
            finally:
                dpo_mod.packs_documents, lm_mod.packs_documents = saved

    stage_dir = s.workdir / "run" / f"{s.stage}-rep{rep}"
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True)
    device = torch.device("cpu")
    C.reset_accelerate()  # a Trainer run before this one in the process set its own state
    acc = setup_accelerator(device, resolve_precision(s.resolved["precision"], device))
    ctx = StageContext.for_stage(build_run_plan(s.resolved), s.stage, s.tok, stage_dir=stage_dir, device=device)
    train(Bench(ctx), fingerprint="bench", accelerator=acc)
    recs = {r["step"]: r for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    shutil.rmtree(stage_dir, ignore_errors=True)
    return recs[s.steps]["elapsed_s"] - recs[s.warm]["elapsed_s"]


def _trl_batch_dpo(b: dict, pad: int) -> dict:
    from llmlab.stages.dpo import concat_pairs

    ids, att, lab = concat_pairs(b, pad)
    return {"input_ids": ids, "attention_mask": att, "completion_mask": (lab != -100).long()}


def _trl_batch_sft(b: dict, pad: int) -> dict:
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}


def run_trl(s: Setup, rep: int) -> float:
    """Seconds of the timed window of TRL's DPOTrainer / SFTTrainer on the same batches."""
    from torch.utils.data import DataLoader

    from llmlab.data.sources import load_named_dataset

    pad = s.tok.pad_token_id
    conv = _trl_batch_dpo if s.stage == "dpo" else _trl_batch_sft
    mine = [conv(b, pad) for b in s.batches]
    marks = {}

    clock = C.step_clock(marks, (s.warm, s.steps))
    common = {**C.hf_trainer_kwargs({**s.cfg, "max_steps": s.steps}, s.workdir / f"trl-rep{rep}", s.resolved["seed"]),
              "max_length": s.cfg["seq_len"] * 2}
    ds_name = "chat_pairs" if s.stage == "dpo" else "chat"
    raw = load_named_dataset(s.resolved, ds_name).train.select(range(16))  # only for TRL's init
    model = s.model()

    def loader(self):
        return DataLoader(mine, batch_size=None, shuffle=False)

    if s.stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        cfg = DPOConfig(beta=float(s.cfg["beta"]), loss_type=["sigmoid"], precompute_ref_log_probs=False, **common)
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        cls = type("BenchDPO", (DPOTrainer,), {"get_train_dataloader": loader})
        trainer = cls(model=model, ref_model=ref, args=cfg, train_dataset=raw, processing_class=s.tok,
                      callbacks=[clock])
    else:
        from trl import SFTConfig, SFTTrainer

        cfg = SFTConfig(assistant_only_loss=False, **common)
        cls = type("BenchSFT", (SFTTrainer,), {"get_train_dataloader": loader})
        trainer = cls(model=model, args=cfg, train_dataset=raw, processing_class=s.tok, callbacks=[clock])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    shutil.rmtree(s.workdir / f"trl-rep{rep}", ignore_errors=True)
    return marks[s.steps] - marks[s.warm]


CONTENDERS = {"llmlab": run_llmlab, "trl": run_trl, "llmlab_padded": run_llmlab_padded}


TARGET = {"dpo": 1.2, "sft": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", choices=["dpo", "sft"], default=None, help="default: dpo sft (--quick: dpo)")
    ap.add_argument("--size", choices=list(C.SIZES), default="5m")
    ap.add_argument("--seq-len", type=int, default=128, help="longest pair/conversation kept")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup-steps", type=int, default=None, help="default 3 (--quick 2)")
    ap.add_argument("--timed-steps", type=int, default=None, help="default 8 (--quick 6)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--padded", action=argparse.BooleanOptionalAction, default=True,
                    help="also time llmlab with padding-free batching switched off (what it buys)")
    ap.add_argument("--json", type=Path)
    C.add_threads_arg(ap)
    args = ap.parse_args()
    C.apply_threads(args.threads)
    args.stages = args.stages or (["dpo"] if args.quick else ["dpo", "sft"])
    args.warmup_steps = args.warmup_steps or (2 if args.quick else 3)
    args.timed_steps = args.timed_steps or (6 if args.quick else 8)
    args.reps = args.reps or (1 if args.quick else 3)
    C.quiet()
    import trl

    print(C.machine_note() + f" | trl {trl.__version__}")
    results = {"machine": C.machine_note(), "stages": {}}
    for stage in args.stages:
        s = Setup(args, stage)
        n = C.n_params(s.model())
        print(f"\n== {stage}: {args.size} ({n / 1e6:.2f} M parameters), batch {args.batch_size}, "
              f"{s.tokens():.0f} real tokens/step, {args.warmup_steps} warm-up + {args.timed_steps} timed steps, "
              f"{args.reps} interleaved repetitions ==")
        names = ["llmlab", "trl"] + (["llmlab_padded"] if args.padded else [])
        slots = sum(b["chosen_input_ids"].numel() * 2 if stage == "dpo" else b["input_ids"].numel()
                    for b in s.batches[s.warm:]) / s.timed
        print(f"  token slots per step: {s.tokens():.0f} padding-free (llmlab), {slots:.0f} padded (TRL, llmlab_padded)")
        secs = {k: [] for k in names}
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                gc.collect()
                t = CONTENDERS[name](s, rep)
                secs[name].append(t)
                print(f"  rep {rep} {name:<7} {s.timed / t:7.2f} steps/s  (load {os.getloadavg()[0]:.2f})", flush=True)
        sps = {k: s.timed / min(v) for k, v in secs.items()}       # best: interference only adds time
        smed = {k: s.timed / C.median(v) for k, v in secs.items()}
        rows = [[k, f"{v:.2f}", f"{smed[k]:.2f}", f"{v * s.tokens():,.0f}", f"{v / sps['trl']:.2f}x",
                 f"{smed[k] / smed['trl']:.2f}x"] for k, v in sps.items()]
        print(C.table(rows, ["contender", "steps/s best", "steps/s median", "real tok/s (best)", "vs trl (best)",
                             "vs trl (median)"]))
        ratio = sps["llmlab"] / sps["trl"]
        if TARGET[stage]:
            print(f"target llmlab >= {TARGET[stage]}x TRL {stage}: {ratio:.2f}x (best) -> "
                  f"{'MET' if ratio >= TARGET[stage] else 'NOT MET'}")
        if "llmlab_padded" in sps:
            print(f"padding-free batching buys llmlab {sps['llmlab'] / sps['llmlab_padded']:.2f}x (best), "
                  f"{smed['llmlab'] / smed['llmlab_padded']:.2f}x (median)")
        results["stages"][stage] = {"steps_per_s": sps, "runs_s": secs, "ratio": ratio, "tokens_per_step": s.tokens()}
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
