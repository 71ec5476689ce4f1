"""Sharded checkpoints: the model and optimizer state of a stage as ``torch.distributed.checkpoint``
(DCP) files inside llmlab's checkpoint folder.

Under FSDP every rank writes its own shards at once: ``__<rank>_0.distcp`` holds the rank's slice
of every parameter and of its optimizer state, and the coordinator (rank 0) writes ``.metadata``,
the map from each tensor's name and global shape to the chunks in those files. No rank ever
holds more than its own shard (today's full-state save gathered the whole model and optimizer
state into rank 0's CPU memory). On a load each rank reads the chunks that overlap the slice it
holds under the *current* world size, so a checkpoint written by N ranks resumes under M ranks,
one plain process included (its tensors are whole, and it reads every chunk).

The state is keyed by parameter name (``torch.distributed.checkpoint.state_dict``'s
``get_state_dict``: model tensors under ``model.<fqn>``, optimizer state under
``optimizer.state.<fqn>.<name>`` and ``optimizer.param_groups.<fqn>...``), so the optimizer
state does not depend on parameter order or sharding.

The files are written into the checkpoint's temporary folder before its MANIFEST.json; the
folder is renamed into place only after every rank finished (:mod:`llmlab.train.checkpoint`), so
a kill mid-save leaves the previous checkpoint whole. Every rank must see the same folder (one
machine, or a shared filesystem across nodes).

References: torch.distributed.checkpoint (``dcp.save`` / ``dcp.load``), torchtitan's
``components/checkpoint.py`` (the same layout for FSDP2 models).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

#: the coordinator's index of a DCP checkpoint; its presence marks a sharded checkpoint folder
METADATA = ".metadata"


def is_sharded(ckpt: Path) -> bool:
    """Whether checkpoint folder ``ckpt`` holds its model and optimizer state as DCP shards
    (rather than whole, in ``model.safetensors`` and ``optimizer.pt``)."""
    return (Path(ckpt) / METADATA).is_file()


def _inner(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


def save(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """Write ``model``'s and ``optimizer``'s state as DCP shards into ``folder`` (which exists).

    A collective when torch.distributed is initialised: every rank calls it with the same
    ``folder`` and writes its own ``__<rank>_0.distcp``; rank 0 also writes ``.metadata``.
    Files are fsynced by DCP's writer.

    Raises:
        torch.distributed.checkpoint.api.CheckpointException: a rank failed to write (raised on
            every rank, naming it).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _inner(optimizer))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder))


def async_save(folder: Path, model: torch.nn.Module, optimizer, process_group):
    """Start writing ``model``'s and ``optimizer``'s state as DCP shards into ``folder`` and return
    at once with a ``concurrent.futures.Future`` that completes when every rank's shards and
    ``.metadata`` are on disk (``dcp.async_save``, a background thread).

    Before it returns, the rank's shards are copied into new CPU memory (DCP's ``DefaultStager``):
    the optimizer may update the live tensors while the copy is written. That costs one extra copy
    of the rank's shard of the model and optimizer state while the save is in flight.

    A collective: every rank calls it with the same ``folder``. The background thread's
    collectives (plan exchange, the coordinator's gather of write results) run on
    ``process_group``, a gloo group of its own, so they never interleave with the training's
    collectives on the default group (as torchtitan does). On rank 0 the future completes only
    after every rank wrote (the coordinator writes ``.metadata`` after gathering all results).

    Raises (from the future's ``result()``):
        torch.distributed.checkpoint.api.CheckpointException: a rank failed to write.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _inner(optimizer))
    response = dcp.async_save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder),
                              process_group=process_group)
    return getattr(response, "upload_completion", response)  # newer torch: an AsyncSaveResponse


def load(folder: Path, model: torch.nn.Module, optimizer=None) -> None:
    """Load the DCP shards in ``folder`` into ``model`` (and ``optimizer`` when given), resharded
    to this run's world size and sharding (FSDP DTensors, or whole tensors in one process or
    under DDP).

    A collective when torch.distributed is initialised: every rank calls it.

    Raises:
        RuntimeError: the checkpoint lacks a tensor the model or optimizer has, or a shape differs
            (naming ``folder``).
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # one process reading shards is intended, not a mistake
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            _load(folder, model, optimizer)
    except (CheckpointException, RuntimeError, ValueError, KeyError) as exc:
        raise RuntimeError(f"checkpoint {folder} does not fit the model or optimizer: {exc}") from exc


def _load(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """:func:`load` without its error wrapping."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=str(folder))
        set_model_state_dict(model, model_sd)
        return
    model_sd, optim_sd = get_state_dict(model, _inner(optimizer))
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, _inner(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"])
