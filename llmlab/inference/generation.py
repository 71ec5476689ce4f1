"""Text generation shared by chat, generate, eval and serve: prompt rendering, sampling settings,
seeded and streamed generation."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from llmlab.context import UNDECLARED_CONTEXT, context_limit  # noqa: F401 (re-exported)
from llmlab.inference.limits import GREEDY_BELOW
from llmlab.inference.loading import CHATML_END

Message = dict  # {"role": ..., "content": ...}


@dataclass
class GenerationSettings:
    """Sampling settings. A ``temperature`` below :data:`~llmlab.inference.limits.GREEDY_BELOW`
    (0 included) means greedy decoding; ``top_k = 0`` and
    ``top_p = 1`` disable those filters; ``seed`` makes sampling reproducible; ``max_new_tokens``
    None means :func:`default_max_new_tokens` of the model's context."""

    max_new_tokens: int | None = None  # None: default_max_new_tokens(the model's context)
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with the non-None ``changes`` applied."""
        d = asdict(self)
        d.update({k: v for k, v in changes.items() if v is not None})
        return GenerationSettings(**d)

    @property
    def greedy(self) -> bool:
        """Whether these settings decode greedily (temperature None or below ``GREEDY_BELOW``)."""
        return self.temperature is None or self.temperature < GREEDY_BELOW

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate``."""
        kw: dict[str, Any] = {"max_new_tokens": int(self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)}
        if self.greedy:
            kw["do_sample"] = False
            kw.update(temperature=None, top_k=None, top_p=None)
        else:
            kw.update(do_sample=True, temperature=float(self.temperature),
                      top_k=int(self.top_k) if self.top_k and self.top_k > 0 else None,
                      top_p=float(self.top_p) if self.top_p is not None and self.top_p < 1.0 else None)
        if self.repetition_penalty and self.repetition_penalty != 1.0:
            kw["repetition_penalty"] = float(self.repetition_penalty)
        return kw


@dataclass
class GenerationResult:
    """One completion: its text (special tokens removed), token ids, why it stopped
    (``"stop"``: a stop token or stop string; ``"length"``: max_new_tokens), token counts, and a
    ``note`` when the requested length was capped to fit the context."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    note: str | None = None


def stop_token_ids(tokenizer: Any, is_chat: bool) -> list[int]:
    """Token ids that end a reply: EOS, and for chat models ``<|im_end|>`` and the end-of-turn
    tokens their chat template writes (:func:`llmlab.chat_templates.end_of_turn_ids`)."""
    from llmlab.chat_templates import end_of_turn_ids

    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if is_chat:
        end = tokenizer.convert_tokens_to_ids(CHATML_END)
        for i in ([end] if isinstance(end, int) and end != tokenizer.unk_token_id else []) + end_of_turn_ids(tokenizer):
            if i not in ids:
                ids.append(i)
    return ids


def messages_as_text(messages: list[Message]) -> str:
    """Plain-text rendering of a conversation for base (non-chat) models: the contents, one per line."""
    return "\n".join(str(m.get("content", "")) for m in messages)


def encode_prompt(tokenizer: Any, prompt: str | list[Message], is_chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a prompt.

    A chat model gets its chat template with the generation prompt (a string becomes one user
    message; ``system`` is prepended when given and the conversation has no system message); text of
    special tokens inside a message (``"<|im_end|>"``) is tokenised as plain characters, so a message
    cannot forge turns (:func:`_encode_chat_escaped`). A base model gets plain text, tokenised as is
    (special-token text included): a string as is, a conversation as :func:`messages_as_text`.
    """
    if is_chat:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system and not any(m.get("role") == "system" for m in msgs):
            msgs = [{"role": "system", "content": system}] + msgs
        if any(_has_special_text(tokenizer, str(m.get("content", ""))) for m in msgs):
            return _encode_chat_escaped(tokenizer, msgs)
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt if isinstance(prompt, str) else messages_as_text(prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_texts(tokenizer: Any) -> list[str]:
    """The strings the tokenizer turns into its special tokens (``<|im_end|>``, EOS...)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {t.content for t in decoder.values() if getattr(t, "special", False) and t.content}
    return sorted(texts | {t for t in getattr(tokenizer, "all_special_tokens", []) if t})


def _has_special_text(tokenizer: Any, text: str) -> bool:
    return any(t in text for t in _special_texts(tokenizer))


_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use placeholders for message contents


def _encode_chat_escaped(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Chat-template ids of ``messages`` whose contents are tokenised as plain text: a content
    ``"<|im_end|>"`` becomes the tokens of those characters, never the special token (no forged turns).

    The template is rendered with a placeholder per content; the template's own text is tokenised as
    usual (its special tokens kept) and each content with ``split_special_tokens=True``. Used only for
    conversations that contain special-token text, so every other prompt keeps the training
    tokenisation of the whole rendered text.
    """
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    for k, piece in enumerate(_MARK.split(text)):
        if k % 2:  # a placeholder: the content of message int(piece)
            content = str(messages[int(piece)].get("content", ""))
            ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return list(ids)


def turn_starts(messages: list[Message]) -> list[int]:
    """Indices where the turns of a conversation begin, after its leading system messages.

    A turn is a user message and every message after it up to the next user message (the
    assistant's reply, tool messages); messages before the first user message count as one turn.
    ``[]`` when there is nothing but system messages.
    """
    lead = 0
    while lead < len(messages) and messages[lead].get("role") == "system":
        lead += 1
    return [i for i in range(lead, len(messages)) if i == lead or messages[i].get("role") == "user"]


def fit_conversation(tokenizer: Any, messages: list[Message], limit: int | None, reserve: int,
                     system: str | None = None) -> tuple[list[int], list[Message]]:
    """Chat-template prompt ids of a conversation, its oldest whole turns dropped until the prompt
    leaves ``reserve`` tokens of the ``limit``-token context for the reply.

    Turns are cut whole (see :func:`turn_starts`), oldest first; the leading system messages (and
    ``system``, rendered as :func:`encode_prompt` does) and the newest turn are always kept, so the
    prompt never starts mid-turn (a left cut of the token ids would start it inside a message, or
    without its ``<|im_start|>``, a format SFT never trained on). The rendering is
    :func:`encode_prompt`'s: token for token the SFT training format of the same messages up to the
    generation prompt.

    Args:
        messages: the conversation, ending with the user message to answer.
        limit: the model's context in tokens (None: no limit, nothing is dropped).
        reserve: tokens to leave for the reply.
        system: a system prompt added when the conversation has none.

    Returns:
        ``(ids, kept)``: the prompt ids and the messages they render (a tail of ``messages`` after its
        system messages, which stay in front). If the newest turn alone leaves less than ``reserve``
        it is returned alone, and :func:`completion_budget` caps the reply or refuses the prompt.

    Cost: O(log turns) renderings (binary search on the number of turns dropped; a prompt never
    grows when a turn is dropped).
    """
    starts = turn_starts(messages)
    lead = messages[: starts[0]] if starts else list(messages)

    def render(k: int) -> tuple[list[int], list[Message]]:
        kept = lead + messages[starts[k]:] if starts else list(messages)
        return encode_prompt(tokenizer, kept, True, system=system), kept

    ids, kept = render(0)
    if limit is None or len(ids) + reserve <= limit or len(starts) <= 1:
        return ids, kept
    # the fewest turns to drop that fit lies in [lo, hi]; hi = all but the newest turn is the fallback
    lo, hi = 1, len(starts) - 1
    found = {}
    while lo < hi:
        mid = (lo + hi) // 2
        found[mid] = render(mid)
        if len(found[mid][0]) + reserve <= limit:
            hi = mid
        else:
            lo = mid + 1
    return found[hi] if hi in found else render(hi)


#: the reply length when nobody asks for one, for a model whose context is large enough
DEFAULT_MAX_NEW_TOKENS = 256


class PromptTooLongError(ValueError):
    """The prompt leaves no room for a reply in the model's context."""

    def __init__(self, prompt_tokens: int, limit: int):
        super().__init__(f"the prompt is {prompt_tokens} tokens and the model's context holds {limit}: "
                         "no room for a reply (shorten the prompt)")
        self.prompt_tokens, self.limit = prompt_tokens, limit


def default_max_new_tokens(limit: int | None) -> int:
    """The reply length used when none is asked for: 256 tokens, or a quarter of a smaller context
    (at least 16), so a 256-token model keeps three quarters of its context for the prompt."""
    if limit is None:
        return DEFAULT_MAX_NEW_TOKENS
    return max(16, min(DEFAULT_MAX_NEW_TOKENS, limit // 4))


def completion_budget(prompt_tokens: int, requested: int | None, limit: int | None) -> tuple[int, str | None]:
    """How many tokens a reply may have: ``requested`` (default :func:`default_max_new_tokens`) capped
    to what the context leaves after the prompt. The prompt is never cut.

    Returns:
        ``(max_new_tokens, note)``; ``note`` says so when an explicitly requested length was lowered.

    Raises:
        PromptTooLongError: the prompt alone fills the context.
    """
    want = int(requested) if requested is not None else default_max_new_tokens(limit)
    if limit is None:
        return want, None
    room = limit - prompt_tokens
    if room < 1:
        raise PromptTooLongError(prompt_tokens, limit)
    if want <= room:
        return want, None
    note = (f"reply capped at {room} tokens (asked for {want}): the context holds {limit} tokens and the "
            f"prompt uses {prompt_tokens}") if requested is not None else None
    return room, note


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that could begin a stop string (not safe to show yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-k:]):
                best = k
                break
    return best


class _Row:
    """Bookkeeping of one row of a batched ``generate``: its own length cap, stop token ids and stop
    strings, streaming of its text (incomplete UTF-8 and possible stop-string starts held back), and
    ``cancelled``, polled each step: once it returns True the row ends (``finish_reason "cancelled"``)."""

    def __init__(self, tokenizer: Any, prompt_len: int, max_new: int, stop_ids: list[int], stop: list[str],
                 on_text: Callable[[str], None] | None, cancelled: Callable[[], bool] | None = None):
        self.tokenizer, self.prompt_len, self.max_new = tokenizer, prompt_len, max_new
        self.stop_ids, self.stop, self.on_text = stop_ids, [x for x in stop if x], on_text
        self.cancelled = cancelled
        self.ids: list[int] = []
        self.text, self.sent, self.finish = "", 0, None

    def step(self, new_ids: list[int]) -> bool:
        """Take the row's generated ids so far; True once the row is finished."""
        if self.finish is not None:
            return True
        self.ids = new_ids
        if self.cancelled is not None and self.cancelled():
            self.finish = "cancelled"
            return True
        if new_ids and new_ids[-1] in self.stop_ids:
            self.finish = "stop"
        elif len(new_ids) >= self.max_new:
            self.finish = "length"
        if self.stop or self.on_text is not None:
            text = self._decode()
            cut = min((i for i in (text.find(x) for x in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, self.finish = text[:cut], "stop"
            self.text = text
            self._stream(final=self.finish is not None)
        return self.finish is not None

    def _decode(self) -> str:
        ids = self.ids[:-1] if self.ids and self.ids[-1] in self.stop_ids else self.ids
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _stream(self, final: bool) -> None:
        if self.on_text is None:
            return
        text = self.text
        if not final:
            if text.endswith("\ufffd"):
                return
            text = text[: len(text) - _held_back(text, self.stop)]
        if len(text) > self.sent:
            piece, self.sent = text[self.sent:], len(text)
            self.on_text(piece)

    def result(self) -> GenerationResult:
        finish = self.finish or "length"
        if not self.stop and self.on_text is None:
            self.text = self._decode()
        ids = self.ids[:-1] if finish == "stop" and self.ids and self.ids[-1] in self.stop_ids else self.ids
        return GenerationResult(text=self.text, token_ids=ids, finish_reason=finish,
                                prompt_tokens=self.prompt_len, completion_tokens=len(self.ids))


class _RowsCriteria(StoppingCriteria):
    """A ``generate`` stopping criterion that finishes each row on its own terms (see :class:`_Row`)."""

    def __init__(self, rows: list[_Row], prompt_width: int):
        self.rows, self.width = rows, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.width:].tolist()
        done = [row.step(ids) for row, ids in zip(self.rows, new)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, prompts: list[list[int]], settings: GenerationSettings,
                   is_chat: bool, max_new: list[int] | None = None, stop: list[list[str]] | None = None,
                   on_text: list[Callable[[str], None] | None] | None = None,
                   cancelled: list[Callable[[], bool] | None] | None = None) -> list[GenerationResult]:
    """Generate one completion per prompt in one left-padded ``model.generate`` call.

    Args:
        prompts: token ids, one list per row (not cut: see :func:`completion_budget`).
        settings: sampling settings shared by the rows; with ``settings.seed`` the batch samples under a
            forked RNG seeded with it (the global RNG is neither read nor advanced).
        max_new: each row's length cap (default ``settings.max_new_tokens``).
        stop: each row's stop strings; the text ends before the first one (``finish_reason "stop"``).
        on_text: per row, a callback receiving text pieces as they are generated; the pieces
            concatenate to the row's final text.
        cancelled: per row, a check polled after each generated token; a row whose check returns True
            ends there (``finish_reason "cancelled"``), and ``generate`` returns once every row has ended
            (the server cancels the requests of clients that went away).

    Greedy rows are the same as each prompt generated alone (left padding with position ids from the
    attention mask; tested in tests/inference/test_cache_contract.py).
    """
    n = len(prompts)
    max_new = list(max_new) if max_new is not None else [int(settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)] * n
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompts = [list(p) if p else [int(start)] for p in prompts]  # nothing to condition on: BOS/EOS
    stops = stop_token_ids(tokenizer, is_chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    input_ids = torch.full((n, width), int(pad), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    rows = [_Row(tokenizer, len(p), m, stops, (stop or [[]] * n)[r], (on_text or [None] * n)[r],
                 (cancelled or [None] * n)[r]) for r, (p, m) in enumerate(zip(prompts, max_new))]
    kw = settings.replace(max_new_tokens=max(max_new)).generate_kwargs()
    kw.update(attention_mask=mask.to(device), eos_token_id=stops or None, pad_token_id=int(pad),
              stopping_criteria=StoppingCriteriaList([_RowsCriteria(rows, width)]))
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=settings.seed is not None):
        if settings.seed is not None:
            torch.manual_seed(int(settings.seed))
        model.generate(input_ids.to(device), **kw)
    return [row.result() for row in rows]


def generate_ids(model: Any, tokenizer: Any, prompt_ids: list[int], settings: GenerationSettings,
                 is_chat: bool, on_text: Callable[[str], None] | None = None,
                 stop: list[str] | None = None) -> GenerationResult:
    """Generate one completion for ``prompt_ids`` (see :func:`generate_batch`).

    The reply length is ``settings.max_new_tokens`` (default: :func:`default_max_new_tokens`) capped
    to what the context leaves after the prompt; the result's ``note`` says so when a requested length
    was lowered. The prompt is never cut: :class:`PromptTooLongError` when it fills the context.
    """
    max_new, note = completion_budget(len(prompt_ids), settings.max_new_tokens, context_limit(model))
    r = generate_batch(model, tokenizer, [prompt_ids], settings, is_chat, max_new=[max_new],
                       stop=[stop or []], on_text=[on_text])[0]
    r.note = note
    return r


def generate_text(model: Any, tokenizer: Any, prompt: str | list[Message], settings: GenerationSettings,
                  is_chat: bool, system: str | None = None,
                  on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Render ``prompt`` (see :func:`encode_prompt`) and generate one completion."""
    ids = encode_prompt(tokenizer, prompt, is_chat, system=system)
    return generate_ids(model, tokenizer, ids, settings, is_chat, on_text=on_text)
