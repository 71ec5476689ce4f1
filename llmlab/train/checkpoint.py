"""Crash-proof training checkpoints.

A checkpoint is a directory ``checkpoints/step-NNNNNN/`` holding everything needed to continue:

- ``model.safetensors``: every parameter and buffer of the (possibly PEFT-wrapped) model;
- ``optimizer.pt``: its state dict; under FSDP both are DCP shards instead, ``.metadata`` and one
  ``__<rank>_0.distcp`` per rank, written by every rank at once (:mod:`llmlab.train.dcp`);
- ``scheduler.pt``: its state dict (tensors and numbers only; loaded with
  ``torch.load(weights_only=True)``, never arbitrary pickles);
- ``rng.pt``: the torch CPU and CUDA generator states; ``rng.json``: Python's and NumPy's;
- ``stage_state.pt``: the stage's own state (e.g. an RL rollout buffer);
- ``trainer_state.json``: step, best eval loss, fingerprint;
- ``MANIFEST.json``: the sha256 and size of each file above, written last.

It is written into a temporary sibling directory, every file fsynced, then renamed into place and
the parent directory fsynced, so a kill at any instant leaves either the old or the new checkpoint
whole. Loading verifies the manifest; a truncated or corrupt newest checkpoint is reported and the
previous intact one is used. A full disk removes the partial write at once and says so
(:func:`llmlab.ownership.disk_full_error`).

``checkpoints/`` and every checkpoint folder carry llmlab's ownership marker
(:mod:`llmlab.ownership`) from the moment they are made; only marked checkpoints (with their
MANIFEST.json) are listed, resumed from or pruned, so a folder of the user's named
``step-000001`` is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from llmlab.fingerprint import sha256_file
from llmlab.layout import CHECKPOINT_PREFIX
from llmlab.ownership import (
    MARKER,
    check_replaceable,
    make_dir,
    match_umask,
    owns,
    remove_owned,
    removed_on_failure,
    try_remove_owned,
)

log = logging.getLogger("llmlab")

PREFIX = CHECKPOINT_PREFIX


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> tuple[dict, dict]:
    """(tensor states for rng.pt, JSON-able states for rng.json) of every generator we use."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, plain


def set_rng_state(tensors: dict, plain: dict) -> None:
    """Restore the states captured by :func:`rng_state`."""
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    v, state, gauss = plain["python"]
    random.setstate((v, tuple(state), gauss))
    n = plain["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with shared (tied) tensors kept once (the first key) and every tensor contiguous
    on the CPU, as safetensors requires."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            continue
        seen[ptr] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with shared (tied) tensors stored once and every tensor contiguous."""
    return unique_tensors(model.state_dict())


class LocalStateIO:
    """Model and optimizer state of a model each process holds whole (one process, DDP).

    ``collective`` is False: only the main process calls :meth:`model_state` /
    :meth:`optimizer_state`.
    """

    optimizer_format = "param_index"  # torch's optimizer.state_dict(): states keyed by parameter index
    collective = False
    #: model and optimizer state are saved as DCP shards every rank writes (llmlab.train.dcp)
    writes_shards = False
    #: those shards are written in the background (distributed.async_checkpoint)
    async_save = False

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict on the CPU (tied tensors once, see ``checkpoint.model_state``)."""
        return model_state(model)

    def optimizer_state(self, model: torch.nn.Module, optimizer) -> dict:
        return optimizer.state_dict()

    def load_model(self, model: torch.nn.Module, state: dict, where) -> None:
        """Load ``state`` (from checkpoint ``where``) into ``model``.

        Raises:
            RuntimeError: keys other than tied weights are missing, or unexpected ones present.
        """
        missing, unexpected = model.load_state_dict(state, strict=False)
        check_keys(missing, unexpected, where)

    def load_optimizer(self, model: torch.nn.Module, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


LOCAL = LocalStateIO()


def check_keys(missing, unexpected, where) -> None:
    """Tied weights are stored once; raise on any other missing or unexpected key.

    Raises:
        RuntimeError: naming the checkpoint ``where`` and up to five keys of each kind.
    """
    tied = {k for k in missing if k.endswith("lm_head.weight") or "embed" in k}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {where} does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


class FrozenState:
    """A copy of an object's ``state_dict()`` taken now, answering ``state_dict()`` later: what an
    asynchronous save records of the scheduler at the step it was started."""

    def __init__(self, obj):
        import copy

        self._state = copy.deepcopy(obj.state_dict())

    def state_dict(self) -> dict:
        """The state captured at construction."""
        return self._state


def begin_checkpoint(ckpt_root: Path, step: int) -> Path:
    """Make (marked) and return the temporary folder checkpoint ``step`` is written into before
    :func:`save_checkpoint` renames it into place; the DCP shards of an FSDP model go in here
    first (:mod:`llmlab.train.dcp`).

    Raises:
        NotOwnedError: ``ckpt_root`` or the step's folder holds files llmlab did not write.
    """
    make_dir(ckpt_root, "checkpoints")
    check_replaceable(ckpt_root / f"{PREFIX}{step:06d}")
    tmp = ckpt_root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    remove_owned(tmp)
    make_dir(tmp, "checkpoint")
    return tmp


def save_checkpoint(ckpt_root: Path, step: int, *, model_state: dict[str, torch.Tensor] | None,
                    optimizer_state: dict | None, scheduler, stage_state: dict, trainer_state: dict,
                    keep_last: int = 2, protect: set[int] | None = None, tmp: Path | None = None,
                    rng: tuple[dict, dict] | None = None) -> Path:
    """Write ``ckpt_root/step-{step:06d}`` atomically and prune older checkpoints.

    Args:
        model_state: the whole model's tensors (:func:`model_state`), tied tensors once; None when
            the model and optimizer state are already in ``tmp`` as DCP shards.
        optimizer_state: the optimizer's state dict; None with ``model_state``.
        keep_last: how many of the newest checkpoints to keep (≥ 1).
        protect: steps never pruned (e.g. the best checkpoint under ``save_best_only``).
        tmp: the folder :func:`begin_checkpoint` made (made here when None).
        scheduler: the LR scheduler, or anything with its ``state_dict()`` (a :class:`FrozenState`
            captured when the step ended, for a save finalised later).
        rng: :func:`rng_state` captured when the step ended (an asynchronous save is finalised
            while training goes on); None: the generators' states now.

    Returns:
        the checkpoint directory.

    Raises:
        NotOwnedError: ``ckpt_root`` or the step's folder holds files llmlab did not write.
        OSError: ENOSPC when the disk filled up (:func:`llmlab.ownership.disk_full_error`); nothing partial is left.
    """
    final = ckpt_root / f"{PREFIX}{step:06d}"
    tmp = tmp or begin_checkpoint(ckpt_root, step)
    with removed_on_failure(tmp, f"writing checkpoint {final}"):
        _write_files(tmp, model_state, optimizer_state, scheduler, stage_state, {**trainer_state, "step": step},
                     rng or rng_state())
    if final.exists():  # a re-save of the same step (e.g. after an extend): replace atomically enough
        old = ckpt_root / f".old-{PREFIX}{step:06d}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        remove_owned(old)
    else:
        tmp.rename(final)
    fsync_dir(ckpt_root)
    prune(ckpt_root, keep_last, protect or set())
    return final


def _write_files(tmp: Path, model_state: dict | None, optimizer_state: dict | None, scheduler, stage_state: dict,
                 trainer_state: dict, rng: tuple[dict, dict]) -> None:
    """Write a checkpoint's files into ``tmp``, fsynced, MANIFEST.json last (which lists every
    file in ``tmp``, DCP shards written there before included)."""
    from safetensors.torch import save_file

    if model_state is not None:
        save_file(model_state, str(tmp / "model.safetensors"))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    tensors, plain = rng
    torch.save(tensors, tmp / "rng.pt")
    (tmp / "rng.json").write_text(json.dumps(plain))
    torch.save(stage_state, tmp / "stage_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    match_umask(tmp)  # safetensors writes 0600
    manifest = {}
    for f in sorted(tmp.iterdir()):
        if f.name == MARKER:
            continue
        _fsync_file(f)
        manifest[f.name] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    _fsync_file(tmp / "MANIFEST.json")
    fsync_dir(tmp)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories llmlab wrote (marked, with a MANIFEST.json), oldest first
    (temporary ones excluded)."""
    if not ckpt_root.is_dir():
        return []
    n = len(PREFIX)
    dirs = [d for d in ckpt_root.iterdir()
            if d.name.startswith(PREFIX) and d.name[n:].isdigit() and owns(d, "checkpoint")
            and (d / "MANIFEST.json").is_file()]
    return sorted(dirs, key=lambda d: int(d.name[len(PREFIX):]))


def prune(ckpt_root: Path, keep_last: int, protect: set[int]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and the protected steps), and any
    leftover temporary directories from a killed write; only what llmlab wrote
    (:func:`llmlab.ownership.remove_owned`: a file of the user's put into a checkpoint stays,
    with a warning)."""
    ckpts = list_checkpoints(ckpt_root)
    doomed = [d for d in ckpts[: max(0, len(ckpts) - max(1, keep_last))] if int(d.name[len(PREFIX):]) not in protect]
    doomed += [d for d in ckpt_root.iterdir() if d.name.startswith((".tmp-", ".old-")) and owns(d, "checkpoint")]
    for d in doomed:
        kept = try_remove_owned(d)
        if kept:
            log.warning("pruned checkpoint %s but kept what llmlab did not write in it: %s", d, ", ".join(kept))


def verify(ckpt: Path) -> str | None:
    """None when the checkpoint is intact, else the reason it is not."""
    mf = ckpt / "MANIFEST.json"
    if not mf.is_file():
        return "no MANIFEST.json (the write did not finish)"
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError:
        return "MANIFEST.json is not valid JSON"
    for name, meta in manifest.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {meta['size']}"
        if sha256_file(f) != meta["sha256"]:
            return f"{name} fails its sha256 checksum"
    return None


def latest_intact(ckpt_root: Path) -> Path | None:
    """The newest checkpoint that passes :func:`verify`; warns about each corrupt one skipped."""
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log.warning("checkpoint %s is corrupt (%s); falling back to the previous one", ckpt, problem)
    return None


def load_checkpoint(ckpt: Path, *, model: torch.nn.Module, optimizer=None, scheduler=None, state_io=None) -> dict:
    """Load weights (and optimizer/scheduler state when given) from ``ckpt``; restore RNG states.

    A checkpoint of DCP shards (:func:`llmlab.train.dcp.is_sharded`) loads into any model,
    resharded to this run's world size: a collective when torch.distributed is initialised
    (every rank calls it).

    Args:
        state_io: how whole-model files go in (:mod:`llmlab.train.fsdp`: whole, or sliced into
            FSDP shards); default whole.

    Returns:
        ``{"trainer_state": dict, "stage_state": dict}``.

    Raises:
        RuntimeError: the checkpoint's tensors do not fit the model (tied weights may be absent).
    """
    from safetensors.torch import load_file

    from llmlab.train import dcp

    state_io = state_io or LOCAL
    if dcp.is_sharded(ckpt):
        dcp.load(ckpt, model, optimizer)
    else:
        state_io.load_model(model, load_file(str(ckpt / "model.safetensors")), ckpt)
        if optimizer is not None:
            state_io.load_optimizer(model, optimizer, torch.load(ckpt / "optimizer.pt", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True), json.loads((ckpt / "rng.json").read_text()))
    return {
        "trainer_state": json.loads((ckpt / "trainer_state.json").read_text()),
        "stage_state": torch.load(ckpt / "stage_state.pt", weights_only=True),
    }
