"""Reward sources for the online-RL stages (grpo, ppo), from a stage's ``reward:`` list.

Each entry is exactly one of (plus ``weight`` [1.0]; the stage reward is the weighted sum):

- ``{from: STAGE}``: the reward model trained by stage STAGE of this recipe (its ``final/``, a
  ``num_labels = 1`` sequence classifier). It shares the run's tokenizer, so it scores the token ids
  directly (prompt + completion, right-padded).
- ``{model: PATH_OR_HUB_ID}``: an existing reward model with its own tokenizer (e.g.
  ``OpenAssistant/reward-model-deberta-v3-large-v2``). The rollout is decoded to text and re-tokenized:
  with the reward model's chat template when it has one, else as a (prompt, completion) text pair.
  Never ``trust_remote_code``; safetensors weights only.
- ``{function: "module:function"}``: Python code, called as ``function(prompts=..., completions=...)``
  with ``prompts: list[list[{role, content}]]`` and ``completions: list[str]``, returning one number per
  completion; a function that takes an ``answer`` argument (or ``**kwargs``, as TRL's reward functions
  do) also gets ``answer: list[str]``, the rows' reference answers. Only with ``--allow-code``: a
  shared recipe must never run code on its own.
- ``{builtin: NAME, ...}``: rule-based rewards that run no recipe code:
    - ``token_fraction`` with ``token: STR`` (one token of the run tokenizer): the fraction of the
      completion's tokens that are that token;
    - ``contains`` with ``text: STR``: 1.0 when the decoded completion contains ``text``, else 0.0;
    - ``length`` with ``target: INT``: ``-|n - target| / target`` for a completion of ``n`` tokens;
    - ``exact_answer``: 1.0 when the completion's final answer (:func:`extract_answer`) equals the
      row's reference ``answer`` exactly, else 0.0 (also 0.0 for a row without an answer).
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llmlab.layout import StageLayout
from llmlab.recipe.semantic import REWARD_BUILTIN_KEYS
from llmlab.specs import typed_section
from llmlab.stage_params import RewardSpec

#: builtin reward -> the key it needs (None: none); validate checks recipes against the same table
BUILTIN_KEYS = REWARD_BUILTIN_KEYS
BUILTINS = tuple(BUILTIN_KEYS)
SOURCE_KEYS = ("from", "model", "function", "builtin")


class RewardConfigError(ValueError):
    """A ``reward:`` entry that cannot be used (names the recipe key)."""


@dataclass
class Rollout:
    """What a reward source sees: ``N`` completions and their prompts.

    Attributes:
        prompt_ids, prompt_mask: ``[N, P]`` left-padded.
        completion_ids, completion_mask: ``[N, C]`` right-padded (mask includes EOS).
        prompts: ``N`` message lists.
        completions: ``N`` decoded completion strings (special tokens skipped).
        answers: ``N`` reference answers (``""`` where a row has none); empty when the data has no
            answer column at all.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompts: list
    completions: list[str]
    answers: list[str] = field(default_factory=list)


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(text: str) -> str:
    """The final answer written in ``text``, for an exact comparison.

    Rules, first match wins: the content of the last ``<answer>…</answer>`` (DeepSeek-R1-Zero's
    format); the content of the last ``\\boxed{…}`` (MATH); the text after the last ``####``
    (GSM8K); else the whole text. The result is stripped of surrounding whitespace and of one
    trailing full stop. Nothing else is normalised: ``"81"`` and ``"81.0"`` or ``" 081"`` differ.
    Applied to completions and to reference answers alike (so a GSM8K reference "… #### 72" is 72).
    """
    tags = _ANSWER_TAG.findall(text)
    if tags:
        out = tags[-1]
    else:
        boxed = _BOXED.findall(text)
        if boxed:
            out = boxed[-1]
        elif "####" in text:
            out = text.rsplit("####", 1)[1]
        else:
            out = text
    out = out.strip()
    return out[:-1].rstrip() if out.endswith(".") else out


def exact_answer_rewards(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 where ``extract_answer(completion) == extract_answer(answer)`` and the answer is not
    empty, else 0.0.

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} reference answers")
    out = []
    for c, a in zip(completions, answers):
        ref = extract_answer(a or "")
        out.append(float(bool(ref) and extract_answer(c) == ref))
    return out


#: the source fields of a :class:`~llmlab.stage_params.RewardSpec`, by recipe key
_SOURCE_FIELDS = {"from": "from_stage", "model": "model", "function": "function", "builtin": "builtin"}


def reward_specs(specs) -> tuple[RewardSpec, ...]:
    """A ``reward:`` list as typed entries (a stage plan's ``params.reward`` as it is; dict entries,
    resolved or bare, take the schema's defaults); None or empty: ()."""
    return tuple(s if isinstance(s, RewardSpec) else typed_section(RewardSpec, s) for s in (specs or ()))


def check_reward_specs(specs, stage_name: str, allow_code: bool) -> None:
    """Validate a ``reward:`` list (typed entries or dicts, :func:`reward_specs`) without loading
    anything (call this before training starts).

    Raises:
        RewardConfigError: an empty list, an entry with zero or several sources, an unknown builtin,
            or a Python function without ``--allow-code``.
    """
    where = f"stages.{stage_name}.reward"
    specs = reward_specs(specs)
    if not specs:
        raise RewardConfigError(f"{where}: an online-RL stage needs at least one reward source "
                                "({from: STAGE}, {model: PATH}, {builtin: NAME} or {function: module:function})")
    for i, spec in enumerate(specs):
        keys = [k for k in SOURCE_KEYS if getattr(spec, _SOURCE_FIELDS[k]) is not None]
        if len(keys) != 1:
            raise RewardConfigError(f"{where}[{i}]: give exactly one of {', '.join(SOURCE_KEYS)} (got {keys or 'none'})")
        if spec.function is not None:
            target = spec.function
            if not allow_code:
                raise RewardConfigError(
                    f"{where}[{i}].function: the recipe names Python code ({target!r}) to run as a reward "
                    "function. A shared recipe must not run code on its own: if you trust this recipe, "
                    "pass --allow-code (llmlab run --allow-code ...).")
            if not isinstance(target, str) or ":" not in target:
                raise RewardConfigError(f"{where}[{i}].function: expected 'module:function', got {target!r}")
        if spec.builtin is not None:
            if spec.builtin not in BUILTINS:
                raise RewardConfigError(f"{where}[{i}].builtin: {spec.builtin!r} is not one of {', '.join(BUILTINS)}")
            need = BUILTIN_KEYS[spec.builtin]
            if need is not None and getattr(spec, need) is None:
                raise RewardConfigError(f"{where}[{i}]: builtin {spec.builtin} needs the key {need!r}")


def _pack_right(r: Rollout, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt (left-padded) + completion (right-padded) -> one right-padded sequence per row."""
    rows = []
    for i in range(r.prompt_ids.shape[0]):
        p = r.prompt_ids[i][r.prompt_mask[i].bool()]
        c = r.completion_ids[i][r.completion_mask[i].bool()]
        rows.append(torch.cat([p, c]))
    T = max(len(x) for x in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long, device=r.prompt_ids.device)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(rows):
        ids[i, :len(x)] = x
        mask[i, :len(x)] = 1
    return ids, mask


def _prompt_text(messages: list) -> str:
    return "\n".join(m.get("content", "") for m in messages) if isinstance(messages, list) else str(messages)


class _BuiltinReward:
    def __init__(self, spec: RewardSpec, tokenizer, where: str):
        self.name = spec.builtin
        self.tokenizer = tokenizer
        if self.name == "token_fraction":
            ids = tokenizer.encode(spec.token, add_special_tokens=False)
            if len(ids) != 1:
                raise RewardConfigError(f"{where}.token: {spec.token!r} is {len(ids)} tokens of the run's "
                                        "tokenizer; token_fraction needs exactly one")
            self.token_id = ids[0]
        elif self.name == "contains":
            self.text = str(spec.text)
        elif self.name == "length":
            self.target = max(int(spec.target), 1)

    def __call__(self, r: Rollout) -> torch.Tensor:
        m = r.completion_mask.float()
        n = m.sum(-1)
        if self.name == "token_fraction":
            hits = ((r.completion_ids == self.token_id).float() * m).sum(-1)
            return (hits / n.clamp(min=1)).cpu()
        if self.name == "contains":
            return torch.tensor([float(self.text in c) for c in r.completions])
        if self.name == "exact_answer":
            answers = r.answers or [""] * len(r.completions)
            return torch.tensor(exact_answer_rewards(r.completions, answers))
        return (-(n - self.target).abs() / self.target).cpu()


class _StageRewardModel:
    """A reward model trained in this recipe: same tokenizer, scores the ids directly."""

    def __init__(self, path: Path, pad_token_id: int, device, allow_code: bool):
        from llmlab.models.build import load_reward_model

        self.model = load_reward_model(path, allow_code=allow_code, pad_token_id=pad_token_id).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = pad_token_id
        self.pad = pad_token_id

    @torch.no_grad()
    def __call__(self, r: Rollout) -> torch.Tensor:
        from llmlab.models.padfree import reward_scores

        ids, mask = _pack_right(r, self.pad)
        return reward_scores(self.model, ids, mask).cpu()


class _ExternalRewardModel:
    """A reward model with its own tokenizer: decode, then re-tokenize."""

    def __init__(self, name: str, device, revision: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=False)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            name, revision=revision, trust_remote_code=False, use_safetensors=True).to(device).eval()
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device

    @torch.no_grad()
    def __call__(self, r: Rollout) -> torch.Tensor:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template(list(p) + [{"role": "assistant", "content": c}], tokenize=False)
                     for p, c in zip(r.prompts, r.completions)]
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True, add_special_tokens=False)
        else:
            enc = tok([_prompt_text(p) for p in r.prompts], list(r.completions), return_tensors="pt",
                      padding=True, truncation=True)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        return self.model(**enc).logits[:, 0].float().cpu()


class _FunctionReward:
    def __init__(self, target: str, where: str):
        module, _, fn = target.partition(":")
        try:
            self.fn: Callable = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise RewardConfigError(f"{where}.function: cannot import {target!r}: {e}") from e
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature
            params = []
        self.takes_answer = any(p.name == "answer" or p.kind is p.VAR_KEYWORD for p in params)

    def __call__(self, r: Rollout) -> torch.Tensor:
        extra = {"answer": list(r.answers or [""] * len(r.completions))} if self.takes_answer else {}
        out = self.fn(prompts=r.prompts, completions=r.completions, **extra)
        return torch.as_tensor([float(x) for x in out], dtype=torch.float32)


class RewardFunction:
    """The weighted sum of a stage's reward sources: ``__call__(rollout) -> [N]`` float32 on CPU.

    Also exposes ``components(rollout) -> dict[str, [N]]`` for per-source logging.
    """

    def __init__(self, specs, ctx):
        specs = reward_specs(specs)
        check_reward_specs(specs, ctx.name, ctx.allow_code)
        tok = ctx.tokenizer
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        self.tokenizer = tok
        self.sources: list[tuple[str, float, Callable]] = []
        for i, spec in enumerate(specs):  # checked above: exactly one source
            where = f"stages.{ctx.name}.reward[{i}]"
            weight = float(spec.weight)
            if spec.builtin is not None:
                src, label = _BuiltinReward(spec, tok, where), f"builtin:{spec.builtin}"
            elif spec.from_stage is not None:
                name = spec.from_stage
                if name not in ctx.stage_paths:
                    raise RewardConfigError(f"{where}.from: no stage named {name!r}")
                path = StageLayout(ctx.stage_paths[name]).final
                if not path.exists():
                    raise RewardConfigError(f"{where}.from: {path} does not exist (stage {name!r} has not finished)")
                src, label = _StageRewardModel(path, pad, ctx.device, ctx.allow_code), f"from:{name}"
            elif spec.model is not None:
                src, label = _ExternalRewardModel(spec.model, ctx.device, spec.revision), f"model:{spec.model}"
            else:
                src, label = _FunctionReward(spec.function, where), f"function:{spec.function}"
            self.sources.append((label, weight, src))

    def decode(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
        if self.tokenizer is None:
            return ["" for _ in range(completion_ids.shape[0])]
        return [self.tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                for ids, m in zip(completion_ids, completion_mask)]

    def components(self, r: Rollout) -> dict[str, torch.Tensor]:
        return {label: src(r).float() for label, _, src in self.sources}

    def __call__(self, r: Rollout) -> torch.Tensor:
        total = None
        for label, weight, src in self.sources:
            v = src(r).float() * weight
            if v.shape[0] != r.completion_ids.shape[0]:
                raise ValueError(f"reward source {label} returned {v.shape[0]} values for "
                                 f"{r.completion_ids.shape[0]} completions")
            total = v if total is None else total + v
        return total
