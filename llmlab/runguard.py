"""Guards on a run directory: one ``llmlab run`` at a time, and memory foreseen.

- :func:`run_lock` takes an exclusive ``flock`` on ``<output_dir>/.llmlab.lock`` for the whole
  run and writes the holder (pid, host, start time, command) into it. A second run on the same
  directory fails at once with a message naming the holder. The kernel drops the lock when its
  process dies (even on SIGKILL), so a lock left by a dead run is taken over, and said so.
  Under torchrun / accelerate only the process of global rank 0 takes it.
  The command line written there has secrets masked (:mod:`llmlab.secrets`).
- What llmlab may delete is :mod:`llmlab.ownership`'s rule (its marker in every folder it makes).
- :func:`memory_shortfall` says, before a stage trains, when its planned peak memory is more
  than the device has free, so an out-of-memory kill is foreseen rather than met an hour in.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from llmlab.console import process_rank
from llmlab.ownership import LOCK_NAME, NotOwnedError  # noqa: F401  (NotOwnedError's home is llmlab.ownership)
from llmlab.secrets import mask_command, mask_secrets



class RunLockedError(RuntimeError):
    """Another live ``llmlab run`` holds the run directory's lock; the message names it."""


def _holder(path: Path) -> dict:
    """The holder the lock file ``path`` names (pid, host, started_at, command); {} when it names
    none or cannot be read."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _holder_text(path: Path) -> str:
    info = _holder(path)
    if not info:
        return "an unknown process"
    # masked again when read: a lock written by an older llmlab holds the command as typed
    return mask_secrets(f"pid {info.get('pid')} on {info.get('host')} since {info.get('started_at')} "
                        f"({info.get('command', '')})").rstrip(" ()")


def _held_by_parent(path: Path) -> bool:
    """Whether this process is a multiprocessing worker still starting up, re-running its parent's
    main script (what the spawn start method does to a script without the ``__main__`` guard), and
    the lock file ``path`` names that parent, on this host, as the holder: waiting would never end,
    since the parent waits for the worker. (``_inheriting`` is the flag CPython's own
    ``multiprocessing.spawn._check_not_importing_main`` reads for the same mistake.)"""
    import multiprocessing

    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return False
    info = _holder(path)
    return info.get("pid") == os.getppid() and info.get("host") == socket.gethostname()


@contextmanager
def file_lock(path: Path, *, wait: bool, on_busy=None) -> Iterator[str | None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if missing) for the ``with``
    block, with the holder (pid, host, start time, command) written into it.

    Args:
        path: the lock file.
        wait: block until the holder releases it; else raise :class:`RunLockedError` at once.
        on_busy: called with the holder's description when the lock is held by another process
            (before waiting, or before raising).

    Yields:
        the description of a holder that is gone when the file still named one (a lock left by a
        killed process, now taken over); None otherwise. A file that cannot be created (read-only
        mount, no permission) or a platform without ``fcntl`` yields None without a lock.

    Raises:
        RunLockedError: ``wait`` is False and another live process holds the lock.
        RuntimeError: ``wait`` is True but the holder is this process's multiprocessing parent
            (a spawned worker that re-ran a main script without the ``__main__`` guard), which
            would wait forever.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks through fcntl
        yield None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES):
            raise
        # a place this process cannot write: no lock to take, and every write the caller would
        # make fails with its own clear error
        yield None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder_text(path)
        if on_busy is not None:
            on_busy(holder)
        if not wait:
            os.close(fd)
            raise RunLockedError(holder) from None
        if _held_by_parent(path):
            os.close(fd)
            raise RuntimeError(
                f"{path} is held by this process's parent ({holder}), which waits for this process: "
                "a worker process re-ran the main script's top-level code. Put the code that calls "
                "llmlab under `if __name__ == \"__main__\":` (multiprocessing's spawn start method "
                "imports the main module again in every worker)")
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        stale = _holder_text(path) if os.read(fd, 65536).strip() else None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": mask_command(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        yield stale
    finally:
        # empty the file while still holding the lock (never unlink: a waiting opener would lock
        # an orphaned inode), then release
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def run_lock(out_dir: Path, announce=None) -> Iterator[None]:
    """Hold the exclusive lock of ``out_dir`` for the ``with`` block (created if missing).

    Args:
        out_dir: the run directory.
        announce: called with a one-line message when a lock left by a dead process is taken over.

    A directory that cannot be written (read-only mount, no permission) is run without a lock.

    Raises:
        RunLockedError: another live process holds the lock (the message gives its pid and host).
    """
    if process_rank() != 0:
        yield
        return
    out_dir = Path(out_dir)
    path = out_dir / LOCK_NAME
    with ExitStack() as stack:
        try:
            stale = stack.enter_context(file_lock(path, wait=False))
        except RunLockedError as exc:
            raise RunLockedError(
                f"{out_dir} is in use by another llmlab run ({exc}; lock file {path}); "
                "wait for it to finish, or give this run another output_dir") from None
        if stale and announce is not None:
            announce(f"took over the lock of {out_dir} left by {stale}, which is no longer running")
        yield


def free_memory(device) -> tuple[int, str]:
    """``(bytes free, what)`` on ``device``: ``torch.cuda.mem_get_info`` for a CUDA device (its
    free memory, other processes' allocations excluded), else the host's available RAM
    (``psutil.virtual_memory().available``: free plus reclaimable page cache)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"{torch.cuda.get_device_name(device)} has free"
    import psutil  # a dependency of accelerate

    return int(psutil.virtual_memory().available), "this machine has available"


def memory_shortfall(stage: str, parts: dict[str, int] | None, device, processes_here: int = 1,
                     free: int | None = None) -> str | None:
    """A warning when training ``stage`` is planned to need more memory than ``device`` has free.

    Args:
        stage: the stage's name (named in the message).
        parts: the per-process peak estimate by part in bytes
            (:func:`llmlab.plan.stage_memory`, :func:`llmlab.models.params.training_memory`); None
            when unknown (a ``from_pretrained`` model): no warning.
        device: the torch device the stage trains on.
        processes_here: training processes sharing this memory (on a CPU, every process of the
            machine shares its RAM; a GPU holds one process's share).
        free: bytes free (default: :func:`free_memory`), for tests.

    Returns:
        the message, or None when the estimate fits.
    """
    if not parts:
        return None
    per_process = sum(parts.values())
    cpu = getattr(device, "type", str(device)) != "cuda"
    need = per_process * (max(1, processes_here) if cpu else 1)
    what = "this machine has available"
    if free is None:
        free, what = free_memory(device)
    if need <= free:
        return None
    gib = 2.0 ** 30
    detail = ", ".join(f"{k} {v / gib:.2f}" for k, v in parts.items() if v)
    who = f"{processes_here} processes x {per_process / gib:.2f} GiB" if cpu and processes_here > 1 else \
        f"{per_process / gib:.2f} GiB"
    return (f"stage {stage}: its planned peak training memory, {need / gib:.2f} GiB ({who}; GiB by part: "
            f"{detail}), is more than the {free / gib:.2f} GiB {what}; it may be killed for lack of "
            "memory. Lower batch_size (and raise gradient_accumulation_steps to keep the tokens per step), "
            "set gradient_checkpointing: true, train a LoRA adapter, or shard with distributed.strategy: "
            "fsdp; `llmlab plan` shows the estimate.")
