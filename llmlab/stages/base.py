"""The interface every stage type implements.

A stage type supplies three things: how its examples become batches, its loss, and (for online RL)
how it produces rollouts. The training loop in :mod:`llmlab.train.loop` owns everything else:
optimizer steps, gradient accumulation and clipping, evaluation, logging, checkpoints and resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmlab.layout import StageLayout
from llmlab.runplan import LoraSpec, ModelSpec, RunPlan, RunSettings, StagePlan, bare_run_plan


@dataclass
class StageContext:
    """Everything a stage needs to build itself: its :class:`~llmlab.runplan.StagePlan` (typed
    ``training``, ``params``, ``lora``, ``init``, ``inputs``, ``layout``), the run's
    :class:`~llmlab.runplan.RunPlan` (typed ``settings``, ``model``, ``tokenizer``, ``datasets``)
    and what only the run knows (tokenizer, device, the paths its inputs resolved to).

    Build one with :meth:`for_stage` (a resolved run) or :meth:`bare` (a hand-made recipe in tests
    and benchmarks).

    Attributes:
        plan: this stage's node of the stage graph.
        run_plan: the run's plan (run-wide settings, the model section, every stage).
        tokenizer: the run's frozen tokenizer (a ``PreTrainedTokenizerFast``).
        init_path: the HF-format directory this stage starts from (the ``from`` stage's ``final/``),
            or ``None`` when the stage starts from the recipe's ``model:`` section.
        stage_paths: name → ``<output_dir>/<name>`` for every stage of the recipe (for
            ``reference_from`` and ``reward: {from: STAGE}``).
        device: the torch device the loop trains on.
        allow_code: the user passed ``--allow-code`` (Python reward functions, trust_remote_code).
        init_adapter: a PEFT adapter directory to keep training, when the ``from`` stage trained
            LoRA with ``merge: false`` and this stage has no ``lora`` of its own; ``init_path`` is
            then that adapter's base.
    """

    plan: StagePlan
    run_plan: RunPlan
    tokenizer: Any
    init_path: Path | None = None
    stage_paths: dict[str, Path] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    allow_code: bool = False
    init_adapter: Path | None = None

    @classmethod
    def for_stage(cls, run_plan: RunPlan, name: str, tokenizer: Any, stage_dir: Path | None = None,
                  **kw) -> StageContext:
        """The context of stage ``name`` of ``run_plan``; ``kw`` sets the other attributes
        (``stage_paths`` defaults to every stage's directory in the run's layout). ``stage_dir``
        moves the stage's own directory elsewhere (benchmarks training one stage several times).

        Raises:
            KeyError: no stage ``name``.
        """
        plan = run_plan.stage(name)
        if stage_dir is not None:
            plan = dataclasses.replace(plan, layout=StageLayout(Path(stage_dir)))
        kw.setdefault("stage_paths", {s.name: s.layout.dir for s in run_plan.stages} | {name: plan.layout.dir})
        return cls(plan=plan, run_plan=run_plan, tokenizer=tokenizer, **kw)

    @classmethod
    def bare(cls, recipe: dict, name: str, tokenizer: Any = None, **kw) -> StageContext:
        """:meth:`for_stage` of a hand-made recipe that was not resolved (tests, benchmarks):
        :func:`llmlab.runplan.bare_run_plan` fills it from the schema."""
        return cls.for_stage(bare_run_plan(recipe), name, tokenizer, **kw)

    @property
    def name(self) -> str:
        """This stage's name."""
        return self.plan.name

    @property
    def stage_dir(self) -> Path:
        """``<output_dir>/<name>``."""
        return self.plan.layout.dir

    @property
    def settings(self) -> RunSettings:
        """The run-wide settings (seed, precision, device, logging, ...)."""
        return self.run_plan.settings

    @property
    def seed(self) -> int:
        """The run's seed."""
        return int(self.run_plan.settings.seed)

    @property
    def model_spec(self) -> ModelSpec | None:
        """The typed ``model:`` section (None only in a bare recipe without one)."""
        return self.run_plan.model

    @property
    def own_lora(self) -> LoraSpec | None:
        """The LoRA this stage applies to its model itself: its own ``lora``, not the unmerged
        adapter it continues (which its starting model already carries)."""
        return self.plan.lora if self.plan.init.adapter_from is None else None


class Stage:
    """Base class of the stage types (one per entry of :data:`llmlab.stage_specs.STAGE_SPECS`).

    Training subclasses set ``type`` and implement :meth:`build_model`, :meth:`get_batch`,
    :meth:`compute_loss` and optionally :meth:`evaluate`, :meth:`state_dict`, :meth:`finalize`.
    A stage that trains nothing (evaluate) implements :meth:`run` instead.
    """

    type: str = ""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    @property
    def plan(self) -> StagePlan:
        """The stage's plan (``ctx.plan``)."""
        return self.ctx.plan

    # -- model -----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """Return the model this stage trains (before LoRA is applied by the loop).

        The default loads a causal LM from ``ctx.init_path`` or builds one from the recipe's
        ``model:`` section. Stages that need more (a reference model, a value head) set it up here.
        """
        from llmlab.models.build import build_model, load_causal_lm

        if self.ctx.init_adapter is not None:  # keep training the previous stage's unmerged adapter
            from peft import PeftModel

            base = load_causal_lm(self.ctx.init_path, allow_code=self.ctx.allow_code)
            return PeftModel.from_pretrained(base, str(self.ctx.init_adapter), is_trainable=True)
        if self.ctx.init_path is not None:
            lora = self.ctx.own_lora
            return load_causal_lm(self.ctx.init_path, allow_code=self.ctx.allow_code,
                                  quantize=lora.quantize if lora is not None else None)
        return build_model(self.ctx.model_spec, tokenizer=self.ctx.tokenizer, allow_code=self.ctx.allow_code)

    def setup(self, model: torch.nn.Module) -> None:
        """Called once after the model is built, LoRA applied and moved to the device."""

    # -- data ------------------------------------------------------------------------------
    @property
    def data(self):
        """The stage's :class:`llmlab.data.pipeline.StageData`, built on first use."""
        if getattr(self, "_data", None) is None:
            from llmlab.data.pipeline import build_stage_data

            self._data = build_stage_data(self.ctx.run_plan.recipe, self.ctx.name, self.ctx.tokenizer)
        return self._data

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id (0 when there is none)."""
        tok = self.ctx.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        return int(pad) if pad is not None else 0

    def get_batch(self, index: int, model: torch.nn.Module) -> dict:
        """The micro-batch with global index ``index`` (step × grad-accum + micro).

        Must be a pure function of (seed, stage, index) and of state saved by :meth:`state_dict`.
        The default is the stage data's :meth:`~llmlab.data.pipeline.StageData.train_batch`.
        """
        return self.data.train_batch(index)

    def batch_function(self):
        """``index -> batch`` when the training batches are a pure function of their index (the
        stage's ``StageData.train_batch``), so they can be built ahead in other processes
        (:class:`llmlab.data.prefetch.BatchPrefetcher`); None for a stage whose batches are sampled
        from the model being trained (its spec ``generates``: grpo, ppo) or has no spec."""
        from llmlab.stage_specs import STAGE_SPECS

        spec = STAGE_SPECS.get(self.type)
        return None if spec is None or spec.generates else self.data.train_batch

    def eval_batches(self) -> list[dict]:
        """Fixed held-out batches for :meth:`evaluate` (may be empty; by default the stage data's); not
        read when :meth:`heldout` gives a held-out set."""
        return list(self.data.eval_batches())

    def heldout(self):
        """The held-out examples :meth:`evaluate_heldout` scores (a
        :class:`llmlab.data.pipeline.HeldOut`), or None for a stage evaluated on :meth:`eval_batches`
        (the default). Stages with a held-out loss (pretrain, sft, dpo, orpo, kto, reward) use this: one definition with
        ``llmlab eval`` (:mod:`llmlab.heldout`); by default the stage data's
        (:meth:`llmlab.data.pipeline.StageData.heldout`, None for the types without one, and for
        a stage with no stage data)."""
        data = self.data
        return data.heldout() if data is not None else None

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """Return ``(loss, metrics)``: a scalar tensor to backpropagate and a dict of scalar
        tensors or floats to log (detached)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: list[dict]) -> dict[str, float]:
        """Mean of ``compute_loss`` metrics over the eval batches (a mean of batch means), keys
        prefixed ``eval_``: for stages without a :meth:`heldout` set."""
        sums: dict[str, float] = {}
        for batch in batches:
            loss, metrics = self.compute_loss(model, batch)
            sums["loss"] = sums.get("loss", 0.0) + float(loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        n = max(len(batches), 1)
        return {f"eval_{k}": v / n for k, v in sums.items()}

    @torch.no_grad()
    def evaluate_heldout(self, model: torch.nn.Module, heldout) -> dict[str, float]:
        """The stage's held-out numbers (``eval_loss``, ``eval_examples``, ``eval_tokens``, ...) of
        ``model`` on :meth:`heldout`'s examples, as :mod:`llmlab.heldout` defines them."""
        raise NotImplementedError(f"stage type {self.type!r} has no held-out set")

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Extra state the stage needs for an exact resume (e.g. a rollout buffer)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- output ----------------------------------------------------------------------------
    def tokens_in_batch(self, batch: dict) -> int:
        """Number of tokens processed in a batch (for tokens/s)."""
        for key in ("input_ids", "chosen_input_ids", "prompt_input_ids"):
            if key in batch:
                n = batch[key].numel()
                if key == "chosen_input_ids":
                    n += batch["rejected_input_ids"].numel()
                return int(n)
        return 0

    def summary_metrics(self) -> dict[str, float]:
        """Extra numbers for stage.json (e.g. realised mixture shares)."""
        return {}

    def finalize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Called on the main process after training, before ``final/`` is written; returns the model
        to save (the default: ``model`` unchanged; PPO detaches and saves its value head)."""
        return model

    # -- stages that train nothing ---------------------------------------------------------
    def run(self) -> dict:
        """For a stage type whose spec says ``trains: False`` (evaluate): do the stage's work on the
        main process, write its results file and return the results. Training stages do not
        implement it (the loop drives them)."""
        raise NotImplementedError(f"stage type {self.type!r} trains; llmlab.train.loop.train runs it")
