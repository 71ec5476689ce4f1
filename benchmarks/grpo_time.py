"""GRPO rollout + update time per prompt of llmlab's grpo stage against TRL's GRPOTrainer, side by side in one run.

    python benchmarks/grpo_time.py --threads 1            # 5m model, 4 x 8 completions of 64 tokens, ~3-5 min on 2 cores
    python benchmarks/grpo_time.py --threads 1 --quick    # 1 repetition instead of 3, ~1-2 min
    python benchmarks/grpo_time.py --ppo-epochs 1 --mini-batch-size 4   # one update per rollout
    python benchmarks/grpo_time.py --eos stop             # let completions end at EOS (lengths differ)

How the contenders are made equal. Both train the same freshly initialised ``LlmlabForCausalLM``
(built once with the recipe seed, saved, and loaded from that directory for every run; TRL gets the
model object, and with ``--kl-beta`` > 0 both keep a frozen reference copy: llmlab a deep copy, TRL
one loaded from the same directory) with the run's tokenizer (trained on the fly as in the other
benchmarks). Prompts: llmlab's ``chatterbot_prompts`` in the order llmlab's StageData serves them;
TRL gets them as conversational rows in exactly that order (``shuffle_dataset=False``), so rollout r
of both sides samples for the same prompts, and the script checks that TRL's chat-template
tokenisation gives the same prompt ids. Generation: ``group_size`` = ``num_generations`` completions
per prompt, ``max_new_tokens`` = ``max_completion_length``, temperature 1.0, top_k 0, top_p 1.0.
Schedule: ``batch_size`` prompts per rollout = ``generation_batch_size / num_generations``;
``mini_batch_size`` prompts per update = ``per_device_train_batch_size / num_generations``;
``ppo_epochs`` = ``num_iterations``; no gradient accumulation; so each side makes
``ppo_epochs * batch_size / mini_batch_size`` optimizer steps per rollout. Loss: clipped surrogate
(eps 0.2) + ``kl_beta`` x k3 KL, averaged over the mini-batch's completion tokens (TRL
``loss_type="bnpo"``), group-normalised advantages. Reward: the same plain Python function on both
sides (fraction of vowels in the decoded completion; llmlab calls it as a ``{function: ...}`` reward,
in process with allow_code). Optimizer: AdamW (beta 0.9/0.95, eps 1e-8, weight decay 0.1, lr 1e-3),
cosine schedule, grad-clip 1.0, fp32, no gradient checkpointing (TRL's defaults of bf16 and gradient
checkpointing are switched off), no eval, save or logging inside the timed window. Completion
length: with ``--eos suppress`` (default) every completion runs to ``max_new_tokens`` on both sides:
llmlab's stage gets no stop tokens (an EOS may be sampled but does not stop the row; llmlab has no
option to forbid it), TRL gets ``min_new_tokens = max_completion_length`` (HF's processor masks EOS
until then). The completion tokens actually generated are counted on both sides and reported.

What is NOT equal. The sampled completions (each side draws from its own RNG: llmlab a per-rollout
seeded generator, TRL the global one), hence rewards and advantages. Generation: llmlab's own
KV-cache sampling loop vs transformers' ``generate`` (DynamicCache, logits processors). TRL computes
log-probs through its fused, tiled LM head on completion positions only, computes per-token entropy
in every loss forward, tokenises the prompts at every rollout, and logs many more metrics; llmlab
computes full-vocabulary logits over prompt + completion. TRL skips the "old" log-prob forward when
a rollout feeds exactly one update (``ppo_epochs`` 1 and ``mini_batch_size`` = ``batch_size``) and
uses the detached current log-probs instead; llmlab always runs it. These are the implementations'
own choices, so they are part of what is timed.

Timing: ``--warmup-rollouts`` untimed rollouts (with their updates), then ``--timed-rollouts`` timed
ones (end of the last warm-up update -> end of the last update; each rollout = sampling, scoring, old
and reference log-probs, reward, and all its updates). Reported per prompt: seconds (best and median
over ``--reps`` interleaved repetitions, order rotating), the part spent sampling (median; llmlab:
``GRPOStage.generate``, TRL: ``_generate_single_turn``, i.e. ``generate`` plus its EOS masking),
completion tokens generated per prompt, and ms per completion token (best), with ratios llmlab / TRL
in time (< 1: llmlab is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import torch

VOWELS = frozenset("aeiouAEIOU")


def vowel_fraction(prompts, completions, **kw) -> list[float]:
    """The rule reward of both sides: the fraction of a completion's characters that are vowels.
    ``completions``: strings (llmlab) or one-message lists (TRL with conversational prompts)."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(sum(ch in VOWELS for ch in text) / max(len(text), 1))
    return out


class Setup:
    def __init__(self, args):
        self.args = args
        self.G, self.B, self.M, self.E = args.group_size, args.prompts, args.mini_batch_size, args.ppo_epochs
        if self.B % self.M:
            raise SystemExit(f"--mini-batch-size {self.M} must divide --prompts {self.B}")
        self.U = self.E * self.B // self.M  # optimizer steps per rollout
        self.warm, self.timed = args.warmup_rollouts, args.timed_rollouts
        self.rollouts = self.warm + self.timed
        self.steps = self.rollouts * self.U
        self.workdir = C.make_workdir(f"grpo-{args.size}")
        rec = C.base_recipe(args.size, seq_len=args.seq_len, batch_size=self.B, max_steps=self.steps)
        rec["datasets"] = {"bible": rec["datasets"]["bible"],
                           "chat_prompts": {"builtin": "chatterbot_prompts", "format": "prompt", "eval_split": 0.05,
                                            "max_samples": 600}}
        grpo = {**rec["stages"]["sft"], "type": "grpo", "datasets": {"chat_prompts": 1.0}, "log_every": self.U,
                "group_size": self.G, "mini_batch_size": self.M, "ppo_epochs": self.E,
                "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                "kl_beta": args.kl_beta, "clip_range": 0.2,
                "reward": [{"function": f"{vowel_fraction.__module__}:vowel_fraction"}]}
        rec["stages"] = {"grpo": grpo}
        self.resolved = C.resolve(rec, self.workdir)
        self.cfg = self.resolved["stages"]["grpo"]
        self.tok = C.tokenizer_for(self.resolved)
        self.data = C.stage_data(self.resolved, "grpo", self.tok)
        self.batches = [self.data.train_batch(r) for r in range(self.rollouts)]
        self.prompt_rows = [p for b in self.batches for p in b["prompts"]]
        self.check_prompt_ids()
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        from llmlab.models.build import build_model

        torch.manual_seed(self.resolved["seed"])
        self.init_dir = self.workdir / "init"
        build_model(self.resolved["model"], tokenizer=self.tok).save_pretrained(self.init_dir)

    def check_prompt_ids(self) -> None:
        """TRL renders the prompts itself (chat template, generation prompt); make sure that gives llmlab's ids."""
        for b in self.batches:
            enc = self.tok.apply_chat_template(b["prompts"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
            for i, ids in enumerate(enc):
                if b["prompt_input_ids"][i][b["prompt_attention_mask"][i].bool()].tolist() != list(ids):
                    raise SystemExit("TRL and llmlab tokenise the prompts differently; the comparison would be unfair")

    def model(self):
        from transformers import AutoModelForCausalLM

        import llmlab.models

        llmlab.models.register()
        m = AutoModelForCausalLM.from_pretrained(self.init_dir)
        if self.args.eos == "stop":  # both sides stop at the tokenizer's EOS and at <|im_end|>
            m.generation_config.eos_token_id = [self.tok.eos_token_id, self.im_end]
        return m

    def window(self, seq: list[float]) -> float:
        return sum(seq[self.warm:self.rollouts])


def run_llmlab(s: Setup, rep: int) -> dict:
    """The grpo stage through ``llmlab.train.loop.train``; timed window from its metrics.jsonl."""
    from llmlab.session import resolve_precision, setup_accelerator
    from llmlab.runplan import build_run_plan
    from llmlab.stages.base import StageContext
    from llmlab.stages.grpo import GRPOStage
    from llmlab.train.loop import train

    gen_s, tokens = [], []

    class Bench(GRPOStage):
        def build_model(self):
            m = s.model()
            if self.needs_reference:
                self.reference.capture(m)
            return m

        def setup(self, model):
            super().setup(model)
            self._data = s.data

        def eval_batches(self):
            return []

        @property
        def eos_token_ids(self):
            return [] if s.args.eos == "suppress" else super().eos_token_ids

        def generate(self, *a, **k):
            t = time.perf_counter()
            out = super().generate(*a, **k)
            gen_s.append(time.perf_counter() - t)
            tokens.append(int(out[1].sum()))
            return out

    stage_dir = s.workdir / "run" / f"grpo-rep{rep}"
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True)
    device = torch.device("cpu")
    C.reset_accelerate()
    acc = setup_accelerator(device, resolve_precision(s.resolved["precision"], device))
    ctx = StageContext.for_stage(build_run_plan(s.resolved), "grpo", s.tok, stage_dir=stage_dir, device=device, allow_code=True)
    train(Bench(ctx), fingerprint="bench", accelerator=acc)
    recs = {r["step"]: r for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    shutil.rmtree(stage_dir, ignore_errors=True)
    return {"s": recs[s.steps]["elapsed_s"] - recs[s.warm * s.U]["elapsed_s"], "gen_s": s.window(gen_s),
            "tokens": s.window(tokens)}


def run_trl(s: Setup, rep: int) -> dict:
    """TRL's GRPOTrainer on the same prompts, model, schedule and reward; timed window from a step callback."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    gen_s, tokens, marks = [], [], {}

    class Bench(GRPOTrainer):
        def _generate_single_turn(self, *a, **k):
            t = time.perf_counter()
            out = super()._generate_single_turn(*a, **k)
            gen_s.append(time.perf_counter() - t)
            return out

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            tokens.append(int(out["completion_mask"].sum()))
            return out

    out_dir = s.workdir / f"trl-rep{rep}"
    kw = C.hf_trainer_kwargs({**s.cfg, "max_steps": s.steps}, out_dir, s.resolved["seed"])
    kw["per_device_train_batch_size"] = s.M * s.G
    gen_kwargs = {"min_new_tokens": s.args.max_new_tokens} if s.args.eos == "suppress" else None
    cfg = GRPOConfig(**kw, num_generations=s.G,
                     generation_batch_size=s.B * s.G, num_iterations=s.E, max_completion_length=s.args.max_new_tokens,
                     temperature=1.0, top_k=0, top_p=1.0, beta=s.args.kl_beta, epsilon=0.2, loss_type="bnpo",
                     scale_rewards="group", shuffle_dataset=False, use_vllm=False, generation_kwargs=gen_kwargs)
    C.reset_accelerate()
    trainer = Bench(model=s.model(), reward_funcs=[vowel_fraction], args=cfg,
                    train_dataset=Dataset.from_dict({"prompt": s.prompt_rows}), processing_class=s.tok,
                    callbacks=[C.step_clock(marks, (s.warm * s.U, s.steps))])
    assert trainer.args.steps_per_generation == s.B // s.M
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"s": marks[s.steps] - marks[s.warm * s.U], "gen_s": s.window(gen_s), "tokens": s.window(tokens)}


CONTENDERS = {"llmlab": run_llmlab, "trl": run_trl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(C.SIZES), default="5m")
    ap.add_argument("--seq-len", type=int, default=128, help="prompt + completion budget (longer prompts are dropped)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per rollout (llmlab batch_size)")
    ap.add_argument("--group-size", type=int, default=8, help="completions per prompt (num_generations)")
    ap.add_argument("--mini-batch-size", type=int, default=2, help="prompts per optimizer step")
    ap.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout (num_iterations)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--kl-beta", type=float, default=0.04, help="> 0: both sides keep a reference model")
    ap.add_argument("--eos", choices=["suppress", "stop"], default="suppress",
                    help="suppress: every completion runs to --max-new-tokens; stop: completions end at EOS")
    ap.add_argument("--warmup-rollouts", type=int, default=1)
    ap.add_argument("--timed-rollouts", type=int, default=5)
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    C.add_threads_arg(ap)
    args = ap.parse_args()
    C.apply_threads(args.threads)
    args.reps = args.reps or (1 if args.quick else 3)
    C.quiet()
    import trl

    print(C.machine_note() + f" | trl {trl.__version__}")
    s = Setup(args)
    n = C.n_params(s.model())
    print(f"\n== grpo: {args.size} ({n / 1e6:.2f} M parameters), {s.B} prompts x {s.G} completions per rollout, "
          f"{s.M} prompts per update x {s.E} epoch(s) = {s.U} optimizer steps per rollout, max_new_tokens "
          f"{args.max_new_tokens} (eos: {args.eos}), kl_beta {args.kl_beta}, {s.warm} warm-up + {s.timed} timed "
          f"rollouts, {args.reps} interleaved repetitions ==")
    names = list(CONTENDERS)
    runs = {k: [] for k in names}
    prompts = s.timed * s.B
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            gc.collect()
            r = CONTENDERS[name](s, rep)
            runs[name].append(r)
            print(f"  rep {rep} {name:<7} {r['s'] / prompts:6.3f} s/prompt (sampling {r['gen_s'] / prompts:6.3f}), "
                  f"{r['tokens'] / prompts:5.1f} completion tok/prompt  (load {os.getloadavg()[0]:.2f})", flush=True)
    best = {k: min(v, key=lambda r: r["s"]) for k, v in runs.items()}  # interference only adds time
    med = {k: C.median([r["s"] for r in v]) / prompts for k, v in runs.items()}
    gen = {k: C.median([r["gen_s"] for r in v]) / prompts for k, v in runs.items()}
    tok = {k: sum(r["tokens"] for r in v) / len(v) / prompts for k, v in runs.items()}
    spp = {k: b["s"] / prompts for k, b in best.items()}
    mspt = {k: 1000 * b["s"] / b["tokens"] for k, b in best.items()}
    rows = [[k, f"{spp[k]:.3f}", f"{med[k]:.3f}", f"{gen[k]:.3f}", f"{tok[k]:.1f}", f"{mspt[k]:.2f}",
             f"{spp[k] / spp['trl']:.2f}x", f"{med[k] / med['trl']:.2f}x", f"{mspt[k] / mspt['trl']:.2f}x"]
            for k in names]
    print(C.table(rows, ["contender", "s/prompt best", "s/prompt median", "sampling s/prompt (median)",
                         "completion tok/prompt", "ms/completion tok (best)", "time vs trl (best)",
                         "time vs trl (median)", "ms/tok vs trl (best)"]))
    print(f"llmlab takes {spp['llmlab'] / spp['trl']:.2f}x TRL's time per prompt (best; < 1 = faster), "
          f"{med['llmlab'] / med['trl']:.2f}x (median); per completion token {mspt['llmlab'] / mspt['trl']:.2f}x")
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps({"machine": C.machine_note(), "args": vars(args) | {"json": str(args.json)},
                                         "runs": runs, "s_per_prompt_best": spp, "s_per_prompt_median": med,
                                         "tokens_per_prompt": tok, "ms_per_token_best": mspt}, indent=2))
    shutil.rmtree(s.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
