"""The held-out numbers: one definition shared by training-time eval, ``llmlab eval`` and the
evaluate stage (docs/evaluation.md says what each number means).

**Held-out loss** (pretrain, sft; ``eval_loss`` of the stages, ``mean_loss`` of ``llmlab eval``): the
mean negative log-likelihood, in nats, *per scored token* over every example of the held-out set:
``sum of -log p(token) over all scored tokens / number of scored tokens``. Each example is scored on
its own (never packed with another), the log-probabilities are taken from fp32 logits and summed in
fp64, so the number does not depend on batch size, batch order, padding or on how examples are
grouped into batches. Scored tokens are the assistant tokens of a conversation (the SFT labels) and
every token of a text document but its first (the document is conditioned on one start token: BOS,
else EOS, the separator the packed pretraining data puts before each document).

**Over-long examples** are cut from the left to the length limit (:func:`fit_left`), keeping the
scored tail: never dropped, so every held-out example counts whatever the stage's ``seq_len``; the
number cut is reported (``eval_truncated``, ``truncated``). A text document longer than the limit
is instead cut into windows overlapping by one token (:func:`windows`), so all its tokens are scored.
The limit is the model's context (``max_position_embeddings``), or ``--max-length`` in ``llmlab eval``.

**Held-out preference numbers** (dpo): per pair, the summed log-probability of the chosen and of the
rejected completion under the policy and under the reference model, each sequence scored as above;
the stage's loss (:func:`llmlab.losses.dpo_loss`) is averaged *per pair* over all pairs, the RPO NLL
per chosen token over all pairs (:func:`preference_metrics`). orpo (:func:`orpo_metrics`), kto
(:func:`kto_metrics`: the reference point over the whole held-out set) and reward models
(:func:`reward_metrics`) are scored per pair (per example for kto) over all held-out pairs the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: ``(ids, scored, cut)``: token ids, which of them are scored (``scored[i]``: token ``i``, predicted
#: from the tokens before it, counts; ``scored[0]`` is ignored), and whether the sequence was cut
#: from the left to fit the length limit (its oldest tokens not seen, the scored ones among them not
#: scored)
Scored = tuple[list[int], list[bool], bool]

def spread(rows: list, limit: int | None) -> list:
    """At most ``limit`` rows, evenly spaced over ``rows`` (deterministic; all of them when ``limit``
    is None, <= 0 or not smaller): the subset a stage's eval covers and ``llmlab eval --limit`` reads."""
    if limit is None or limit <= 0 or len(rows) <= limit:
        return rows
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


def length_limit(model: Any, max_length: int | None = None) -> int:
    """The longest sequence scored: the model's context (``max_position_embeddings``, ...; 2048 when its
    config declares none), or ``max_length`` when that is smaller."""
    from llmlab.context import UNDECLARED_CONTEXT, context_limit

    lim = context_limit(model) or UNDECLARED_CONTEXT
    return min(lim, max_length) if max_length else lim


def fit_left(ids: Sequence[int], flags: Sequence[bool], limit: int) -> Scored:
    """Cut a sequence from the left to ``limit`` tokens, keeping the scored tail.

    Args:
        ids, flags: token ids and their scored flags (same length). limit: tokens kept (>= 1).
    Returns:
        ``(ids, flags, cut)`` with ``cut`` True when tokens were removed.
    """
    ids, flags = list(ids), list(flags)
    if len(ids) > limit:
        return ids[-limit:], flags[-limit:], True
    return ids, flags, False


def windows(ids: Sequence[int], limit: int) -> list[tuple[list[int], list[bool]]]:
    """Cut a sequence whose every token but the first is scored into windows of at most ``limit``
    tokens overlapping by one, so each token but the first is scored exactly once."""
    ids = list(ids)
    if len(ids) <= limit:
        return [(ids, [False] + [True] * (len(ids) - 1))]
    out = []
    s = 0
    while s < len(ids) - 1:
        w = ids[s: s + limit]
        out.append((w, [False] + [True] * (len(w) - 1)))
        s += limit - 1
    return out


def start_token(tokenizer: Any) -> list[int]:
    """The token a text document is conditioned on: ``[BOS]``, else ``[EOS]`` (the separator packed
    pretraining data puts before each document), else none."""
    for t in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if t is not None:
            return [int(t)]
    return []


def document_windows(doc: Sequence[int], start: Sequence[int], limit: int) -> list[tuple[list[int], list[bool]]]:
    """The scored windows of one text document: ``start`` (the start token) + ``doc`` (its ids, no
    trailing EOS), cut by :func:`windows`; none for an empty document."""
    ids = list(start) + list(doc)
    return windows(ids, limit) if len(ids) >= 2 else []


def score_tokens(model: Any, items: Sequence[tuple], pad_id: int, batch_size: int = 8) -> list[tuple[float, int]]:
    """Summed log-probability of the flagged tokens of each sequence, each sequence on its own.

    Sequences are right-padded into batches of ``batch_size`` (longest first); the log-softmax is taken
    from fp32 logits, one row at a time, and each row is summed in fp64, so the result does not depend
    on the batching.

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``, ``[B, T, V]``).
        items: ``(ids, scored, ...)`` tuples (further items ignored), see :data:`Scored`.
        pad_id: the id padding is filled with (masked out, never scored).
    Returns:
        ``(sum_logprob, n_scored)`` per item, in order (nats).
    """
    import torch

    with torch.no_grad():
        return _score_tokens(model, items, pad_id, batch_size)


def _score_tokens(model: Any, items: Sequence[tuple], pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    import torch

    device = next(model.parameters()).device
    out: list[tuple[float, int] | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        T = max(len(items[i][0]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(idx), T), dtype=torch.long)
        sc = torch.zeros((len(idx), T), dtype=torch.bool)
        for r, i in enumerate(idx):
            seq, flags = items[i][0], items[i][1]
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            att[r, : len(seq)] = 1
            sc[r, 1: len(seq)] = torch.tensor(list(flags[1:]), dtype=torch.bool)
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
        targets, mask = ids[:, 1:].to(device), sc[:, 1:].to(device)
        for r, i in enumerate(idx):  # one row's fp32 log-softmax at a time: memory of one row, not B
            logp = torch.log_softmax(logits[r, :-1].float(), dim=-1)
            tok = logp.gather(-1, targets[r].unsqueeze(-1)).squeeze(-1)
            out[i] = (float((tok.double() * mask[r]).sum()), int(mask[r].sum()))
    return out  # type: ignore[return-value]


def lm_loss(scores: Sequence[tuple[float, int]]) -> tuple[float, int]:
    """``(mean NLL per scored token in nats, scored tokens)`` from :func:`score_tokens`' output
    (NaN when nothing is scored)."""
    n = sum(c for _, c in scores)
    nll = -sum(s for s, _ in scores)
    return (nll / n if n else float("nan")), n


def preference_metrics(policy_chosen: Sequence[float], policy_rejected: Sequence[float],
                       ref_chosen: Sequence[float] | None, ref_rejected: Sequence[float] | None,
                       chosen_tokens: Sequence[int], rejected_tokens: Sequence[int], *, beta: float,
                       loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                       rpo_alpha: float = 0.0, simpo_gamma: float = 0.5, cpo_alpha: float = 1.0) -> dict[str, float]:
    """The dpo stage's held-out numbers from per-pair summed log-probabilities.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: per pair, the summed completion
            log-probability (nats) under the policy and the reference model (None for the
            reference-free ``simpo`` and ``cpo``).
        chosen_tokens, rejected_tokens: per pair, the number of scored completion tokens.
        beta, loss_type, label_smoothing, rpo_alpha, simpo_gamma, cpo_alpha: the dpo stage's settings
            (:func:`llmlab.losses.dpo_loss`, :func:`llmlab.losses.cpo_loss`; SimPO compares per-token
            means, CPO weighs its chosen NLL with ``cpo_alpha``, the others with ``rpo_alpha``).
    Returns:
        ``preference_loss`` (mean over pairs), ``nll_loss`` (chosen NLL per chosen token over all
        pairs), ``loss`` (``preference_loss + weight * nll_loss``), ``rewards/accuracies`` (share of
        pairs with chosen reward > rejected reward, a tie counting one half:
        :func:`llmlab.losses.preference_accuracy`), ``rewards/margins``, ``rewards/chosen``,
        ``rewards/rejected`` (means of the implicit rewards), ``logps/chosen``, ``logps/rejected``
        (mean summed log-probabilities), ``pairs``.
    Raises:
        ValueError: no pairs.
    """
    import torch

    from llmlab.losses import cpo_loss, dpo_loss, preference_accuracy

    if not policy_chosen:
        raise ValueError("no preference pairs to evaluate")
    t = lambda xs: torch.tensor(list(xs), dtype=torch.float64)  # noqa: E731
    pc, pr, lc, lr = t(policy_chosen), t(policy_rejected), t(chosen_tokens), t(rejected_tokens)
    if loss_type in ("simpo", "cpo"):
        xc, xr = (pc / lc.clamp(min=1), pr / lr.clamp(min=1)) if loss_type == "simpo" else (pc, pr)
        losses, r_c, r_r = cpo_loss(xc, xr, beta=beta, loss_type=loss_type, simpo_gamma=simpo_gamma,
                                    label_smoothing=label_smoothing)
        weight = cpo_alpha if loss_type == "cpo" else rpo_alpha
    else:
        losses, r_c, r_r = dpo_loss(pc, pr, t(ref_chosen), t(ref_rejected), beta=beta, loss_type=loss_type,
                                    label_smoothing=label_smoothing, chosen_lengths=lc, rejected_lengths=lr)
        weight = rpo_alpha
    preference = float(losses.mean())
    nll = float(-pc.sum() / lc.sum().clamp(min=1))
    return {"loss": preference + weight * nll if weight else preference,
            "preference_loss": preference, "nll_loss": nll,
            "rewards/accuracies": float(preference_accuracy(r_c, r_r)),
            "rewards/margins": float((r_c - r_r).mean()), "rewards/chosen": float(r_c.mean()),
            "rewards/rejected": float(r_r.mean()), "logps/chosen": float(pc.mean()),
            "logps/rejected": float(pr.mean()), "pairs": len(pc)}


def eval_record(metrics: dict, heldout: Any, tokens: int, truncated: int, count_key: str = "pairs") -> dict:
    """A stage's held-out numbers as logged: ``metrics`` prefixed ``eval_`` (less their own count,
    ``count_key``), with ``eval_examples`` (the examples scored), ``eval_tokens`` (scored tokens),
    ``eval_truncated`` (examples cut from the left) and ``eval_heldout_examples`` (the held-out set
    they were drawn from)."""
    out = {f"eval_{k}": v for k, v in metrics.items() if k != count_key}
    out.update(eval_examples=len(heldout.examples), eval_tokens=tokens, eval_truncated=truncated,
               eval_heldout_examples=heldout.total)
    return out


def perplexity(mean_loss: float) -> float:
    """``exp(mean_loss)`` (NaN for NaN)."""
    return math.exp(mean_loss) if mean_loss == mean_loss else float("nan")


def lm_heldout(model: Any, heldout: Any, tokenizer: Any, pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """The held-out loss of a pretrain or sft stage's model (the module docstring's definition).

    Args:
        model: the causal LM, in eval mode. heldout: a :class:`llmlab.data.pipeline.HeldOut` of kind
            ``text`` (documents) or ``conversation`` (``(ids, flags)``). tokenizer: for the start token.
    Returns:
        ``eval_loss`` (nats per scored token), ``eval_examples``, ``eval_tokens`` (scored tokens),
        ``eval_truncated`` (examples cut from the left; documents are windowed, never cut) and
        ``eval_heldout_examples`` (the held-out set the examples were drawn from).
    """
    limit = length_limit(model)
    if heldout.kind == "text":
        start = start_token(tokenizer)
        items: list = [w for doc in heldout.examples for w in document_windows(doc, start, limit)]
        cut = 0
    else:
        items = [fit_left(ids, flags, limit) for ids, flags in heldout.examples]
        cut = sum(it[2] for it in items)
    loss, tokens = lm_loss(score_tokens(model, items, pad_id, batch_size))
    return eval_record({"loss": loss}, heldout, tokens, cut)


def pair_logps(model: Any, pairs: Sequence[tuple], pad_id: int, batch_size: int = 8
               ) -> tuple[list[tuple[float, int]], list[tuple[float, int]], int]:
    """Per pair, ``(summed log-probability, scored tokens)`` of the chosen and of the rejected sequence
    (``pairs``: ``((ids, flags), (ids, flags))``), each cut from the left to ``model``'s context, and
    the number of pairs with a cut sequence."""
    limit = length_limit(model)
    items = [fit_left(ids, flags, limit) for pair in pairs for ids, flags in pair]
    scores = score_tokens(model, items, pad_id, batch_size)
    cut = sum(a[2] or b[2] for a, b in zip(items[0::2], items[1::2]))
    return scores[0::2], scores[1::2], cut


def whole_logps(model: Any, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> list[tuple[float, int]]:
    """Per sequence, ``(summed log-probability, scored tokens)`` of every token but the first (prompt
    included: ORPO's NLL term), each sequence cut from the left to ``model``'s context."""
    limit = length_limit(model)
    return score_tokens(model, [fit_left(ids, [True] * len(ids), limit) for ids in seqs], pad_id, batch_size)


def orpo_metrics(chosen: Sequence[tuple[float, int]], rejected: Sequence[tuple[float, int]],
                 chosen_whole: Sequence[tuple[float, int]], *, beta: float) -> dict[str, float]:
    """The orpo stage's held-out numbers (Hong et al. 2024; the stage's loss, :mod:`llmlab.stages.orpo`).

    Args:
        chosen, rejected: per pair, ``(summed completion log-probability, completion tokens)``
            (:func:`pair_logps`). chosen_whole: per pair, the same over every token of the chosen
            sequence but its first, prompt included (:func:`whole_logps`). beta: the stage's ``beta``.
    Returns:
        ``nll_loss`` (chosen-sequence NLL per token over all pairs), ``preference_loss`` (the
        odds-ratio term ``-beta log sigma(log odds)`` averaged over pairs: :func:`llmlab.losses.orpo_loss`),
        ``loss`` (their sum), ``log_odds_ratio``, ``log_odds_chosen`` (means over pairs),
        ``rewards/*`` (``beta`` × mean completion log-prob per token; accuracy with ties one half),
        ``logps/chosen``, ``logps/rejected`` (means of the per-token completion log-probs), ``pairs``.
    Raises:
        ValueError: no pairs.
    """
    import torch

    from llmlab.losses import orpo_loss, preference_accuracy

    if not chosen:
        raise ValueError("no preference pairs to evaluate")
    avg = lambda xs: torch.tensor([s / max(n, 1) for s, n in xs], dtype=torch.float64)  # noqa: E731
    ac, ar = avg(chosen), avg(rejected)
    losses, r_c, r_r, log_sig, log_odds = orpo_loss(ac, ar, beta)
    preference = float(losses.double().mean())
    nll = -sum(s for s, _ in chosen_whole) / max(sum(n for _, n in chosen_whole), 1)
    return {"loss": nll + preference, "preference_loss": preference, "nll_loss": nll,
            "log_odds_ratio": float(log_sig.double().mean()), "log_odds_chosen": float(log_odds.double().mean()),
            "rewards/accuracies": float(preference_accuracy(r_c, r_r)),
            "rewards/margins": float((r_c - r_r).double().mean()), "rewards/chosen": float(r_c.double().mean()),
            "rewards/rejected": float(r_r.double().mean()), "logps/chosen": float(ac.mean()),
            "logps/rejected": float(ar.mean()), "pairs": len(ac)}


def sequence_rewards(model: Any, seqs: Sequence[Sequence[int]], batch_size: int = 8) -> tuple[list[float], int]:
    """A reward model's (``num_labels = 1`` sequence classifier) scalar score of each sequence, cut from
    the left to its context, and how many were cut. Sequences are batched only with others of the same
    length, never padded, so each score is that of the sequence alone (as ``llmlab eval`` scores it),
    whatever the classifier's pooling does with padding."""
    import torch

    limit = length_limit(model)
    device = next(model.parameters()).device
    cut = [ids[-limit:] for ids in (list(s) for s in seqs)]
    out: list[float] = [0.0] * len(cut)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(cut):
        by_len.setdefault(len(ids), []).append(i)
    with torch.no_grad():
        for idx_all in by_len.values():
            for b in range(0, len(idx_all), batch_size):
                idx = idx_all[b: b + batch_size]
                ids = torch.tensor([cut[i] for i in idx], dtype=torch.long, device=device)
                logits = model(input_ids=ids).logits.float().reshape(len(idx), -1)[:, 0]
                for i, v in zip(idx, logits.tolist()):
                    out[i] = v
    return out, sum(len(s) > limit for s in seqs)


def reward_metrics(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> dict[str, float]:
    """A reward model's held-out numbers from per-pair scores (the reward stage's ``eval_*``, ``llmlab
    eval``'s ``reward_*``): ``loss`` (the Bradley-Terry loss ``-log sigma(r_c - r_r)`` averaged over
    pairs, :func:`llmlab.losses.bradley_terry_loss`), ``accuracy`` (share of pairs with ``r_c > r_r``,
    a tie one half: :func:`llmlab.losses.preference_accuracy`), ``margin`` (mean ``r_c - r_r``),
    ``chosen``, ``rejected``, ``reward_mean`` (mean scores), ``pairs``.

    Raises:
        ValueError: no pairs.
    """
    import torch

    from llmlab.losses import bradley_terry_loss, preference_accuracy

    if not chosen_scores:
        raise ValueError("no preference pairs to evaluate")
    c = torch.tensor(list(chosen_scores), dtype=torch.float64)
    r = torch.tensor(list(rejected_scores), dtype=torch.float64)
    return {"loss": float(bradley_terry_loss(c, r)), "accuracy": float(preference_accuracy(c, r)),
            "margin": float((c - r).mean()), "chosen": float(c.mean()), "rejected": float(r.mean()),
            "reward_mean": float(torch.cat([c, r]).mean()), "pairs": len(c)}


def kto_mismatched(examples: Sequence[tuple]) -> list[tuple[list[int], list[bool]]]:
    """KTO's mismatched examples over a whole held-out set: example ``j``'s prompt followed by example
    ``j-1``'s completion (cyclically), as :func:`llmlab.stages.kto.mismatched_rows` builds them within
    a training batch. A prompt is every token before the first scored one; a completion runs from there
    to the end, with its flags.

    Args:
        examples: ``(ids, flags, ...)`` whole (uncut) sequences, at least one scored token each.
    Returns:
        ``(ids, flags)`` per example, in order.
    """
    starts = [next(i for i, f in enumerate(ex[1]) if f and i > 0) for ex in examples]
    out = []
    for j, ex in enumerate(examples):
        k = (j - 1) % len(examples)
        prev = examples[k]
        out.append((list(ex[0][:starts[j]]) + list(prev[0][starts[k]:]),
                    [False] * starts[j] + list(prev[1][starts[k]:])))
    return out


def kto_logps(model: Any, examples: Sequence[tuple], pad_id: int, batch_size: int = 8,
              max_length: int | None = None) -> tuple[list[float], list[float], list[int], list[bool]]:
    """The summed completion log-probabilities KTO's held-out numbers need, under ``model``.

    Args:
        examples: ``(ids, flags, ...)`` whole sequences (see :func:`kto_mismatched`).
        max_length: a lower length limit than ``model``'s context.
    Returns:
        ``(logps, kl_logps, tokens, cut)``: per example, the summed log-probability of its completion
        and of its mismatched counterpart's (:func:`kto_mismatched`), each sequence cut from the left
        to the length limit; the scored tokens of each example; whether each example was cut.
    """
    limit = length_limit(model, max_length)
    items = [fit_left(ex[0], ex[1], limit) for ex in examples]
    kl_items = [fit_left(ids, flags, limit) for ids, flags in kto_mismatched(examples)]
    scores = score_tokens(model, items + kl_items, pad_id, batch_size)
    n = len(items)
    return ([s for s, _ in scores[:n]], [s for s, _ in scores[n:]], [c for _, c in scores[:n]],
            [it[2] for it in items])


def cut_count(cut: Sequence[bool], paired: bool) -> int:
    """How many examples were cut (:func:`kto_logps`' flags); with ``paired`` (the ``N`` chosen then
    the ``N`` rejected sequences of ``N`` pairs), how many pairs had a sequence cut."""
    if not paired:
        return sum(cut)
    n = len(cut) // 2
    return sum(a or b for a, b in zip(cut[:n], cut[n:]))


def kto_metrics(logps: Sequence[float], ref_logps: Sequence[float], kl_logps: Sequence[float],
                ref_kl_logps: Sequence[float], desirable: Sequence[bool], *, beta: float,
                desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                paired: bool = False) -> dict[str, float]:
    """The kto stage's held-out numbers (Ethayarajh et al. 2024; :mod:`llmlab.stages.kto`).

    The reference point ``z_0`` (``kl``) is :func:`llmlab.losses.kto_kl` over the mismatched
    examples of the *whole* held-out set (:func:`kto_mismatched`), not per batch, so the numbers do
    not depend on batching; ``loss`` is :func:`llmlab.losses.kto_loss` averaged over all examples.

    Args:
        logps, ref_logps: per example, the summed completion log-probability under the policy and
            the reference. kl_logps, ref_kl_logps: the same for the mismatched examples.
        desirable: per example. beta, desirable_weight, undesirable_weight: the stage's settings.
        paired: the examples are preference pairs, the ``N`` chosen then the ``N`` rejected
            completions: adds ``rewards/accuracies`` (ties one half, :func:`llmlab.losses.preference_accuracy`).
    Returns:
        ``loss``, ``kl``, ``rewards/chosen``, ``rewards/rejected``, ``logps/chosen``, ``logps/rejected``
        (means over the desirable / undesirable examples; absent for a side with none),
        ``rewards/margins`` (when both sides have examples), ``examples``.
    Raises:
        ValueError: no examples.
    """
    import torch

    from llmlab.losses import kto_kl, kto_loss, preference_accuracy

    if not logps:
        raise ValueError("no examples to evaluate")
    t = lambda xs: torch.tensor(list(xs), dtype=torch.float64)  # noqa: E731
    kl = kto_kl(t(kl_logps), t(ref_kl_logps))
    want = torch.tensor([bool(d) for d in desirable])
    losses, rewards = kto_loss(t(logps), t(ref_logps), want, kl, beta, desirable_weight, undesirable_weight)
    out = {"loss": float(losses.mean()), "kl": float(kl), "examples": len(losses)}
    for side, sel in (("chosen", want), ("rejected", ~want)):
        if sel.any():
            out[f"rewards/{side}"] = float(rewards[sel].mean())
            out[f"logps/{side}"] = float(t(logps)[sel].mean())
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if paired:
        n = len(rewards) // 2
        out["rewards/accuracies"] = float(preference_accuracy(rewards[:n], rewards[n:]))
    return out
