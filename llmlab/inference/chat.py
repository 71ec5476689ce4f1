"""The interactive terminal chat behind ``llmlab chat``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from llmlab.inference.generation import (
    GenerationSettings,
    PromptTooLongError,
    context_limit,
    default_max_new_tokens,
    encode_prompt,
    fit_conversation,
    generate_ids,
    turn_starts,
)

HELP = "Commands: /reset clears the conversation, /exit (or Ctrl+D, Ctrl+C) quits, /help shows this."


def _dim(out: TextIO, text: str) -> str:
    """``text`` dimmed (ANSI faint) when ``out`` is a terminal, as is otherwise."""
    isatty = getattr(out, "isatty", None)
    return f"\x1b[2m{text}\x1b[0m" if isatty is not None and isatty() else text


def chat_prompt(tokenizer: Any, history: list[dict], text: str, system: str | None, limit: int | None,
                max_new: int | None) -> tuple[list[int], list[dict]]:
    """Prompt ids for the next turn of a chat and the conversation they render.

    The conversation is ``history`` plus ``text`` as a new user message, rendered by the chat template
    with the generation prompt (:func:`~llmlab.inference.generation.fit_conversation`); when it
    outgrows the ``limit``-token context, its oldest whole turns are dropped so that a reply of
    ``max_new`` tokens (default :func:`default_max_new_tokens`, at most half the context) still fits.

    Returns:
        ``(ids, kept)``: ``kept`` ends with the new user message; ``history`` is not changed.
    """
    reserve = max_new if max_new is not None else default_max_new_tokens(limit)
    if limit is not None:
        reserve = min(reserve, limit // 2)
    return fit_conversation(tokenizer, history + [{"role": "user", "content": text}], limit, reserve, system=system)


def run_chat(model: Any, tokenizer: Any, is_chat: bool, settings: GenerationSettings, system: str | None = None,
             read: Callable[[str], str] = input, out: TextIO | None = None, banner: str | None = None) -> int:
    """Run the chat loop until /exit, end of input or Ctrl+C; returns the exit code (0).

    A chat model keeps the conversation and renders all of it with the chat template each turn
    (:func:`chat_prompt`; messages are stored stripped of surrounding whitespace, as the SFT data
    is); when it outgrows the context the oldest whole turns are dropped, and a dim line says so the
    first time. A message too long to answer is refused and leaves the conversation as it was. A
    base model continues each line as plain text (no history). The reply is written to ``out`` piece
    by piece as tokens are generated. Settings use ``settings.seed + turn`` per turn when a seed is
    given, so a scripted session is reproducible.
    """
    out = out or sys.stdout
    try:  # line editing and history when the platform has readline
        import readline  # noqa: F401
    except ImportError:
        pass

    def write(s: str) -> None:
        out.write(s)
        out.flush()

    if banner:
        write(banner + "\n")
    mode = "chat (chat template, history kept)" if is_chat else "plain continuation (base model, no history)"
    write(f"Mode: {mode}. {HELP}\n")
    history: list[dict] = []
    limit = context_limit(model)
    turn, told = 0, False
    try:
        while True:
            try:
                text = read(">>> ").strip()
            except EOFError:
                write("\n")
                break
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                break
            if text == "/reset":
                history.clear()
                turn, told = 0, False  # a fresh conversation replays like a new session
                write("(conversation cleared)\n")
                continue
            if text == "/help":
                write(HELP + "\n")
                continue
            if text.startswith("/") and " " not in text:
                write(f"unknown command {text}. {HELP}\n")
                continue
            s = settings if settings.seed is None else settings.replace(seed=settings.seed + turn)
            turn += 1
            if is_chat:
                ids, kept = chat_prompt(tokenizer, history, text, system, limit, s.max_new_tokens)
            else:
                ids = encode_prompt(tokenizer, text, False)
                write(text)
            try:
                result = generate_ids(model, tokenizer, ids, s, is_chat, on_text=write)
            except PromptTooLongError as e:
                write(f"\n(not sent: {e})\n")
                continue
            write("\n" if result.finish_reason == "stop" else " [max tokens]\n")
            if result.note:
                write(f"({result.note})\n")
            if is_chat:
                dropped = len(turn_starts(history)) + 1 - len(turn_starts(kept))
                if dropped and not told:
                    told = True
                    write(_dim(out, f"(the conversation outgrew the model's {limit}-token context: its oldest "
                                    f"turns are dropped from now on, {dropped} so far)") + "\n")
                history[:] = kept + [{"role": "assistant", "content": result.text.strip()}]
    except KeyboardInterrupt:
        write("\n")
    write("Bye.\n")
    return 0
