"""Micro-batches prepared ahead of the step: DataLoader workers, pinned memory, prefetch.

A stage's training batches are a pure function of their global index
(:meth:`llmlab.data.pipeline.StageData.train_batch`), and the loop knows in advance which indices
it will ask for: micro-batch ``micro`` of step ``step`` on rank ``rank`` of ``world`` processes has
index ``(step * gradient_accumulation_steps + micro) * world + rank``
(:class:`llmlab.train.loop.StepRunner`). :class:`BatchPrefetcher` hands exactly that index
sequence to a ``torch.utils.data.DataLoader`` whose worker processes build the batches while the
accelerator computes, in pinned (page-locked) host memory so the copy to the GPU is asynchronous
(``tensor.to(device, non_blocking=True)``). This is what torchtitan, torchtune and the Hugging Face
Trainer do with ``num_workers`` / ``pin_memory`` / ``prefetch_factor``.

The batches are the same tensors as without workers (each is ``train_batch(index)`` computed in
another process), so weights stay bitwise identical and resume stays exact (tested). With no
workers -- the default on a CPU, where the two would compete for the same cores -- ``get`` is a
direct call of ``train_batch`` and costs nothing over it. Online stages (grpo, ppo) sample their
batches from the model being trained, so they have no index-only batch function and are never
prefetched.

Recipe keys (top level, not part of any fingerprint: they change speed, never weights):
``dataloader_num_workers`` (null: 0 on a CPU, else up to 4 per process within the cores),
``dataloader_pin_memory``, ``dataloader_prefetch_factor``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import torch


class _IndexedBatches(torch.utils.data.Dataset):
    """A map-style dataset whose item ``i`` is the micro-batch with global index ``i``."""

    def __init__(self, batch_fn: Callable[[int], dict]):
        self.batch_fn = batch_fn

    def __getitem__(self, index: int) -> dict:
        return self.batch_fn(int(index))


def step_indices(start_step: int, max_steps: int, gradient_accumulation_steps: int, world: int,
                 rank: int) -> list[int]:
    """The global micro-batch indices rank ``rank`` asks for from ``start_step`` to ``max_steps``,
    in order (see the module docstring): a list of ``(max_steps - start_step) * gas`` ints."""
    gas = int(gradient_accumulation_steps)
    return [(step * gas + micro) * world + rank
            for step in range(int(start_step), int(max_steps)) for micro in range(gas)]


def auto_num_workers(device: torch.device, world: int = 1, cpus: int | None = None) -> int:
    """Workers per process when ``dataloader_num_workers`` is null: 0 on a CPU (the workers
    would take cores from the step), else ``min(4, cores per process - 1)``, at least 0."""
    if device.type == "cpu":
        return 0
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else (os.cpu_count() or 1)
    return max(0, min(4, cpus // max(world, 1) - 1))


class BatchPrefetcher:
    """Training micro-batches in the loop's order, built ahead by DataLoader workers.

    Args:
        batch_fn: ``index -> batch`` (a dict of CPU tensors), a pure function of the index, e.g.
            ``StageData.train_batch``; None for a stage whose batches depend on the model (then
            :meth:`get` calls ``fallback``).
        indices: the indices the loop will ask for, in order (:func:`step_indices`).
        fallback: ``index -> batch`` used for an index out of that order, or for every index when
            there are no workers.
        num_workers: DataLoader worker processes (0: no workers, no prefetch).
        pin_memory: return batches in pinned host memory (only on a CUDA ``device``).
        prefetch_factor: batches each worker prepares ahead.
        device: where the batches go (pinning only applies to CUDA).

    ``get(index)`` returns the batch of ``index``: the next prefetched one when ``index`` is the
    next expected index, else ``fallback(index)`` (the prefetch queue is then dropped and restarted
    after ``index``).
    """

    def __init__(self, batch_fn: Callable[[int], dict] | None, indices: Sequence[int],
                 fallback: Callable[[int], dict], *, num_workers: int = 0, pin_memory: bool = True,
                 prefetch_factor: int = 2, device: torch.device | str = "cpu"):
        self.batch_fn, self.fallback = batch_fn, fallback
        self.indices = list(indices)
        self.num_workers = int(num_workers) if batch_fn is not None else 0
        self.device = torch.device(device)
        self.pin_memory = bool(pin_memory) and self.device.type == "cuda"
        self.prefetch_factor = int(prefetch_factor)
        self._pos = 0                   # position in self.indices of the next expected index
        self._it: Iterator[dict] | None = None

    @property
    def active(self) -> bool:
        """Whether batches come from worker processes."""
        return self.num_workers > 0

    def _start(self, pos: int) -> None:
        self.close()
        self._pos = pos
        if pos >= len(self.indices):
            return
        loader = torch.utils.data.DataLoader(
            _IndexedBatches(self.batch_fn), batch_size=None, sampler=self.indices[pos:],
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor, persistent_workers=False)
        self._it = iter(loader)

    def get(self, index: int) -> dict:
        """The micro-batch of global index ``index`` (see the class docstring)."""
        if not self.active:
            return self.fallback(index)
        if self._pos < len(self.indices) and self.indices[self._pos] == index:
            if self._it is None:
                self._start(self._pos)
            batch = next(self._it)
            self._pos += 1
            return batch
        # out of order (an index the loop was not expected to ask for): serve it directly and
        # prefetch from the one after it, if it is further on in the sequence
        try:
            self._start(self.indices.index(index, self._pos) + 1)
        except ValueError:
            pass
        return self.fallback(index)

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):  # pragma: no cover - interpreter shutdown order
        try:
            self.close()
        except Exception:
            pass
