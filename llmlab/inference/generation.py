"""Text generation shared by chat, generate, eval and serve: prompt rendering, sampling settings,
seeded and streamed generation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from llmlab.inference.loading import CHATML_END

Message = dict  # {"role": ..., "content": ...}


@dataclass
class GenerationSettings:
    """Sampling settings. ``temperature <= 0`` means greedy decoding; ``top_k = 0`` and
    ``top_p = 1`` disable those filters; ``seed`` makes sampling reproducible."""

    max_new_tokens: int = 256
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

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate``."""
        kw: dict[str, Any] = {"max_new_tokens": int(self.max_new_tokens)}
        if self.temperature is None or self.temperature <= 0:
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
    (``"stop"``: a stop token; ``"length"``: max_new_tokens) and token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def stop_token_ids(tokenizer: Any, is_chat: bool) -> list[int]:
    """Token ids that end a reply: EOS, and ``<|im_end|>`` for chat models."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if is_chat:
        end = tokenizer.convert_tokens_to_ids(CHATML_END)
        if isinstance(end, int) and end != tokenizer.unk_token_id and end not in ids:
            ids.append(end)
    return ids


def messages_as_text(messages: list[Message]) -> str:
    """Plain-text rendering of a conversation for base (non-chat) models: the contents, one per line."""
    return "\n".join(str(m.get("content", "")) for m in messages)


def encode_prompt(tokenizer: Any, prompt: str | list[Message], is_chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a prompt.

    A chat model gets its chat template with the generation prompt (a string becomes one user
    message; ``system`` is prepended when given and the conversation has no system message). A base
    model gets plain text: a string as is, a conversation as :func:`messages_as_text`.
    """
    if is_chat:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system and not any(m.get("role") == "system" for m in msgs):
            msgs = [{"role": "system", "content": system}] + msgs
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt if isinstance(prompt, str) else messages_as_text(prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_limit(model: Any) -> int | None:
    """The model's maximum sequence length, when its config declares one."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class CallbackStreamer:
    """A ``generate`` streamer that calls ``callback(text_piece)`` as each new token is decoded.

    The pieces concatenate to the decoded completion (special tokens skipped); text that ends in an
    incomplete UTF-8 sequence is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Any, callback: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.callback = callback
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Receive new token ids from ``generate`` (the first call carries the prompt)."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        """Flush what is left when generation ends."""
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            piece, self.sent = text[self.sent:], len(text)
            self.callback(piece)


@torch.no_grad()
def generate_ids(model: Any, tokenizer: Any, prompt_ids: list[int], settings: GenerationSettings,
                 is_chat: bool, on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Generate one completion for ``prompt_ids``.

    With ``settings.seed`` set, sampling runs under a forked RNG seeded with it, so the result does not
    depend on (and does not disturb) the global RNG. The prompt is cut from the left when prompt plus
    ``max_new_tokens`` would exceed the model's context. ``on_text`` receives text pieces as they are
    generated.
    """
    limit = context_limit(model)
    if limit is not None:
        keep = max(limit - int(settings.max_new_tokens), 1)
        prompt_ids = prompt_ids[-keep:]
        max_new = min(int(settings.max_new_tokens), limit - len(prompt_ids))
    else:
        max_new = int(settings.max_new_tokens)
    if not prompt_ids:  # nothing to condition on: start from BOS/EOS
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        prompt_ids = [int(start)]
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    stops = stop_token_ids(tokenizer, is_chat)
    kw = settings.replace(max_new_tokens=max_new).generate_kwargs()
    kw.update(attention_mask=torch.ones_like(input_ids), eos_token_id=stops or None,
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0])
    if on_text is not None:
        kw["streamer"] = CallbackStreamer(tokenizer, on_text)

    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=settings.seed is not None):
        if settings.seed is not None:
            torch.manual_seed(int(settings.seed))
        out = model.generate(input_ids, **kw)
    new = out[0, input_ids.shape[1]:].tolist()
    finish = "length"
    if new and new[-1] in stops:
        finish = "stop"
        new = new[:-1]
    # generate pads after a stop when batch size is 1 only if asked; strip trailing pads defensively
    text = tokenizer.decode(new, skip_special_tokens=True)
    return GenerationResult(text=text, token_ids=new, finish_reason=finish, prompt_tokens=len(prompt_ids),
                            completion_tokens=len(new) + (1 if finish == "stop" else 0))


def generate_text(model: Any, tokenizer: Any, prompt: str | list[Message], settings: GenerationSettings,
                  is_chat: bool, system: str | None = None,
                  on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Render ``prompt`` (see :func:`encode_prompt`) and generate one completion."""
    ids = encode_prompt(tokenizer, prompt, is_chat, system=system)
    return generate_ids(model, tokenizer, ids, settings, is_chat, on_text=on_text)
