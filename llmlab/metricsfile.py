"""Reading ``metrics.jsonl``: one JSON object per line, as the training loop appends them.

A kill (or a full disk) can cut the last line short. Such a torn tail — a last line without its
newline that does not parse — is dropped, so a resume and ``llmlab report`` go on with every
complete record; any other unreadable line is an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("llmlab")


def read_records(path: Path) -> list[dict]:
    """The records of the JSON-lines file ``path`` ([] when it does not exist).

    Raises:
        ValueError: a line other than a torn last one is not a JSON object
            (``"<path>:<line>: ..."``, lines counted from 1).
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    torn_tail = not text.endswith("\n")
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if torn_tail and i == len(lines):
                log.warning("%s: dropped an incomplete last line (%d characters) left by an interrupted write",
                            path, len(line))
                break
            raise ValueError(f"{path}:{i}: not a JSON object ({exc}); fix or delete that line") from None
        records.append(rec)
    return records
