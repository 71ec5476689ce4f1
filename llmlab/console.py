"""The rich console llmlab prints with."""

from __future__ import annotations

import os
import sys

from rich.console import Console


def make_console() -> Console:
    """A console that uses the terminal's width, or 160 columns when output is piped or logged
    (rich's default of 80 squeezes the plan and summary tables into unreadable columns)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=160)
