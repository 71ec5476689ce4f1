"""Prompts read from a file for ``llmlab generate --prompts``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_prompts(path: Path) -> list[Any]:
    """Prompts from a file: ``.jsonl`` rows with ``prompt`` (string or messages), ``messages`` (the
    conversation up to its last assistant turn) or ``text``; any other file: one prompt per line.

    Raises:
        ValueError: a row that is not JSON or has none of those keys (naming file and line).
        OSError: the file cannot be read.
    """
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{i}: not valid JSON: {e}") from None
            if isinstance(row, str):
                out.append(row)
            elif isinstance(row, dict) and "prompt" in row:
                out.append(row["prompt"])
            elif isinstance(row, dict) and "messages" in row:
                msgs = row["messages"]
                cut = max((j for j, m in enumerate(msgs) if m.get("role") == "assistant"), default=len(msgs))
                out.append(msgs[:cut] or msgs)
            elif isinstance(row, dict) and "text" in row:
                out.append(row["text"])
            else:
                raise ValueError(f"{path}:{i}: expected a 'prompt', 'messages' or 'text' key")
        return out
    return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
