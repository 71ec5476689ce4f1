"""Measure a model on canonical rows (see :mod:`llmlab.inference.datasets`).

:func:`evaluate_model` is the one entry point, used by ``llmlab eval`` and meant for an ``evaluate``
stage type. What it reports per kind:

- text: ``perplexity = exp(mean_loss)``, where ``mean_loss`` is the mean negative log-likelihood
  (nats) over every scored token of every document, and ``bits_per_byte = total_nll / ln 2 /
  utf8_bytes`` (comparable across tokenizers). Each document is encoded without special tokens and
  conditioned on one start token (BOS, else EOS — the document separator the packed pretraining data
  uses), so every token of the text is scored and no trailing EOS is; a document longer than the
  context is cut into windows that overlap by one token (each window is scored on its own context).
- conversation: perplexity on the assistant tokens only (the SFT objective).
- preference: per pair the summed log-probability of the chosen and the rejected completion given the
  prompt.
  Conversations are tokenized as ``llmlab.data`` tokenizes them for training: the chat template over
  the whole conversation, no BOS added, scored tokens = the template's generation spans (each reply
  plus its ``<|im_end|>``), so these numbers match the sft/dpo stages' own eval metrics. For a base
  model (no chat template) the prompt's contents and the completion are joined as plain text. ``logp_accuracy`` is the share of pairs where the model prefers the chosen one (needs no
  reference, so it compares any two models); ``avg_logp_accuracy`` the same on log-probabilities
  averaged per completion token (the implicit reward of the reference-free SimPO and ORPO). With a reference model, the DPO implicit reward
  ``r = beta * (log pi(y|x) - log pi_ref(y|x))`` gives ``reward_accuracy`` (share with
  r_chosen > r_rejected, a tie counting one half: at step 0 every implicit reward ties), ``reward_margin`` (mean r_chosen - r_rejected),
  the mean rewards, and the dpo stage's held-out ``loss`` (its ``eval_loss``: ``preference_loss``, the
  DPO/IPO loss per pair averaged over pairs, plus ``rpo_alpha`` times ``nll_loss``). A reward model (``*ForSequenceClassification``) is scored directly, each
  sequence on its own: the reward stage's held-out numbers (``loss``: Bradley-Terry per pair;
  ``reward_accuracy``, a tie one half; ``reward_margin``). For an orpo or kto stage's model the stage's
  own numbers (``loss_type`` orpo / kto; docs/evaluation.md).
- prompt: sample generations (seeded), with a reward model's score for each when one is given.

The scoring and the rules below are those of :mod:`llmlab.heldout`, shared with the training stages'
``eval_loss`` (docs/evaluation.md). A conversation or preference sequence longer than the limit
(``max_length``, default the model's context) is cut from the left, keeping its scored tail; ``truncated`` counts the rows so cut
(conversations; pairs whose chosen or rejected sequence was cut; sampled prompts whose reward-model
input was cut), and ``llmlab eval`` prints a note when it is not 0: a cut eval is never silent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from llmlab.inference.generation import (
    GenerationSettings,
    PromptTooLongError,
    generate_text,
    messages_as_text,
)
from llmlab.heldout import (Scored, cut_count, document_windows, fit_left, kto_logps, kto_metrics, length_limit,  # noqa: F401
                            lm_loss, orpo_metrics, perplexity, preference_metrics, reward_metrics, score_tokens,
                            start_token)
from llmlab.inference.loading import has_chat_template, is_reward_model

LN2 = math.log(2.0)


# -- scoring: llmlab.heldout ---------------------------------------------------------------------
def _pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0)


def _render(tokenizer: Any, messages: list[dict], is_chat: bool, generation_prompt: bool) -> str:
    if is_chat:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = messages_as_text(messages)
    return text + "\n" if generation_prompt and text else text


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _spans(mask: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def _chat_scored(tokenizer: Any, messages: list[dict], last_k: int | None, limit: int) -> Scored:
    """Chat-rendered ids with the tokens of the last ``last_k`` assistant turns flagged (all when None).

    Follows the training convention of ``llmlab.data``: the whole conversation tokenized by the chat
    template, scored tokens = the template's generation spans (reply + ``<|im_end|>``), no BOS added.
    Templates without generation markers fall back to rendering prefix by prefix, scoring each
    assistant turn's rendering minus its trailing whitespace. Cut from the left to ``limit`` (:func:`llmlab.heldout.fit_left`).
    """
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = list(enc["input_ids"])
    spans = _spans(enc.get("assistant_masks") or [])
    if not spans:
        return _chat_scored_by_prefix(tokenizer, messages, last_k, limit)
    if last_k is not None:
        spans = spans[-last_k:] if last_k > 0 else []
    flags = [False] * len(ids)
    for a, b in spans:
        flags[a:b] = [True] * (b - a)
    return fit_left(ids, flags, limit)


def _chat_scored_by_prefix(tokenizer: Any, messages: list[dict], last_k: int | None, limit: int) -> Scored:
    n_assist = sum(m["role"] == "assistant" for m in messages)
    first_scored = 0 if last_k is None else n_assist - last_k
    ids: list[int] = []
    flags: list[bool] = []
    done, seen = "", 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        piece = through[len(before):]
        core = piece.rstrip()  # the reply and its end marker; trailing whitespace is template layout
        a, b, c = (_encode(tokenizer, before[len(done):]), _encode(tokenizer, core),
                   _encode(tokenizer, piece[len(core):]))
        ids += a + b + c
        flags += [False] * len(a) + [seen >= first_scored] * len(b) + [False] * len(c)
        done, seen = through, seen + 1
    return fit_left(ids, flags, limit)


def _prompt_completion(tokenizer: Any, prompt: list[dict], completion: list[dict], is_chat: bool,
                       limit: int) -> Scored:
    """Token ids of prompt + completion with the completion's tokens flagged, cut to ``limit`` (the prompt
    from the left first, then the completion's tail)."""
    if is_chat:
        return _chat_scored(tokenizer, prompt + completion,
                            sum(m["role"] == "assistant" for m in completion), limit)
    p_ids = start_token(tokenizer) + _encode(tokenizer, messages_as_text(prompt) + "\n" if prompt else "")
    c_ids = _encode(tokenizer, messages_as_text(completion))
    n = len(p_ids) + len(c_ids)
    c_ids = c_ids[: max(limit - 1, 1)]
    p_ids = p_ids[-max(limit - len(c_ids), 1):]
    return p_ids + c_ids, [False] * len(p_ids) + [True] * len(c_ids), len(p_ids) + len(c_ids) < n


# -- per kind --------------------------------------------------------------------------------------
def eval_text(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8,
              max_length: int | None = None) -> dict:
    """Perplexity and bits per byte on plain text documents (rule in the module docstring)."""
    limit = length_limit(model, max_length)
    start = start_token(tokenizer)
    items = []
    n_bytes = 0
    for t in texts:
        n_bytes += len(t.encode("utf-8"))
        items.extend(document_windows(_encode(tokenizer, t), start, limit))
    mean, n = lm_loss(score_tokens(model, items, _pad_id(tokenizer), batch_size))
    nll = mean * n if n else 0.0
    return {"documents": len(texts), "tokens": n, "bytes": n_bytes, "mean_loss": mean,
            "perplexity": perplexity(mean), "bits_per_token": mean / LN2,
            "bits_per_byte": nll / LN2 / n_bytes if n_bytes else float("nan")}


def eval_conversation(model: Any, tokenizer: Any, rows: Sequence[dict], batch_size: int = 8,
                      max_length: int | None = None) -> dict:
    """Perplexity on the assistant tokens of conversations (needs a chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversation data needs a tokenizer with a chat template")
    limit = length_limit(model, max_length)
    items = [_chat_scored(tokenizer, r["messages"], None, limit) for r in rows]
    mean, n = lm_loss(score_tokens(model, items, _pad_id(tokenizer), batch_size))
    return {"conversations": len(rows), "tokens": n, "mean_loss": mean,
            "perplexity": perplexity(mean), "truncated": sum(it[2] for it in items)}


def preference_logps(model: Any, tokenizer: Any, rows: Sequence[dict], is_chat: bool, batch_size: int = 8,
                     max_length: int | None = None, whole_chosen: bool = False) -> tuple[list[tuple[float, int]], ...]:
    """Per pair, ``(summed log-probability, scored tokens)`` of the chosen and of the rejected completion,
    and the number of pairs whose chosen or rejected sequence was cut from the left to fit the length limit.
    With ``whole_chosen``, a fourth item: per pair the same over every token of the (cut) chosen
    sequence but its first, prompt included (ORPO's NLL term, :func:`llmlab.heldout.whole_logps`)."""
    limit = length_limit(model, max_length)
    items = []
    for r in rows:
        items.append(_prompt_completion(tokenizer, r["prompt"], r["chosen"], is_chat, limit))
        items.append(_prompt_completion(tokenizer, r["prompt"], r["rejected"], is_chat, limit))
    scores = score_tokens(model, items, _pad_id(tokenizer), batch_size)
    cut = sum(a[2] or b[2] for a, b in zip(items[0::2], items[1::2]))
    if not whole_chosen:
        return scores[0::2], scores[1::2], cut
    whole = score_tokens(model, [(ids, [True] * len(ids)) for ids, _, _ in items[0::2]], _pad_id(tokenizer),
                         batch_size)
    return scores[0::2], scores[1::2], cut, whole


@torch.no_grad()
def reward_scores(reward_model: Any, tokenizer: Any, conversations: Sequence[list[dict]],
                  is_chat: bool) -> tuple[list[float], list[bool]]:
    """A reward model's scalar score for each conversation (one at a time: no padding ambiguity), and
    for each whether it was longer than the model's context and cut from the left (scored on its tail)."""
    device = next(reward_model.parameters()).device
    limit = length_limit(reward_model, None)
    out, cut = [], []
    for msgs in conversations:
        text = _render(tokenizer, msgs, is_chat, False)
        ids = _encode(tokenizer, text) if is_chat else start_token(tokenizer) + _encode(tokenizer, text)
        cut.append(len(ids) > limit)
        logits = reward_model(input_ids=torch.tensor([ids[-limit:]], device=device)).logits
        out.append(float(logits.reshape(-1)[0]))
    return out, cut


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def eval_preference(model: Any, tokenizer: Any, rows: Sequence[dict], is_chat: bool, reference: Any = None,
                    beta: float = 0.1, batch_size: int = 8, max_length: int | None = None,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0, rpo_alpha: float = 0.0,
                    simpo_gamma: float = 0.5, cpo_alpha: float = 1.0, desirable_weight: float = 1.0,
                    undesirable_weight: float = 1.0) -> dict:
    """Preference metrics of a policy (optionally against a reference) or of a reward model.

    With a reference (or ``loss_type`` simpo / cpo, reference-free), also the dpo stage's held-out
    numbers (:func:`llmlab.heldout.preference_metrics` with ``beta``, ``loss_type``,
    ``label_smoothing``, ``rpo_alpha``, ``simpo_gamma``, ``cpo_alpha``): ``loss`` (the stage's
    ``eval_loss``), ``preference_loss`` and ``nll_loss``. With ``loss_type="orpo"``, the orpo stage's
    (:func:`llmlab.heldout.orpo_metrics` with ``beta``; no reference). With ``loss_type="kto"`` and a
    reference, the kto stage's on the pairs (:func:`_kto_numbers`). A reward model's numbers are the
    reward stage's (:func:`llmlab.heldout.reward_metrics`): ``loss`` (Bradley-Terry, per pair),
    ``reward_accuracy`` (a tie one half), ``reward_margin``."""
    if is_reward_model(model):
        sc, cut_c = reward_scores(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows], is_chat)
        sr, cut_r = reward_scores(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows], is_chat)
        m = reward_metrics(sc, sr)  # the reward stage's held-out numbers
        return {"pairs": len(rows), "reward_model": True, "reward_accuracy": m["accuracy"],
                "reward_margin": m["margin"], "chosen_reward": m["chosen"], "rejected_reward": m["rejected"],
                "loss": m["loss"], "truncated": sum(a or b for a, b in zip(cut_c, cut_r))}
    if loss_type == "orpo":
        c, r, cut, whole = preference_logps(model, tokenizer, rows, is_chat, batch_size, max_length, True)
    else:
        c, r, cut = preference_logps(model, tokenizer, rows, is_chat, batch_size, max_length)
    pc, pr = [s for s, _ in c], [s for s, _ in r]
    mc, mr = [s / max(n, 1) for s, n in c], [s / max(n, 1) for s, n in r]  # per-token means
    res = {"pairs": len(rows), "logp_accuracy": _mean([float(a > b) for a, b in zip(pc, pr)]),
           "avg_logp_accuracy": _mean([float(a > b) for a, b in zip(mc, mr)]),
           "chosen_logp": _mean(pc), "rejected_logp": _mean(pr), "truncated": cut}
    if loss_type == "orpo":  # reference-free: the orpo stage's held-out numbers
        m = orpo_metrics(c, r, whole, beta=beta)
        res.update(beta=beta, loss_type=loss_type, loss=m["loss"], preference_loss=m["preference_loss"],
                   nll_loss=m["nll_loss"], reward_accuracy=m["rewards/accuracies"], reward_margin=m["rewards/margins"],
                   chosen_reward=m["rewards/chosen"], rejected_reward=m["rewards/rejected"],
                   log_odds_ratio=m["log_odds_ratio"])
    elif loss_type == "kto":
        if reference is None:
            raise ValueError("the kto numbers need a reference model")
        m = _kto_numbers(model, tokenizer, rows, is_chat, reference, batch_size, max_length, beta=beta,
                         desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        res["truncated"] = max(cut, m.pop("truncated"))
        res.update(m)
    elif reference is not None or loss_type in ("simpo", "cpo"):
        m = _dpo_numbers(model, tokenizer, rows, is_chat, reference, c, r, batch_size, max_length, beta=beta,
                         loss_type=loss_type, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha,
                         simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha)
        res["truncated"] = max(cut, m.pop("truncated"))
        res.update(m)
    return res


def _kto_numbers(model: Any, tokenizer: Any, rows: Sequence[dict], is_chat: bool, reference: Any,
                 batch_size: int, max_length: int | None, *, beta: float, desirable_weight: float,
                 undesirable_weight: float) -> dict:
    """The kto stage's held-out numbers on preference pairs (:func:`llmlab.heldout.kto_metrics`): the
    chosen completions desirable, the rejected undesirable, the reference point over the whole set."""
    whole = 10 ** 9  # build whole sequences; kto_logps cuts them (and their mismatched pairs) to the limit
    seqs = [[_prompt_completion(tokenizer, r["prompt"], r[side], is_chat, whole) for r in rows]
            for side in ("chosen", "rejected")]
    examples = [(ids, flags, True) for ids, flags, _ in seqs[0]] + [(ids, flags, False) for ids, flags, _ in seqs[1]]
    pad = _pad_id(tokenizer)
    lp, kl, _, cut = kto_logps(model, examples, pad, batch_size, max_length)
    ref_lp, ref_kl, _, ref_cut = kto_logps(reference, examples, pad, batch_size, max_length)
    m = kto_metrics(lp, ref_lp, kl, ref_kl, [ex[2] for ex in examples], beta=beta, desirable_weight=desirable_weight,
                    undesirable_weight=undesirable_weight, paired=True)
    return {"beta": beta, "loss_type": "kto", "loss": m["loss"], "kl": m["kl"],
            "reward_accuracy": m["rewards/accuracies"], "reward_margin": m["rewards/margins"],
            "chosen_reward": m["rewards/chosen"], "rejected_reward": m["rewards/rejected"],
            "truncated": cut_count([a or b for a, b in zip(cut, ref_cut)], True)}


def _dpo_numbers(model: Any, tokenizer: Any, rows: Sequence[dict], is_chat: bool, reference: Any,
                 c: list, r: list, batch_size: int, max_length: int | None, *, beta: float,
                 **loss: Any) -> dict:
    """The dpo stage's held-out numbers from the policy's per-pair ``c``, ``r`` (:func:`preference_logps`)
    and, unless ``loss["loss_type"]`` is reference-free (simpo, cpo), ``reference``'s."""
    pc, pr = [s for s, _ in c], [s for s, _ in r]
    rc = rr = None
    res: dict = {"truncated": 0}
    if loss["loss_type"] not in ("simpo", "cpo"):
        ref_c, ref_r, res["truncated"] = preference_logps(reference, tokenizer, rows, is_chat, batch_size, max_length)
        rc, rr = [s for s, _ in ref_c], [s for s, _ in ref_r]
        res["reference_logp_accuracy"] = _mean([float(a > b) for a, b in zip(rc, rr)])
    m = preference_metrics(pc, pr, rc, rr, [n for _, n in c], [n for _, n in r], beta=beta, **loss)
    res.update(beta=beta, reward_accuracy=m["rewards/accuracies"], reward_margin=m["rewards/margins"],
               chosen_reward=m["rewards/chosen"], rejected_reward=m["rewards/rejected"],
               loss_type=loss["loss_type"], loss=m["loss"], preference_loss=m["preference_loss"],
               nll_loss=m["nll_loss"])
    return res


def eval_prompts(model: Any, tokenizer: Any, rows: Sequence[dict], is_chat: bool,
                 settings: GenerationSettings | None = None, num_samples: int = 8, reward_model: Any = None) -> dict:
    """Sample generations for the first ``num_samples`` prompts; score them with a reward model
    ``(model, tokenizer, is_chat)`` when given. Sample ``i`` uses seed ``settings.seed + i``. A reply
    longer than the context leaves is capped (the sample's ``note`` says so); a prompt that fills the
    context is listed under ``skipped_prompts``, never cut."""
    settings = settings or GenerationSettings(max_new_tokens=64, seed=0)
    base_seed = settings.seed if settings.seed is not None else 0
    samples, skipped = [], []
    for i, r in enumerate(rows[:num_samples]):
        try:
            g = generate_text(model, tokenizer, r["prompt"], settings.replace(seed=base_seed + i), is_chat)
        except PromptTooLongError as e:  # said in the report, never cut silently
            skipped.append({"index": i, "reason": str(e)})
            continue
        s = {"prompt": r["prompt"], "completion": g.text, "finish_reason": g.finish_reason,
             "completion_tokens": g.completion_tokens}
        if g.note:
            s["note"] = g.note
        if reward_model is not None:
            rm, rtok, rchat = reward_model
            (s["reward"],), (cut,) = reward_scores(rm, rtok, [r["prompt"] + [{"role": "assistant", "content": g.text}]],
                                                   rchat)
            if cut:
                s["truncated"] = True  # the reward model saw the tail of prompt + completion
        samples.append(s)
    res: dict = {"prompts": len(samples), "mean_completion_tokens": _mean([s["completion_tokens"] for s in samples]),
                 "samples": samples}
    if skipped:
        res["skipped_prompts"] = skipped
    if reward_model is not None:
        res["mean_reward"] = _mean([s["reward"] for s in samples])
        res["truncated"] = sum(bool(s.get("truncated")) for s in samples)
    return res


def evaluate_model(model: Any, tokenizer: Any, rows: Sequence[dict], kind: str, *, is_chat: bool | None = None,
                   reference: Any = None, reward_model: Any = None, beta: float = 0.1, batch_size: int = 8,
                   max_length: int | None = None, settings: GenerationSettings | None = None,
                   num_samples: int = 8, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                   rpo_alpha: float = 0.0, simpo_gamma: float = 0.5, cpo_alpha: float = 1.0,
                   desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> dict:
    """Evaluate a model on rows of one kind; returns a JSON-ready dict of metrics.

    Args:
        model, tokenizer: a causal LM (or, for preference rows, a reward model) and its tokenizer.
        rows: canonical rows (see :mod:`llmlab.inference.datasets`).
        kind: ``"text"``, ``"conversation"``, ``"preference"`` or ``"prompt"``.
        is_chat: render conversations with the chat template; default: the tokenizer has a ChatML one.
        reference: a reference causal LM sharing ``tokenizer``, for DPO implicit rewards (preference).
        reward_model: ``(model, tokenizer, is_chat)`` scoring sampled generations (prompt).
        beta: the DPO beta of the implicit reward.
        loss_type, label_smoothing, rpo_alpha, simpo_gamma, cpo_alpha: the dpo stage's loss settings, for
            its held-out ``loss`` (preference rows with a reference, or simpo / cpo;
            :func:`llmlab.heldout.preference_metrics`); ``loss_type="orpo"``: the orpo stage's
            (:func:`llmlab.heldout.orpo_metrics`, ``beta`` its beta).
        desirable_weight, undesirable_weight: the kto stage's, with ``loss_type="kto"`` (and a reference).
        batch_size, max_length: scoring batch size and the longest sequence scored (default: context).
        settings, num_samples: generation settings and number of prompts sampled (prompt).

    The metrics are described in this module's docstring. The result always holds ``kind``,
    ``rows`` and ``seconds``.
    """
    if is_chat is None:
        is_chat = has_chat_template(tokenizer)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if kind == "text":
            res = eval_text(model, tokenizer, [row["text"] for row in rows], batch_size, max_length)
        elif kind == "conversation":
            res = eval_conversation(model, tokenizer, rows, batch_size, max_length)
        elif kind == "preference":
            res = eval_preference(model, tokenizer, rows, is_chat, reference, beta, batch_size, max_length,
                                  loss_type, label_smoothing, rpo_alpha, simpo_gamma, cpo_alpha,
                                  desirable_weight, undesirable_weight)
        elif kind == "prompt":
            res = eval_prompts(model, tokenizer, rows, is_chat, settings, num_samples, reward_model)
        else:
            raise ValueError(f"unknown kind {kind!r} (text, conversation, preference, prompt)")
    finally:
        model.train(was_training)
    return {"kind": kind, "rows": len(rows), **res, "seconds": round(time.perf_counter() - t0, 3)}
