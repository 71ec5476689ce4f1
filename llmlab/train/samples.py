"""Sample replies during training (``sample_prompts`` / ``sample_every``): what the model says to a
few fixed prompts as it trains, as Axolotl's and TRL's generation callbacks show.

At step 0 (a fresh start), every ``sample_every`` steps (default ``eval_every``) and at the last
step (``max_steps``, or where early stopping ends the stage), the main process replies to each
prompt twice: greedily, and sampled (temperature 0.8, top-k 50, top-p 0.95 —
:class:`~llmlab.inference.generation.GenerationSettings`' defaults, those of ``llmlab generate``)
with seed ``recipe seed + prompt index``, under a forked RNG, so the training's random streams are
not touched and a run with samples trains bitwise the weights of one without. Prompt ``i``'s
sampled reply is what ``llmlab generate --seed <seed> --prompts FILE`` gives for the same weights.
The record goes to metrics.jsonl (``{"step", "samples": [{"prompt", "greedy", "sampled",
"seed"}]}``) and, as text, to the ``report_to`` trackers; ``llmlab report`` shows the first and the
last.
"""

from __future__ import annotations

import logging

import torch

from llmlab.config import TrainingConfig
from llmlab.models.wrappers import unwrap, without_mixed_precision
from llmlab.stage_specs import stage_spec
from llmlab.stages.base import Stage

log = logging.getLogger(__name__)


class Sampler:
    """Replies to the stage's ``sample_prompts`` on the main process (see the module docstring).

    Keys read: ``sample_prompts``, ``sample_every`` (None: ``eval_every``), ``seed``; a stage whose
    rows are plain text (pretrain) continues each prompt as text, any other renders it as a user
    turn in the chat template.
    """

    def __init__(self, stage: Stage, tc: TrainingConfig, accelerator):
        self.stage, self.accelerator = stage, accelerator
        self.prompts = list(tc.sample_prompts or ())
        self.every = int(tc.sample_every if tc.sample_every is not None else tc.eval_every)
        self.max_steps = tc.max_steps
        self.seed = int(stage.ctx.seed)

    def due(self, step: int, last: bool = False) -> bool:
        """Whether ``step`` (just finished; 0: before the first) is a sampling step; ``last``: the
        stage ends there (early stopping), which samples too."""
        return bool(self.prompts) and (step % self.every == 0 or step == self.max_steps or last)

    def replies(self, model: torch.nn.Module) -> list[dict]:
        """``[{"prompt", "greedy", "sampled", "seed"}]`` of ``model`` (left in train mode).

        Raises:
            PromptTooLongError: a prompt fills the model's context.
        """
        from llmlab.inference.generation import GenerationSettings, generate_text

        bare = unwrap(model)
        tok = self.stage.ctx.tokenizer
        is_chat = stage_spec(self.stage.type).kind != "text"
        sampled = GenerationSettings()
        out = []
        bare.eval()
        try:
            with without_mixed_precision(bare), torch.no_grad():
                for i, prompt in enumerate(self.prompts):
                    g = generate_text(bare, tok, prompt, sampled.replace(temperature=0.0, seed=self.seed + i),
                                      is_chat)
                    s = generate_text(bare, tok, prompt, sampled.replace(seed=self.seed + i), is_chat)
                    out.append({"prompt": prompt, "greedy": g.text, "sampled": s.text, "seed": self.seed + i})
        finally:
            bare.train()
        return out

    def log(self, model: torch.nn.Module, step: int, metrics) -> None:
        """Reply on the main process and write the record to ``metrics`` (the loop's
        :class:`~llmlab.train.metrics.MetricsLogger`: its metrics.jsonl writer and trackers)."""
        if not self.accelerator.is_main_process:
            return
        samples = self.replies(model)
        metrics.writer.write({"step": step, "samples": samples})
        texts = {f"samples/{i}/{kind}": f"{r['prompt']}\n→ {r[kind]}"
                 for i, r in enumerate(samples) for kind in ("greedy", "sampled")}
        for t in metrics.trackers:
            t.log(texts, step=step)
        for r in samples:
            log.info("stage %s step %d: %r → greedy %r, sampled %r", self.stage.ctx.name, step, r["prompt"],
                     r["greedy"], r["sampled"])
