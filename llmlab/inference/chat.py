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
    generate_ids,
)

HELP = "Commands: /reset clears the conversation, /exit (or Ctrl+D, Ctrl+C) quits, /help shows this."


def _fit_history(tokenizer: Any, history: list[dict], system: str | None, limit: int | None,
                 max_new: int | None) -> tuple[list[int], int]:
    """Prompt ids of the conversation and how many of the oldest messages were dropped so that the
    prompt leaves room for a reply of ``max_new`` tokens (default: :func:`default_max_new_tokens`).
    The newest message is always kept (:class:`PromptTooLongError` later if it alone is too long)."""
    reserve = max_new if max_new is not None else default_max_new_tokens(limit)
    msgs = list(history)
    while True:
        ids = encode_prompt(tokenizer, msgs, True, system=system)
        if limit is None or len(ids) + min(reserve, limit // 2) <= limit or len(msgs) <= 1:
            return ids, len(history) - len(msgs)
        msgs = msgs[2:] if len(msgs) > 2 else msgs[1:]


def run_chat(model: Any, tokenizer: Any, is_chat: bool, settings: GenerationSettings, system: str | None = None,
             read: Callable[[str], str] = input, out: TextIO | None = None, banner: str | None = None) -> int:
    """Run the chat loop until /exit, end of input or Ctrl+C; returns the exit code (0).

    A chat model keeps the conversation and renders it with the chat template each turn; a base model
    continues each line as plain text (no history). The reply is written to ``out`` piece by piece as
    tokens are generated. Settings use ``settings.seed + turn`` per turn when a seed is given, so a
    scripted session is reproducible.
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
    turn = 0
    try:
        while True:
            try:
                line = read(">>> ")
            except EOFError:
                write("\n")
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                break
            if text == "/reset":
                history.clear()
                turn = 0  # a fresh conversation replays like a new session
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
                history.append({"role": "user", "content": line})
                ids, dropped = _fit_history(tokenizer, history, system, limit, s.max_new_tokens)
                if dropped:
                    del history[:dropped]
                    write(f"(the {dropped} oldest message(s) no longer fit the {limit}-token context; dropped)\n")
            else:
                ids = encode_prompt(tokenizer, line, False)
                write(line)
            try:
                result = generate_ids(model, tokenizer, ids, s, is_chat, on_text=write)
            except PromptTooLongError as e:
                write(f"\n(not sent: {e})\n")
                if is_chat:
                    history.pop()
                continue
            write("\n" if result.finish_reason == "stop" else " [max tokens]\n")
            if result.note:
                write(f"({result.note})\n")
            if is_chat:
                history.append({"role": "assistant", "content": result.text})
    except KeyboardInterrupt:
        write("\n")
    write("Bye.\n")
    return 0
