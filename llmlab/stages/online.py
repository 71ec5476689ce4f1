"""The rollout schedule shared by grpo and ppo.

One loop step is one optimizer update on one mini-batch. With ``B = batch_size`` prompts per rollout,
``G`` completions per prompt (GRPO's group_size; 1 for PPO), ``M = mini_batch_size`` prompts per
mini-batch, ``E = ppo_epochs`` and ``A = gradient_accumulation_steps`` micro-batches per step:

    updates per rollout  U = E * B / M
    index -> step = index // A, micro = index % A
    step  -> rollout r = step // U, epoch e = (step % U) // (B / M), mini-batch k = (step % U) % (B / M)

Rollout ``r`` samples completions for the prompts of ``StageData.train_batch(r)`` with the policy as it
is when the rollout is first needed (after the last update of rollout ``r - 1``), from a generator
seeded by (seed, stage, r). Each epoch visits the ``B * G`` sequences in a fresh order seeded by
(seed, stage, r, e); mini-batch ``k`` takes the ``k``-th slice of ``M * G`` sequences, micro-batch ``m``
the ``m``-th of its ``A`` parts. The rollout buffer (completions, old / reference log-probs,
advantages, ...) is the stage's ``state_dict()``, so a resume in the middle of a rollout continues
with exactly the same data, and a resume at a rollout boundary regenerates it bit for bit.

Reported with every step (stats of the rollout the step trains on): see the stage classes.
"""

from __future__ import annotations

import math

import torch

from llmlab.rl.generation import make_generator, rollout_seed, sample, sequence_forward
from llmlab.rl.rewards import RewardFunction, Rollout, check_reward_specs, exact_answer_rewards
from llmlab.stages.base import Stage
from llmlab.models.wrappers import unwrap
from llmlab.stages.reference import ReferenceModel

_BUFFER_META = ("rollout_stats",)
#: config attributes that hold a dropout probability in common Hugging Face architectures
_DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob")


def has_active_dropout(model: torch.nn.Module) -> bool:
    """True if ``model`` has an ``nn.Dropout`` with p > 0 or a config dropout probability > 0."""
    cfg = getattr(model, "config", None)
    if any(isinstance(getattr(cfg, k, 0), (int, float)) and getattr(cfg, k, 0) > 0 for k in _DROPOUT_KEYS):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


class OnlineRLStage(Stage):
    """Base of :class:`llmlab.stages.grpo.GRPOStage` and :class:`llmlab.stages.ppo.PPOStage`.

    Subclasses set ``group_size`` and implement :meth:`score_rollout` (advantages from a fresh
    buffer) and :meth:`minibatch_loss`.
    """

    group_size: int = 1
    uses_value_head: bool = False

    def __init__(self, ctx):
        super().__init__(ctx)
        where = f"stages.{ctx.name}"
        params, training = ctx.plan.params, ctx.plan.training
        self.batch_size = int(training.batch_size)
        self.mini_batch_size = int(params.mini_batch_size or self.batch_size)
        self.grad_accum = int(training.gradient_accumulation_steps)
        self.ppo_epochs = int(params.ppo_epochs)
        self.temperature = float(params.temperature)
        self.top_k = int(params.top_k)
        self.top_p = float(params.top_p)
        self.max_new_tokens = int(params.max_new_tokens)
        self.clip_range = float(params.clip_range)
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"{where}.mini_batch_size: {self.mini_batch_size} must divide batch_size {self.batch_size}")
        rows = self.mini_batch_size * self.group_size
        if rows % self.grad_accum:
            raise ValueError(f"{where}.gradient_accumulation_steps: {self.grad_accum} must divide the "
                             f"{rows} sequences of a mini-batch")
        if self.temperature < 0:
            raise ValueError(f"{where}.temperature must be >= 0")
        self.n_minibatches = self.batch_size // self.mini_batch_size
        self.updates_per_rollout = self.ppo_epochs * self.n_minibatches
        # fail before any training when the recipe names code and the user did not allow it
        check_reward_specs(params.reward or (), ctx.name, ctx.allow_code)
        self.reference = ReferenceModel(ctx, params.reference_from)
        self.reward_fn: RewardFunction | None = None
        self.buffer: dict | None = None
        self.buffer_rollout = -1

    # -- subclass hooks ----------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return True

    def score_rollout(self, buf: dict) -> None:
        """Add advantages (and whatever the loss needs) to a fresh buffer, and ``rollout_stats``."""
        raise NotImplementedError

    def minibatch_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # -- model -----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        policy = super().build_model()
        if self.needs_reference:
            self.reference.capture(policy)
        return policy

    def setup(self, model: torch.nn.Module) -> None:
        if self.needs_reference:
            self.reference.setup(model, self.ctx.device)
        if self.reward_fn is None:
            self.reward_fn = RewardFunction(self.plan.params.reward or (), self.ctx)

    # -- data ------------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        tok = self.ctx.tokenizer
        ids = []
        if tok is not None and tok.eos_token_id is not None:
            ids.append(int(tok.eos_token_id))
        if tok is not None and "<|im_end|>" in tok.get_vocab():
            ids.append(int(tok.convert_tokens_to_ids("<|im_end|>")))
        if tok is not None:  # the chat template's own end-of-turn token (e.g. llama3's <|eot_id|>)
            from llmlab.chat_templates import end_of_turn_ids

            ids += [i for i in end_of_turn_ids(tok) if i not in ids]
        return ids

    def locate(self, index: int) -> tuple[int, int, int, int]:
        """``index -> (rollout, epoch, mini-batch, micro-batch)`` (see the module docstring)."""
        step, micro = divmod(int(index), self.grad_accum)
        rollout, k = divmod(step, self.updates_per_rollout)
        epoch, mb = divmod(k, self.n_minibatches)
        return rollout, epoch, mb, micro

    def generate(self, model, prompt_ids, prompt_mask, seed: int, greedy: bool = False):
        """Completions ``[B, C]`` and their mask for left-padded prompts ``[B, P]``: sampled with
        the stage's settings from a generator seeded by ``seed``, or greedy (argmax) decoding."""
        gen = make_generator(seed, prompt_ids.device)
        return sample(model, prompt_ids, prompt_mask, max_new_tokens=self.max_new_tokens, generator=gen,
                      temperature=0.0 if greedy else self.temperature, top_k=self.top_k, top_p=self.top_p,
                      eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)

    def _expand(self, batch: dict):
        device = self.ctx.device
        ids = batch["prompt_input_ids"].to(device)
        mask = batch["prompt_attention_mask"].to(device)
        prompts = list(batch.get("prompts") or [[] for _ in range(ids.shape[0])])
        answers = list(batch.get("answers") or [])
        G = self.group_size
        if G > 1:
            ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
            prompts = [p for p in prompts for _ in range(G)]
            answers = [a for a in answers for _ in range(G)]
        return ids, mask, prompts, answers

    def reference_logps(self, model, prompt_ids, prompt_mask, comp, cmask) -> torch.Tensor:
        ref = self.reference.forward_model(model)
        with torch.no_grad(), self.reference.context(model):
            return sequence_forward(ref, prompt_ids, prompt_mask, comp, cmask, self.temperature)

    def reuses_logps(self, model) -> bool:
        """Whether a rollout may skip the forward for the sampling policy's log-probs.

        True when each rollout feeds exactly one update (``ppo_epochs * batch_size /
        mini_batch_size == 1``), no value head needs the rollout's hidden states and the model has
        no active dropout: the policy is then unchanged between sampling and its only update, and
        the "old" log-probs equal the loss forward's own, detached (the importance ratio is 1, as in
        TRL's GRPOTrainer with ``num_iterations=1``). Saves one forward over every rollout.
        """
        return self.updates_per_rollout == 1 and not self.uses_value_head and not has_active_dropout(model)

    @torch.no_grad()
    def make_rollout(self, model, rollout: int) -> dict:
        """Sample, score and (via :meth:`score_rollout`) compute advantages for rollout ``rollout``.

        The buffer holds ``old_logps`` [N, C] unless :meth:`reuses_logps`; the loss then takes the
        current log-probs, detached, in their place.
        """
        model = unwrap(model)
        was_training = model.training
        ids, mask, prompts, answers = self._expand(self.data.train_batch(rollout))
        comp, cmask = self.generate(model, ids, mask, rollout_seed(self.ctx.seed, self.ctx.name, rollout))
        model.eval()
        old_logps = values = ref_logps = None
        try:
            if self.uses_value_head:
                from llmlab.rl.value_head import get_value_head

                old_logps, hidden = sequence_forward(model, ids, mask, comp, cmask, self.temperature, return_hidden=True)
                values = get_value_head(model)(hidden)
            elif not self.reuses_logps(model):
                old_logps = sequence_forward(model, ids, mask, comp, cmask, self.temperature)
            if self.needs_reference:
                ref_logps = self.reference_logps(model, ids, mask, comp, cmask)
            elif old_logps is not None:
                ref_logps = old_logps.clone()
        finally:
            model.train(was_training)
        texts = self.reward_fn.decode(comp, cmask)
        rewards = self.reward_fn(Rollout(ids, mask, comp, cmask, prompts, texts, answers)).to(ids.device)
        buf = {"prompt_input_ids": ids, "prompt_attention_mask": mask, "completion_ids": comp,
               "completion_mask": cmask, "rewards": rewards.float()}
        if old_logps is not None:
            buf["old_logps"] = old_logps * cmask
        if ref_logps is not None:
            buf["ref_logps"] = ref_logps * cmask
        if values is not None:
            buf["old_values"] = values * cmask
        self.score_rollout(buf)
        return buf

    def get_batch(self, index: int, model: torch.nn.Module) -> dict:
        rollout, epoch, mb, micro = self.locate(index)
        if self.buffer is None or self.buffer_rollout != rollout:
            self.buffer = self.make_rollout(model, rollout)
            self.buffer_rollout = rollout
        n = self.buffer["completion_ids"].shape[0]
        gen = make_generator(rollout_seed(self.ctx.seed, self.ctx.name, rollout, salt=f"epoch{epoch}"), "cpu")
        order = torch.randperm(n, generator=gen)
        per_mb = self.mini_batch_size * self.group_size
        rows = order[mb * per_mb:(mb + 1) * per_mb]
        per_micro = per_mb // self.grad_accum
        rows = rows[micro * per_micro:(micro + 1) * per_micro]
        batch = {k: v[rows.to(v.device)] for k, v in self.buffer.items() if isinstance(v, torch.Tensor)}
        # trim right padding shared by every row of this micro-batch
        width = int(batch["completion_mask"].sum(-1).max().clamp(min=1))
        for k in ("completion_ids", "completion_mask", "old_logps", "ref_logps", "old_values",
                  "advantages", "returns"):
            if k in batch and batch[k].dim() == 2:
                batch[k] = batch[k][:, :width]
        batch["rollout_stats"] = dict(self.buffer.get("rollout_stats", {}))
        return batch

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, metrics = self.minibatch_loss(model, batch)
        metrics.update(batch.get("rollout_stats", {}))
        return loss, metrics

    def tokens_in_batch(self, batch: dict) -> int:
        if "completion_mask" in batch:
            return int(batch["prompt_attention_mask"].sum() + batch["completion_mask"].sum())
        return super().tokens_in_batch(batch)

    # -- evaluation --------------------------------------------------------------------------
    def eval_batches(self) -> list[dict]:
        return list(self.data.eval_batches())

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: list[dict]) -> dict[str, float]:
        """Held-out metrics over the eval prompts (fixed seeds, so two evals differ only by the model).

        - ``eval_reward``: mean reward of one completion per prompt sampled with the stage's
          generation settings; ``eval_reward_se``: its standard error over the ``n`` prompts,
          ``std / sqrt(n)`` (so a change of more than ~3 of it is not eval noise);
          ``eval_loss = -eval_reward`` (so "best" checkpoints are the highest-reward ones);
          ``eval_completion_length``: mean completion tokens.
        - when eval rows carry reference answers: ``eval_exact_answer``, the share of those prompts
          whose greedy (argmax) completion's final answer equals the reference exactly
          (:func:`llmlab.rl.rewards.exact_answer_rewards`), and ``eval_exact_answer_se``, its
          binomial standard error ``sqrt(p (1 - p) / n)``.
        """
        model = unwrap(model)
        rewards, exact, length = [], [], 0.0
        for i, batch in enumerate(batches):
            ids = batch["prompt_input_ids"].to(self.ctx.device)
            mask = batch["prompt_attention_mask"].to(self.ctx.device)
            prompts = list(batch.get("prompts") or [[] for _ in range(ids.shape[0])])
            answers = list(batch.get("answers") or [])
            comp, cmask = self.generate(model, ids, mask, rollout_seed(self.ctx.seed, self.ctx.name, i, salt="eval"))
            texts = self.reward_fn.decode(comp, cmask)
            rewards.append(self.reward_fn(Rollout(ids, mask, comp, cmask, prompts, texts, answers)).float())
            length += float(cmask.sum())
            if any(answers):
                comp, cmask = self.generate(model, ids, mask, 0, greedy=True)
                scores = exact_answer_rewards(self.reward_fn.decode(comp, cmask), answers)
                exact += [x for x, ref in zip(scores, answers) if ref]  # rows without one do not count
        if not rewards:
            return {}
        r = torch.cat(rewards)
        n = r.numel()
        mean = float(r.mean())
        out = {"eval_reward": mean, "eval_loss": -mean, "eval_completion_length": length / n,
               "eval_reward_se": float(r.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0}
        if exact:
            p = sum(exact) / len(exact)
            out["eval_exact_answer"] = p
            out["eval_exact_answer_se"] = math.sqrt(p * (1 - p) / len(exact))
        return out

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"buffer_rollout": int(self.buffer_rollout)}
        if self.buffer is not None:
            state["buffer"] = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                               for k, v in self.buffer.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.buffer_rollout = int(state.get("buffer_rollout", -1))
        buf = state.get("buffer")
        self.buffer = None if buf is None else {
            k: (v.to(self.ctx.device) if isinstance(v, torch.Tensor) else v) for k, v in buf.items()}
