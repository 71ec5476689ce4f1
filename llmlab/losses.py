"""Pure loss functions for every stage type.

Nothing here touches a model, a tokenizer or the recipe: each function maps tensors to tensors, so
each can be tested against an independent oracle (TRL's trainers, a plain Python loop).

Shape conventions: ``B`` batch, ``T`` sequence length, ``V`` vocabulary, ``G`` group size.
Masks are ``1``/``True`` on positions that count and ``0``/``False`` elsewhere; every masked
reduction ignores the masked-out positions exactly (they may hold any finite value).

References:
    - DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
      Reward Model" (eq. 7); conservative DPO / label smoothing: Mitchell 2023, "A note on DPO with
      noisy preferences".
    - IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
      Preferences" (eq. 17).
    - ORPO: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
      (eq. 4-7); the definitions of TRL 1.16's ``ORPOTrainer``.
    - CPO: Xu et al. 2024, "Contrastive Preference Optimization" (eq. 3 plus the NLL regulariser);
      SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
      (eq. 6); both as TRL 1.16's ``CPOTrainer`` (``loss_type`` sigmoid / simpo).
    - KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
      (eq. 7-8); the definitions of TRL 1.16's ``KTOTrainer`` (batch KL estimate from mismatched pairs).
    - Bradley-Terry reward modelling: Ouyang et al. 2022, "Training language models to follow
      instructions with human feedback" (eq. 1).
    - PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate, eq. 7).
    - GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
      Estimation" (eq. 16).
    - RLHF PPO details (per-token KL penalty, whitening, value clipping, adaptive KL): Ouyang et al.
      2022; Ziegler et al. 2019; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".
    - GRPO: Shao et al. 2024, "DeepSeekMath" (group-relative advantages, k3 KL estimator, eq. 3-4);
      KL estimators: Schulman 2020, "Approximating KL Divergence" (k1, k3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# log-probabilities
# ---------------------------------------------------------------------------------------------
def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labels under the logits, next-token aligned.

    Position ``t`` of the output is ``log p(labels[:, t+1] | tokens[:, :t+1])``.

    Args:
        logits: ``[B, T, V]`` the model's logits for every input position.
        labels: ``[B, T]`` target token ids, ``-100`` where not scored (prompt, padding).

    Returns:
        ``(logps, mask)``: ``[B, T-1]`` float32 log-probs (0 where masked) and ``[B, T-1]`` bool mask.
    """
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    logps = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of the labelled tokens of each sequence (shifts inside).

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]``, ``-100`` where ignored.

    Returns:
        ``[B]`` float32: ``sum_t log p(labels[t] | tokens[<t])`` over the labelled tokens.
    """
    logps, _ = token_logps(logits, labels)
    return logps.sum(-1)


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Log-probabilities of ``input_ids[:, start:]`` given everything before them.

    Used by the online-RL stages, where a rollout is ``prompt (left-padded, length start)`` followed by
    the sampled completion.

    Args:
        logits: ``[B, L, V]`` logits of the full sequence ``input_ids`` ``[B, L]``.
        input_ids: ``[B, L]``.
        start: the prompt length ``P``; the completion is ``input_ids[:, P:]``.

    Returns:
        ``[B, L-P]`` float32 log-probs of each completion token.
    """
    logits = logits[:, start - 1:-1, :].float()
    targets = input_ids[:, start:]
    return torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set (0 when none is)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(x, mask)
    centred = (x - mean) ** 2
    var = masked_mean(centred, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean if ``shift_mean``) over the masked positions.

    Args:
        x: any shape, e.g. advantages ``[B, T]``.
        mask: same shape as ``x``.
        shift_mean: subtract the mean (True for advantages); False keeps the mean (used for rewards).

    Returns:
        Same shape as ``x``; masked-out positions are 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# preference losses
# ---------------------------------------------------------------------------------------------
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO (Rafailov et al. 2023), IPO (Azar et al. 2023) or APO (D'Oosterlinck et al. 2024) loss.

    With ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``:

    - ``sigmoid``: ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)`` (eps = label_smoothing;
      eps = 0 is the DPO loss of eq. 7; eps > 0 is conservative DPO for noisy labels).
    - ``ipo``: ``(h' - 1 / (2 beta))^2`` (eq. 17, beta is the paper's tau), where ``h'`` uses the
      log-ratios averaged per completion token when ``chosen_lengths``/``rejected_lengths`` are given
      (the normalisation TRL uses, confirmed by the IPO authors), else the summed log-ratios.
    - ``apo_zero`` (Anchored Preference Optimization, "Anchored Preference Optimization and
      Contrastive Revisions", eq. 7): ``(1 - sigma(beta r_w)) + sigma(beta r_l)`` with ``r`` each
      reply's log-ratio ``log pi - log ref``: raises the chosen reply's likelihood and lowers the
      rejected one's, each anchored to the reference (for chosen replies better than the model's own).
    - ``apo_down`` (eq. 8): ``sigma(beta r_w) + (1 - sigma(beta h))``: lowers both, the rejected
      more (for chosen replies worse than the model's own).

    Both as TRL 1.16's ``DPOTrainer`` (``loss_type`` ``apo_zero`` / ``apo_down``).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed completion log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the reference model.
        beta: the KL-strength / temperature.
        loss_type: ``sigmoid``, ``ipo``, ``apo_zero`` or ``apo_down``.
        label_smoothing: in ``[0, 0.5)``; sigmoid only.
        chosen_lengths, rejected_lengths: ``[B]`` number of completion tokens (IPO normalisation).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; the implicit rewards are
        ``beta * (log pi - log ref)`` (detached).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        logits = beta * (chosen_logratios - rejected_logratios)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            h = (chosen_logratios / chosen_lengths.to(chosen_logratios.dtype).clamp(min=1.0)
                 - rejected_logratios / rejected_lengths.to(rejected_logratios.dtype).clamp(min=1.0))
        else:
            h = chosen_logratios - rejected_logratios
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "apo_zero":
        losses = (1.0 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_logratios) + (1.0 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected sigmoid, ipo, apo_zero or apo_down")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (branch at ``-log 2``; Maechler 2012,
    "Accurately Computing log(1 - exp(-|a|))"). Shapes as input."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair odds-ratio term of ORPO (Hong et al. 2024, eq. 4-7), reference-free.

    With ``odds(y) = p(y) / (1 - p(y))`` and ``log p(y)`` the *average* per-token log-probability of
    the completion, ``log_odds = log odds(y_w) - log odds(y_l)`` and the term is
    ``-beta * log sigma(log_odds)``. The full ORPO loss adds the chosen sequence's NLL (the stage
    does). ``beta`` is the paper's lambda.

    Args:
        chosen_avg_logps, rejected_avg_logps: ``[B]`` mean log-prob per completion token (< 0).
        beta: weight of the odds-ratio term.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards, log_sigmoid_odds, log_odds)``, each ``[B]``:
        losses ``-beta log sigma(log_odds)``; rewards ``beta * avg logp`` (detached); the last two
        are ``log sigma(log_odds)`` and ``log_odds`` (TRL's ``log_odds_ratio``/``log_odds_chosen``
        metrics are their means).
    """
    c, r = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    return (-beta * log_sigmoid_odds, beta * c.detach(), beta * r.detach(), log_sigmoid_odds.detach(),
            log_odds.detach())


def cpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, loss_type: str = "cpo",
             simpo_gamma: float = 0.5, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair reference-free preference loss of CPO (Xu et al. 2024, eq. 3) or SimPO (Meng et al. 2024, eq. 6).

    With ``h = log pi(y_w) - log pi(y_l)``:

    - ``cpo``: ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)`` on *summed* completion
      log-probs (CPO's behaviour-cloning NLL term is added by the caller);
    - ``simpo``: ``-(1 - eps) log sigma(beta h - gamma) - eps log sigma(-(beta h - gamma))`` on
      *average* per-token log-probs (the length normalisation), ``gamma = simpo_gamma`` the target margin.

    Which log-probs to pass (sums or averages) is the caller's choice; this function only combines them.

    Args:
        chosen_logps, rejected_logps: ``[B]``.
        beta: temperature; loss_type: ``cpo`` or ``simpo``; simpo_gamma: SimPO's margin (simpo only);
        label_smoothing: eps in ``[0, 0.5)``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards ``beta * logps`` (detached).

    Raises:
        ValueError: an unknown ``loss_type``.
    """
    if loss_type not in ("cpo", "simpo"):
        raise ValueError(f"unknown reference-free loss_type {loss_type!r}; expected 'cpo' or 'simpo'")
    logits = beta * (chosen_logps - rejected_logps)
    if loss_type == "simpo":
        logits = logits - simpo_gamma
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z_0`` (Ethayarajh et al. 2024, eq. 8 as implemented by TRL 1.16): the
    batch mean of ``log pi(y'|x) - log ref(y'|x)`` over *mismatched* pairs (each prompt with another
    example's completion), detached and clamped at 0 (a KL divergence is never negative).

    Args:
        policy_kl_logps, ref_kl_logps: ``[N]`` summed completion log-probs of the mismatched pairs.

    Returns:
        scalar tensor ``>= 0``, no gradient.
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO loss (Ethayarajh et al. 2024, eq. 7) on unpaired desirable / undesirable examples.

    With ``r = log pi(y|x) - log ref(y|x)`` and ``z_0 = kl`` (:func:`kto_kl`): a desirable example
    costs ``desirable_weight * (1 - sigma(beta (r - z_0)))``, an undesirable one
    ``undesirable_weight * (1 - sigma(beta (z_0 - r)))``. The stage loss is their mean over all examples.

    Args:
        policy_logps, ref_logps: ``[N]`` summed completion log-probs under the policy / the reference.
        desirable: ``[N]`` bool, True for a desirable (chosen) example.
        kl: scalar reference point (no gradient).
        beta: temperature; desirable_weight, undesirable_weight: the paper's lambda_D, lambda_U.

    Returns:
        ``(losses, rewards)``, each ``[N]``; rewards ``beta * r`` (detached).
    """
    logratios = policy_logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(desirable, desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl))),
                         undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratios))))
    return losses, beta * logratios.detach()


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose chosen reward exceeds the rejected one, a tie counting one half (at a
    stage's step 0 every implicit reward is 0: a tie, not a miss). ``[B]``, ``[B]`` -> scalar."""
    return ((chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()).mean()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise Bradley-Terry reward-model loss (Ouyang et al. 2022, eq. 1), averaged over pairs.

    ``-mean log sigma(r(x, y_w) - r(x, y_l) - margin)``.

    Args:
        chosen_scores, rejected_scores: ``[B]`` scalar rewards.
        margin: optional ``[B]`` required margin.

    Returns:
        scalar loss.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


# ---------------------------------------------------------------------------------------------
# policy-gradient pieces
# ---------------------------------------------------------------------------------------------
def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k1 KL estimator ``log pi - log ref`` (unbiased, can be negative). Shapes as input."""
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 KL estimator ``exp(ref - pi) - (ref - pi) - 1`` (unbiased, always >= 0;
    Schulman 2020; used by GRPO, Shao et al. 2024 eq. 4). Shapes as input."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1.0


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16) over token sequences.

    ``delta_t = r_t + gamma V_{t+1} - V_t``; ``A_t = delta_t + gamma lam A_{t+1}``; the episode ends
    after the last valid token (``V`` and ``A`` beyond it are 0). ``mask`` marks valid positions
    (a prefix of each row for right-padded completions).

    Args:
        rewards: ``[B, T]`` per-token rewards (the RLHF convention: ``-kl_coef * KL_t`` everywhere plus
            the sequence reward on the last valid token).
        values: ``[B, T]`` value estimates ``V(s_t)``.
        mask: ``[B, T]``.
        gamma: discount; lam: GAE lambda.

    Returns:
        ``(advantages, returns)`` each ``[B, T]`` (0 where masked); ``returns = advantages + values``.
    """
    m = mask.to(values.dtype)
    rewards = rewards * m
    values = values * m
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = adv_t
        # a masked position passes nothing back: the episode ended before it
        next_adv = adv_t
        next_value = values[:, t]
    returns = (advantages + values) * m
    return advantages, returns


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                    eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, section 4.1.2, outcome supervision).

    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``, ``std`` Bessel-corrected. A group whose
    rewards are all equal gets advantage 0 everywhere (it carries no learning signal).

    Args:
        rewards: ``[B * G]`` one reward per completion, the ``G`` completions of a prompt adjacent.
        group_size: ``G``.
        scale: divide by the group std (False: only centre).

    Returns:
        ``[B * G]`` advantages.
    """
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    adv = grouped - mean
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        adv = adv / (std + eps)
    return adv.reshape(-1)


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))`` with ``rho_t = exp(logp - old)``,
    averaged over all valid tokens of the batch (token-level mean).

    Args:
        logps: ``[B, T]`` log-probs of the taken tokens under the current policy (with grad).
        old_logps: ``[B, T]`` the same under the policy that sampled them (no grad).
        advantages: ``[B, T]`` per token, or ``[B]`` per sequence (broadcast over tokens).
        mask: ``[B, T]`` valid completion tokens.
        clip_range: ``eps``.

    Returns:
        ``(loss, clip_fraction, approx_kl)``: scalar loss; the fraction of valid tokens where the
        clipped term was active; ``mean 0.5 (logp - old)^2`` (both detached).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clip_fraction, approx_kl


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss of RLHF PPO (Ziegler et al. 2019; Huang et al. 2024, detail 10).

    ``0.5 * mean_t max((V - R)^2, (old + clip(V - old, -c, c) - R)^2)``.

    Args:
        values: ``[B, T]`` current value predictions (with grad).
        old_values: ``[B, T]`` values at rollout time.
        returns: ``[B, T]`` GAE returns.
        mask: ``[B, T]``.
        cliprange_value: ``c``.

    Returns:
        ``(loss, clip_fraction)``.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss1 = (values - returns) ** 2
    loss2 = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss1, loss2), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((loss2 > loss1).float(), mask)
    return loss, clip_fraction


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` over the masked positions (1 is perfect, <= 0 is useless)."""
    var_r = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_r.clamp(min=1e-8)
