"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, section 4.1).

For each prompt, ``group_size`` completions are sampled; each completion's advantage is its reward
normalised within its group, ``(r - mean_group) / (std_group + 1e-4)``, applied to every one of its
tokens (outcome supervision). The loss per valid completion token is the PPO clipped surrogate
(Schulman et al. 2017) plus ``kl_beta`` times the k3 estimate of KL(pi || ref) (eq. 3-4), averaged
over all completion tokens of the mini-batch. There is no value function.

Recipe keys (``stages.NAME``, type ``grpo``): ``group_size`` [4], ``temperature`` [1.0], ``top_k`` [0],
``top_p`` [1.0], ``max_new_tokens`` [32], ``clip_range`` [0.2], ``kl_beta`` [0.04], ``ppo_epochs`` [1],
``batch_size`` (prompts per rollout) [8], ``mini_batch_size`` [= batch_size], ``reward`` (list, see
:mod:`llmlab.rl.rewards`), ``reference_from`` [null]. The rollout schedule and resume: see
:mod:`llmlab.stages.online`.

Metrics: ``reward`` / ``reward_std`` (mean / std over the rollout's completions), ``group_reward_var``
(mean within-group variance), ``best_of_group`` (mean over prompts of the group's best reward),
``completion_length`` (mean tokens), ``kl`` (mean per-token k3 KL to the reference), ``policy_loss``,
``clip_fraction``, ``approx_kl`` (to the sampling policy).
Held-out metrics (``eval_reward`` and its standard error, ``eval_exact_answer`` when the prompts carry
reference answers): :meth:`llmlab.stages.online.OnlineRLStage.evaluate`.
"""

from __future__ import annotations

import torch

from llmlab.losses import clipped_policy_loss, grpo_advantages, kl_k3, masked_mean
from llmlab.rl.generation import sequence_forward
from llmlab.stage_params import GRPOParams
from llmlab.stages.online import OnlineRLStage


class GRPOStage(OnlineRLStage):
    type = "grpo"

    def __init__(self, ctx):
        params: GRPOParams = ctx.plan.params
        self.group_size = int(params.group_size)
        if self.group_size < 2:
            raise ValueError(f"stages.{ctx.name}.group_size: GRPO needs at least 2 completions per prompt")
        self.kl_beta = float(params.kl_beta)
        super().__init__(ctx)

    @property
    def needs_reference(self) -> bool:
        return self.kl_beta > 0

    def score_rollout(self, buf: dict) -> None:
        r = buf["rewards"]
        G = self.group_size
        grouped = r.view(-1, G)
        buf["advantages"] = grpo_advantages(r, G)
        mask = buf["completion_mask"]
        buf["rollout_stats"] = {
            "reward": float(r.mean()),
            "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
            "group_reward_var": float(grouped.var(dim=1).mean()),
            "best_of_group": float(grouped.max(dim=1).values.mean()),
            "completion_length": float(mask.float().sum(-1).mean()),
        }
        if "old_logps" in buf:  # else the rollout's one update reports the same value as "kl"
            kl = masked_mean(kl_k3(buf["old_logps"], buf["ref_logps"]), mask) if self.needs_reference \
                else r.new_zeros(())
            buf["rollout_stats"]["rollout_kl"] = float(kl)

    def minibatch_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = batch["completion_mask"]
        logps = sequence_forward(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                 batch["completion_ids"], mask, self.temperature)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()  # see reuses_logps
        pg_loss, clip_frac, approx_kl = clipped_policy_loss(logps, old, batch["advantages"], mask, self.clip_range)
        loss = pg_loss
        metrics = {"policy_loss": float(pg_loss.detach()), "clip_fraction": float(clip_frac),
                   "approx_kl": float(approx_kl)}
        if self.needs_reference:
            kl = masked_mean(kl_k3(logps, batch["ref_logps"]), mask)
            loss = loss + self.kl_beta * kl
            metrics["kl"] = float(kl.detach())
        else:
            metrics["kl"] = 0.0
        return loss, metrics
