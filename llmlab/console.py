"""The rich console llmlab prints with."""

from __future__ import annotations

import os
import sys

from rich.console import Console


def process_rank() -> int:
    """This process's global rank under torchrun / accelerate launch (their ``RANK`` variable);
    0 for a plain single-process run."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def make_console(quiet: bool = False) -> Console:
    """A console that uses the terminal's width, or 160 columns when output is piped or logged
    (rich's default of 80 squeezes the plan and summary tables into unreadable columns).
    ``quiet``: print nothing (the other ranks of a multi-process run)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console(quiet=quiet)
    return Console(width=160, quiet=quiet)
