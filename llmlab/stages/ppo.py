"""PPO for language models (Schulman et al. 2017), in the RLHF form of Ziegler et al. 2019 /
Ouyang et al. 2022, following the details catalogued by Huang et al. 2024 ("The N+ Implementation
Details of RLHF with PPO").

Per rollout (``batch_size`` prompts, one completion each):

- per-token reward ``r_t = -kl_coef * (log pi_old(y_t) - log ref(y_t))``, plus the sequence reward
  (the weighted ``reward`` sources) on the last completion token;
- values ``V_t`` from a scalar value head on the policy's final hidden state (:mod:`llmlab.rl.value_head`);
- GAE (Schulman et al. 2016) with ``gamma`` and ``gae_lambda`` -> advantages and returns;
  advantages whitened over the rollout when ``whiten_advantages``;
- optional adaptive KL (Ziegler et al. 2019, section 2.2): with ``kl_target`` set, after each rollout
  ``kl_coef *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * batch_size / kl_horizon``.

Per mini-batch: clipped policy loss (``clip_range``) + ``vf_coef`` x clipped value loss
(``cliprange_value``), ``ppo_epochs`` passes over ``batch_size / mini_batch_size`` mini-batches
(schedule and resume: :mod:`llmlab.stages.online`).

Recipe keys (``stages.NAME``, type ``ppo``): the generation keys of grpo (``temperature``, ``top_k``,
``top_p``, ``max_new_tokens``), ``kl_coef`` [0.05], ``kl_target`` [null], ``kl_horizon`` [10000],
``gamma`` [1.0], ``gae_lambda`` [0.95], ``clip_range`` [0.2], ``vf_coef`` [0.1], ``cliprange_value``
[0.2], ``whiten_advantages`` [true], ``ppo_epochs`` [4], ``mini_batch_size``, ``reward``,
``reference_from``.

Metrics: ``reward`` (mean sequence reward), ``kl`` (mean summed per-sequence KL to the reference at
rollout time), ``kl_coef``, ``non_score_reward``, ``completion_length``, ``policy_loss``,
``value_loss``, ``clip_fraction``, ``value_clip_fraction``, ``approx_kl``, ``explained_variance``.
Held-out metrics (``eval_reward`` and its standard error, ``eval_exact_answer`` when the prompts carry
reference answers): :meth:`llmlab.stages.online.OnlineRLStage.evaluate`.

The value head is a submodule of the policy, so checkpoints save and restore it with the weights;
:meth:`PPOStage.finalize` moves it out of the model into ``<stage>/value_head.safetensors``.
"""

from __future__ import annotations

import torch

from llmlab.layout import StageLayout
from llmlab.losses import (clipped_policy_loss, clipped_value_loss, explained_variance, gae, masked_whiten)
from llmlab.rl.generation import sequence_forward
from llmlab.rl.value_head import V_HEAD, attach_value_head, base_model, get_value_head, save_value_head
from llmlab.stage_params import PPOParams
from llmlab.stages.online import OnlineRLStage


class PPOStage(OnlineRLStage):
    type = "ppo"
    group_size = 1
    uses_value_head = True

    def __init__(self, ctx):
        params: PPOParams = ctx.plan.params
        self.kl_coef = float(params.kl_coef)
        self.kl_target = params.kl_target
        self.kl_horizon = float(params.kl_horizon)
        self.gamma = float(params.gamma)
        self.gae_lambda = float(params.gae_lambda)
        self.vf_coef = float(params.vf_coef)
        self.cliprange_value = float(params.cliprange_value)
        self.whiten_advantages = bool(params.whiten_advantages)
        super().__init__(ctx)

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0 or self.kl_target is not None

    # -- model -----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        policy = super().build_model()  # the reference copy is taken before the head is attached
        attach_value_head(policy)
        return policy

    def setup(self, model: torch.nn.Module) -> None:
        head = attach_value_head(model)  # no-op when build_model attached it
        head.to(next(base_model(model).parameters()).device)
        for p in head.parameters():  # PEFT froze every non-adapter weight, the head included
            p.requires_grad_(True)
        super().setup(model)

    def finalize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Before ``final/`` is written: save the value head to ``<stage>/value_head.safetensors`` and
        detach it from the model, so ``final/`` is a plain causal LM."""
        base = base_model(model)
        if hasattr(base, V_HEAD):
            self.ctx.stage_dir.mkdir(parents=True, exist_ok=True)
            save_value_head(model, StageLayout(self.ctx.stage_dir).value_head)
            from llmlab.ownership import match_umask

            match_umask(StageLayout(self.ctx.stage_dir).value_head)  # safetensors writes 0600
            delattr(base, V_HEAD)
        return model

    # -- rollouts --------------------------------------------------------------------------
    def score_rollout(self, buf: dict) -> None:
        mask = buf["completion_mask"]
        m = mask.float()
        kl = (buf["old_logps"] - buf["ref_logps"]) * m  # k1, per token
        non_score = -self.kl_coef * kl
        rewards = non_score.clone()
        last = (mask.sum(-1) - 1).clamp(min=0)
        rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += buf["rewards"]
        advantages, returns = gae(rewards, buf["old_values"], mask, self.gamma, self.gae_lambda)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        buf["advantages"], buf["returns"] = advantages, returns
        kl_seq = kl.sum(-1).mean()
        buf["rollout_stats"] = {
            "reward": float(buf["rewards"].mean()),
            "kl": float(kl_seq),
            "kl_coef": float(self.kl_coef),
            "non_score_reward": float(non_score.sum(-1).mean()),
            "completion_length": float(m.sum(-1).mean()),
        }
        if self.kl_target is not None:
            err = max(-0.2, min(0.2, float(kl_seq) / float(self.kl_target) - 1.0))
            self.kl_coef *= 1.0 + err * self.batch_size / self.kl_horizon

    def minibatch_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = batch["completion_mask"]
        logps, hidden = sequence_forward(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                         batch["completion_ids"], mask, self.temperature, return_hidden=True)
        values = get_value_head(model)(hidden)
        pg_loss, clip_frac, approx_kl = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"],
                                                            mask, self.clip_range)
        vf_loss, vf_clip = clipped_value_loss(values, batch["old_values"], batch["returns"], mask,
                                              self.cliprange_value)
        loss = pg_loss + self.vf_coef * vf_loss
        metrics = {
            "policy_loss": float(pg_loss.detach()),
            "value_loss": float(vf_loss.detach()),
            "clip_fraction": float(clip_frac),
            "value_clip_fraction": float(vf_clip),
            "approx_kl": float(approx_kl),
            "explained_variance": float(explained_variance(values.detach(), batch["returns"], mask)),
        }
        return loss, metrics

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl_coef": float(self.kl_coef)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "kl_coef" in state:
            self.kl_coef = float(state["kl_coef"])
