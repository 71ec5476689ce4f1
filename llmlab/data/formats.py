"""Format detection and normalisation to llmlab's canonical rows.

Canonical rows (docs/architecture.md, "Data contract"):

=============  ==============================================================================
kind           columns
=============  ==============================================================================
text           ``text: str``
conversation   ``messages: list[{role, content}]`` (system?, then user/assistant alternating,
               ending with an assistant turn)
preference     ``prompt``, ``chosen``, ``rejected``: ``list[{role, content}]``; the prompt ends
               with a user turn, chosen/rejected are the assistant continuation(s)
prompt         ``prompt: list[{role, content}]`` ending with a user turn; ``answer: str``, the
               reference answer a verifiable reward compares with (``""`` when there is none)
unpaired_      ``prompt`` (ending with a user turn) and ``completion`` (the assistant
               continuation): ``list[{role, content}]``; ``label: bool``, True for a desirable
preference     completion (KTO's unpaired preference data, TRL's ``prompt/completion/label``)
=============  ==============================================================================

Each normaliser takes one raw row (a dict) and returns a canonical row, or raises
:class:`BadRow` with a short description of the problem; the caller counts and drops bad rows.
"""

from __future__ import annotations

import re
from typing import Any, Callable

FORMATS = ("text", "messages", "sharegpt", "alpaca", "prompt_completion", "preference", "prompt",
           "unpaired_preference")

#: format -> canonical kind
KIND_OF_FORMAT = {
    "text": "text",
    "messages": "conversation",
    "sharegpt": "conversation",
    "alpaca": "conversation",
    "prompt_completion": "conversation",
    "preference": "preference",
    "prompt": "prompt",
    "unpaired_preference": "unpaired_preference",
}

#: canonical kind -> its columns
COLUMNS_OF_KIND = {
    "text": ("text",),
    "conversation": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt", "answer"),
    "unpaired_preference": ("prompt", "completion", "label"),
}

#: canonical columns that hold a string, and one that holds a bool (every other canonical column
#: holds a message list)
STRING_COLUMNS = ("text", "answer")
BOOL_COLUMNS = ("label",)

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "bot": "assistant", "chatgpt": "assistant", "model": "assistant",
                   "system": "system"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class BadRow(ValueError):
    """A raw row that cannot be normalised (missing field, empty content, wrong role order...)."""


def detect_format(columns: list[str] | tuple[str, ...], first_row: dict | None = None) -> str:
    """Guess a dataset's format from its column names (and, when ambiguous, its first row).

    Raises:
        ValueError: no known format fits the columns.
    """
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        conv = (first_row or {}).get("conversations")
        if isinstance(conv, list) and conv and isinstance(conv[0], dict) and "role" in conv[0]:
            return "messages"
        return "sharegpt"
    if "instruction" in cols and ({"output", "response"} & cols):
        return "alpaca"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired_preference"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    if "prompt" in cols:
        return "prompt"
    raise ValueError(f"cannot detect the format from the columns {sorted(cols)}; set `format:` "
                     f"(one of {', '.join(FORMATS)}) and, if needed, `columns:`")


def normaliser(fmt: str) -> Callable[[dict], dict]:
    """The function turning one raw row of format ``fmt`` into a canonical row.

    Raises:
        ValueError: unknown format.
    """
    try:
        return _NORMALISERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}") from None


# -- field checks --------------------------------------------------------------------------------

def _text(row: dict, key: str) -> str:
    if key not in row or row[key] is None:
        raise BadRow(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"{key!r} is {type(value).__name__}, not a string")
    if not value.strip():
        raise BadRow(f"empty {key!r}")
    return value


def _message(m: Any, key: str, i: int) -> dict:
    if not isinstance(m, dict):
        raise BadRow(f"{key}[{i}] is {type(m).__name__}, not a message")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise BadRow(f"{key}[{i}].role is {role!r}, not one of {ROLES}")
    if not isinstance(content, str):
        raise BadRow(f"{key}[{i}].content is {type(content).__name__}, not a string")
    if not content.strip():
        raise BadRow(f"{key}[{i}].content is empty")
    return {"role": role, "content": content}


def _messages(value: Any, key: str) -> list[dict]:
    if value is None:
        raise BadRow(f"missing field {key!r}")
    if not isinstance(value, list) or not value:
        raise BadRow(f"{key!r} is not a non-empty list of messages")
    return [_message(m, key, i) for i, m in enumerate(value)]


def check_order(msgs: list[dict], key: str, end: str) -> list[dict]:
    """Check the role order: optional leading system turn, then user/assistant alternating starting
    with user, ending with ``end`` ('assistant' or 'user').

    Raises:
        BadRow: the order is wrong.
    """
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not body:
        raise BadRow(f"{key!r} has no user turn")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise BadRow(f"{key!r}: turn {i + len(msgs) - len(body)} is {m['role']!r}, expected {want!r}")
    if body[-1]["role"] != end:
        raise BadRow(f"{key!r} ends with a {body[-1]['role']!r} turn, expected {end!r}")
    return msgs


def _as_messages(value: Any, key: str, role: str) -> list[dict]:
    """A string (one ``role`` turn) or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(f"empty {key!r}")
        return [{"role": role, "content": value}]
    return _messages(value, key)


def parse_hh(dialogue: str, key: str) -> list[dict]:
    """Parse an hh-rlhf dialogue ``"\\n\\nHuman: …\\n\\nAssistant: …"`` into messages.

    Raises:
        BadRow: the string has no ``Human:``/``Assistant:`` markers or an empty turn.
    """
    if not isinstance(dialogue, str):
        raise BadRow(f"{key!r} is {type(dialogue).__name__}, not a string")
    text = dialogue if dialogue.startswith("\n\n") else "\n\n" + dialogue.lstrip()
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise BadRow(f"{key!r} is not an hh-rlhf dialogue (no '\\n\\nHuman: ' / '\\n\\nAssistant: ')")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if not content:
            raise BadRow(f"{key!r}: empty {speaker} turn")
        msgs.append({"role": role, "content": content})
    return msgs


def _is_hh(value: Any) -> bool:
    return isinstance(value, str) and "\n\nAssistant:" in value and "Human:" in value


# -- normalisers ---------------------------------------------------------------------------------

def norm_text(row: dict) -> dict:
    """``{text}`` → ``{text}``. Raises BadRow: missing, non-string or blank text."""
    return {"text": _text(row, "text")}


def norm_messages(row: dict) -> dict:
    """``{messages | conversations: [{role, content}]}`` → ``{messages}``.

    Raises BadRow: a malformed message, an unknown role or a wrong role order.
    """
    key = "messages" if "messages" in row else "conversations"
    return {"messages": check_order(_messages(row.get(key), key), key, "assistant")}


def norm_sharegpt(row: dict) -> dict:
    """``{conversations: [{from, value}]}`` (human/gpt/system) → ``{messages}``.

    Raises BadRow: an unknown speaker, empty value or wrong turn order.
    """
    key = "conversations" if "conversations" in row else "messages"
    value = row.get(key)
    if not isinstance(value, list) or not value:
        raise BadRow(f"{key!r} is not a non-empty list of turns")
    msgs = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadRow(f"{key}[{i}] is not a turn")
        role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise BadRow(f"{key}[{i}].from is {turn.get('from')!r}, not human/gpt/system")
        msgs.append(_message({"role": role, "content": turn.get("value")}, key, i))
    return {"messages": check_order(msgs, key, "assistant")}


def norm_alpaca(row: dict) -> dict:
    """``{instruction, input?, output | response, system?}`` → ``{messages}`` (user = instruction,
    then a blank line and the input when there is one). Raises BadRow: missing instruction/output.
    """
    instruction = _text(row, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRow(f"'input' is {type(extra).__name__}, not a string")
    user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    out_key = "output" if row.get("output") is not None else "response"
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, out_key)}]
    if isinstance(row.get("system"), str) and row["system"].strip():
        msgs.insert(0, {"role": "system", "content": row["system"]})
    return {"messages": msgs}


def norm_prompt_completion(row: dict) -> dict:
    """``{prompt, completion}`` (strings or message lists) → ``{messages}``.

    Raises BadRow: a missing side or a wrong role order.
    """
    if row.get("prompt") is None:
        raise BadRow("missing field 'prompt'")
    if row.get("completion") is None:
        raise BadRow("missing field 'completion'")
    prompt = _as_messages(row["prompt"], "prompt", "user")
    completion = _as_messages(row["completion"], "completion", "assistant")
    return {"messages": check_order(prompt + completion, "prompt+completion", "assistant")}


def norm_preference(row: dict) -> dict:
    """``{prompt?, chosen, rejected}`` → ``{prompt, chosen, rejected}`` as message lists.

    chosen/rejected may be strings (one assistant turn), message lists (a prompt they repeat is
    stripped) or hh-rlhf dialogues (``"\\n\\nHuman: …\\n\\nAssistant: …"``); without a prompt the
    shared prefix of chosen and rejected up to its last user turn is the prompt.

    Raises BadRow: a missing side, no shared prompt, a completion that does not start with the
    assistant, or chosen == rejected.
    """
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise BadRow(f"missing field {key!r}")
    chosen_raw, rejected_raw = row["chosen"], row["rejected"]
    prompt_raw = row.get("prompt")
    if _is_hh(chosen_raw) or _is_hh(rejected_raw):
        chosen, rejected = parse_hh(chosen_raw, "chosen"), parse_hh(rejected_raw, "rejected")
        prompt = parse_hh(prompt_raw, "prompt") if _is_hh(prompt_raw) or (
            isinstance(prompt_raw, str) and "Human:" in prompt_raw) else None
    else:
        chosen = _as_messages(chosen_raw, "chosen", "assistant")
        rejected = _as_messages(rejected_raw, "rejected", "assistant")
        prompt = None if prompt_raw is None else _as_messages(prompt_raw, "prompt", "user")

    if prompt is not None:
        # chosen/rejected may repeat the prompt (whole dialogues): strip it.
        n = len(prompt)
        if chosen[:n] == prompt and len(chosen) > n:
            chosen = chosen[n:]
        if rejected[:n] == prompt and len(rejected) > n:
            rejected = rejected[n:]
    else:
        # hh-rlhf layout: the shared prefix of the two dialogues, up to its last user turn.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] != "user":
            n -= 1
        if n == 0:
            raise BadRow("no prompt column and chosen/rejected share no prompt")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    check_order(prompt, "prompt", "user")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs:
            raise BadRow(f"{key!r} has no completion after the prompt")
        if msgs[0]["role"] != "assistant":
            raise BadRow(f"{key!r} starts with a {msgs[0]['role']!r} turn, expected 'assistant'")
        check_order([{"role": "user", "content": "."}] + msgs, key, "assistant")
    if chosen == rejected:
        raise BadRow("chosen and rejected are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def norm_unpaired_preference(row: dict) -> dict:
    """``{prompt, completion, label}`` (prompt / completion: strings or message lists; label: a
    bool, or 0 / 1) → ``{prompt, completion, label}`` with message lists and a bool.

    Raises BadRow: a missing field, a wrong role order, or a label that is not a bool or 0 / 1.
    """
    for key in ("prompt", "completion", "label"):
        if row.get(key) is None:
            raise BadRow(f"missing field {key!r}")
    label = row["label"]
    if not isinstance(label, bool) and label not in (0, 1):
        raise BadRow(f"'label' is {label!r}, not true/false (desirable or not)")
    prompt = check_order(_as_messages(row["prompt"], "prompt", "user"), "prompt", "user")
    completion = _as_messages(row["completion"], "completion", "assistant")
    if completion[0]["role"] != "assistant":
        raise BadRow(f"'completion' starts with a {completion[0]['role']!r} turn, expected 'assistant'")
    check_order([{"role": "user", "content": "."}] + completion, "completion", "assistant")
    return {"prompt": prompt, "completion": completion, "label": bool(label)}


def norm_prompt(row: dict) -> dict:
    """``{prompt, answer?}`` (prompt: a string or messages ending with a user turn; answer: the
    reference answer, a string or a number) → ``{prompt, answer}`` (answer ``""`` when absent).

    Raises BadRow: missing or empty prompt, a prompt that does not end with the user, or an answer
    that is neither a string nor a number.
    """
    if row.get("prompt") is None:
        raise BadRow("missing field 'prompt'")
    prompt = check_order(_as_messages(row["prompt"], "prompt", "user"), "prompt", "user")
    return {"prompt": prompt, "answer": _answer(row.get("answer"))}


def _answer(value: Any) -> str:
    """A reference answer as a string: ``""`` for none, numbers written as Python writes them."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRow(f"'answer' is {type(value).__name__}, not a string or a number")
    return str(value)


_NORMALISERS: dict[str, Callable[[dict], dict]] = {
    "text": norm_text,
    "messages": norm_messages,
    "sharegpt": norm_sharegpt,
    "alpaca": norm_alpaca,
    "prompt_completion": norm_prompt_completion,
    "preference": norm_preference,
    "prompt": norm_prompt,
    "unpaired_preference": norm_unpaired_preference,
}


def convert_kind(row: dict, src: str, dst: str) -> dict:
    """Convert a canonical row of kind ``src`` to kind ``dst`` where that has one meaning.

    conversation → prompt (all turns before the last assistant turn; the answer is that turn's
    content, so an SFT conversation is also a verifiable prompt); preference or unpaired_preference →
    prompt (no answer);
    preference → conversation (prompt + chosen); conversation, preference, prompt or unpaired_preference → text
    (the message contents joined by blank lines, for tokenizer training).

    Raises:
        ValueError: the conversion has no meaning (e.g. text → conversation).
    """
    if src == dst:
        return row
    if dst == "prompt" and src == "conversation":
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return {"prompt": msgs[:last], "answer": msgs[last]["content"]}
    if dst == "prompt" and src in ("preference", "unpaired_preference"):
        return {"prompt": row["prompt"], "answer": ""}
    if dst == "conversation" and src == "preference":
        return {"messages": row["prompt"] + row["chosen"]}
    if dst == "text" and src in ("conversation", "preference", "prompt", "unpaired_preference"):
        msgs = row.get("messages") or (row.get("prompt", []) + row.get("chosen", []) + row.get("completion", []))
        return {"text": "\n\n".join(m["content"] for m in msgs)}
    raise ValueError(f"{src} data cannot be used where {dst} data is needed")


def row_text(row: dict) -> str:
    """All the text of a canonical row (for length filters and deduplication)."""
    if "text" in row:
        return row["text"]
    parts = []
    for key in ("messages", "prompt", "chosen", "rejected", "completion"):
        for m in row.get(key) or []:
            parts.append(m["content"])
    if row.get("answer"):
        parts.append(row["answer"])
    return "\n".join(parts)
