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


def single_process_launch_warning(env: dict | None = None) -> str | None:
    """A warning when ``accelerate launch`` was asked for several processes but started one.

    accelerate's simple launcher (``--num_processes N`` without ``--multi_gpu`` / a multi-process
    config) starts a single process; it then sets ``ACCELERATE_USE_CPU`` and, for N > 1,
    ``MASTER_ADDR`` / ``MASTER_PORT``, but none of ``WORLD_SIZE`` / ``RANK`` that a real
    multi-process launch sets (accelerate's ``prepare_simple_launcher_cmd_env``). Returns None for
    every other launch (plain ``llmlab run``, torchrun, a multi-process accelerate launch).
    """
    env = os.environ if env is None else env
    if "ACCELERATE_USE_CPU" in env and "MASTER_PORT" in env and "WORLD_SIZE" not in env:
        return ("accelerate launch started ONE process although more were asked for (its simple launcher); "
                "add --multi_gpu (on CPU too, with gloo) or use an accelerate config with distributed_type "
                "MULTI_GPU / MULTI_CPU, or torchrun --nproc_per_node N (docs/distributed.md)")
    return None
