"""What llmlab may delete or overwrite: only what it wrote.

Every folder llmlab creates (the run directory, a stage directory, ``checkpoints/`` and each
``step-NNNNNN/``, ``final/``, ``adapter/``, ``tokenizer/``, a token store) gets a marker file,
:data:`MARKER`, the moment it is created. The marker says what kind of folder it is and, for
folders whose files are chosen by another library (``final/`` holds what ``save_pretrained``
wrote), lists those files. Inside a marked folder llmlab's entries are:

- the files the marker lists, or else the file names of its kind (:data:`KIND_FILES`: a stage's
  ``stage.json``, ``metrics.jsonl``, ...; a checkpoint's ``model.safetensors``, ...);
- sub-folders that carry their own marker.

Anything else (a user's ``notes.txt`` dropped into a stage folder) is the user's:
:func:`remove_owned` deletes llmlab's entries, leaves the rest, and says what it left. A folder
without a marker is never deleted unless it is empty, and :func:`make_dir` refuses to take over
a non-empty folder without one, listing what is in it.

Folders written by llmlab before markers existed are recognised once, by
:func:`adopt_legacy_run`, from contents that only llmlab writes (see there), and marked.

Writing a folder another library fills (:func:`writing_folder`) gives its files the umask's mode
(safetensors alone writes 0600) and turns a full disk's opaque error into an ``OSError(ENOSPC)``
naming the disk (:func:`disk_full_error`), with the partial folder removed at once.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

#: the marker file in every folder llmlab creates (a dot file: tokenizer hashes skip it)
MARKER = ".llmlab-owned"
#: the marker's temporary name while it is written (:func:`llmlab.layout.write_json_atomic`)
_MARKER_TMP = re.compile(re.escape("." + MARKER) + r"\.tmp-\d+")
#: the run directory's lock file (:func:`llmlab.runguard.run_lock`)
LOCK_NAME = ".llmlab.lock"

#: per folder kind, the file names llmlab writes into it (its atomic writers' temporary names too)
KIND_FILES: dict[str, re.Pattern] = {
    "run": re.compile(r"recipe\.resolved\.yaml|tokenizer\.fingerprint|error\.log|" + re.escape(LOCK_NAME)),
    "stage": re.compile(r"\.?(stage\.json|metrics\.jsonl|results\.json|value_head\.safetensors)(\.tmp-?\d*)?"),
    "checkpoints": re.compile(r"(?!)"),
    "checkpoint": re.compile(r"model\.safetensors|optimizer\.pt|scheduler\.pt|rng\.pt|rng\.json|stage_state\.pt|"
                             r"trainer_state\.json|MANIFEST\.json|"
                             r"\.metadata(\.tmp)?|__\d+_\d+\.distcp"),  # DCP shards (llmlab.train.dcp)
    # pretraining stores: shard-N.tokens/offsets.npy (+ shard-N.verified, the first read's check);
    # chat stores (llmlab.data.chat_store): shard-N.<array>.npy
    "token-store": re.compile(r"manifest\.json(\.tmp)?|shard-\d+\.(tokens\.npy|offsets\.npy|json|[a-z_]+\.npy)(\.tmp)?|"
                              r"shard-\d+\.verified(\.tmp-\d+)?"),
}


class NotOwnedError(RuntimeError):
    """A path llmlab would delete, overwrite or take over was not written by llmlab; nothing was
    changed. The message lists what is there."""


def _listing(path: Path, names: list[str] | None = None, limit: int = 8) -> str:
    names = sorted(names if names is not None else (p.name + ("/" if p.is_dir() else "") for p in path.iterdir()))
    more = f", … ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file under this process's umask
    (0o644 under the usual umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def match_umask(*paths: Path) -> None:
    """Give ``paths`` (files, or every file directly in a folder) :func:`default_file_mode`:
    safetensors creates its files 0600 where everything else llmlab writes is 0644."""
    mode = default_file_mode()
    for p in paths:
        for f in (Path(p).iterdir() if Path(p).is_dir() else [Path(p)]):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, mode)


def mark(path: Path, kind: str, files=None) -> None:
    """Write the marker of ``kind`` into the folder ``path``; ``files``: the names of the files
    it owns, for a folder another library filled (``final``, ``adapter``, ``tokenizer``); without
    it the kind's :data:`KIND_FILES` say."""
    from llmlab.layout import write_json_atomic

    rec: dict = {"llmlab": kind}
    if files is not None:
        rec["files"] = sorted(str(f) for f in files)
    write_json_atomic(Path(path) / MARKER, rec)


def mark_written(path: Path, kind: str) -> None:
    """Mark ``path`` as owning every file now in it, its sub-folders included (a fresh temporary
    folder another library just wrote into: ``save_pretrained``), and give those files
    :func:`default_file_mode`."""
    path = Path(path)
    match_umask(path)
    for sub in path.iterdir():
        if sub.is_dir() and not sub.is_symlink():
            mark_written(sub, kind)
    mark(path, kind, [p.name for p in path.iterdir() if p.is_file() and not p.is_symlink() and p.name != MARKER])


def marker(path: Path) -> dict | None:
    """The marker of folder ``path`` as a dict, or None when it has none (or is not a real folder)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    try:
        rec = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("llmlab"), str) else None


def owns(path: Path, kind: str | None = None) -> bool:
    """Whether ``path`` is a folder llmlab made (of ``kind``, when given)."""
    rec = marker(path)
    return rec is not None and (kind is None or rec["llmlab"] == kind)


def _is_llmlab_file(name: str, rec: dict) -> bool:
    if name == MARKER or _MARKER_TMP.fullmatch(name):
        return True
    if "files" in rec:
        return name in rec["files"]
    pattern = KIND_FILES.get(rec["llmlab"])
    return bool(pattern and pattern.fullmatch(name))


def foreign_entries(path: Path) -> list[str]:
    """The entries directly in the owned folder ``path`` that llmlab did not write (all of them
    when it carries no marker); sub-folders end with ``/``."""
    path = Path(path)
    rec = marker(path)
    out = []
    for p in path.iterdir():
        if p.is_dir() and not p.is_symlink():
            if rec is None or not owns(p):
                out.append(p.name + "/")
        elif rec is None or p.is_symlink() or not _is_llmlab_file(p.name, rec):
            out.append(p.name)
    return sorted(out)


def make_dir(path: Path, kind: str) -> Path:
    """Create the folder ``path`` (and its parents) for llmlab, marked as ``kind``.

    An existing empty folder is marked; one llmlab owns is kept as it is.

    Returns:
        ``path``.

    Raises:
        NotOwnedError: ``path`` is a file, a link, or a non-empty folder without llmlab's marker
            (the message lists what is in it); nothing was written.
    """
    path = Path(path)
    if owns(path):
        return path
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise NotOwnedError(f"{path} is not a folder llmlab made; move it away (nothing was changed)")
    if path.is_dir() and any(path.iterdir()):
        raise NotOwnedError(f"{path} holds files that llmlab did not write ({_listing(path)}); move them away "
                            "or choose another output_dir (nothing was changed)")
    path.mkdir(parents=True, exist_ok=True)
    mark(path, kind)
    return path


def remove_owned(path: Path) -> list[str]:
    """Delete what llmlab wrote of the folder ``path``: the files it owns, its owned sub-folders
    (recursively), then the marker and the folder itself once nothing else is left in it.

    Returns:
        the entries left because llmlab did not write them (relative to ``path``; empty when
        ``path`` is gone or was absent).

    Raises:
        NotOwnedError: ``path`` is a file, a link, or a non-empty folder without llmlab's marker;
            nothing was deleted.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return []
    rec = marker(path)
    if rec is None:
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
            return []
        what = f"it holds {_listing(path)}" if path.is_dir() and not path.is_symlink() else "it is not a folder"
        raise NotOwnedError(f"{path} was not made by llmlab ({what}; no {MARKER}); move it away or choose "
                            "another output_dir (nothing was deleted)")
    foreign = set(foreign_entries(path))
    kept: list[str] = []
    for p in sorted(path.iterdir()):
        if p.name == MARKER:
            continue
        if p.is_dir() and not p.is_symlink():
            if p.name + "/" in foreign:
                kept.append(p.name + "/")
            else:
                kept += [f"{p.name}/{k}" for k in remove_owned(p)]
        elif p.name in foreign:
            kept.append(p.name)
        else:
            p.unlink()
    if not kept:
        (path / MARKER).unlink()
        path.rmdir()
    return kept


def try_remove_owned(path: Path) -> list[str] | None:
    """:func:`remove_owned`, answering None instead of raising when ``path`` is not llmlab's."""
    try:
        return remove_owned(path)
    except NotOwnedError:
        return None


def check_replaceable(path: Path, kind: str | None = None) -> None:
    """Raise unless :func:`replace_owned` could replace ``path``: it is absent, an empty folder, or
    a folder llmlab owns holding nothing of the user's (and, with ``kind``, made as ``kind``: an
    output folder given on the command line is never a run directory or a stage's ``final/``).
    Deletes nothing.

    Raises:
        NotOwnedError: listing the entries llmlab did not write, or naming the folder's other kind.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise NotOwnedError(f"{path} is not a folder llmlab made; move it away (nothing was changed)")
    foreign = foreign_entries(path)
    if foreign:
        raise NotOwnedError(f"{path} holds files that llmlab did not write ({_listing(path, foreign)}); move them "
                            "away or choose another output_dir (nothing was changed)")
    rec = marker(path)
    if kind is not None and rec is not None and rec["llmlab"] != kind and any(p.name != MARKER for p in path.iterdir()):
        raise NotOwnedError(f"{path} is a {rec['llmlab']} folder of llmlab's, not a {kind} one; choose another "
                            "folder (nothing was changed)")


def replace_owned(src: Path, dst: Path) -> None:
    """Move the freshly written folder ``src`` to ``dst``, first removing the old ``dst`` when
    llmlab owns it.

    Raises:
        NotOwnedError: ``dst`` (or something in it) is not llmlab's; ``src`` stays where it is.
    """
    kept = remove_owned(dst)
    if kept:
        raise NotOwnedError(f"{dst} holds files that llmlab did not write ({_listing(dst, kept)}); move them away "
                            f"(the new output is kept in {src})")
    os.replace(src, dst)


#: a write that fails with less than this free on its disk failed because the disk is full (torch and
#: safetensors report it as a RuntimeError: "[enforce fail at inline_container.cc:672] ...",
#: "661067 requested and 587712 written")
DISK_FULL_FREE_BYTES = 16 << 20


def _mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() or not os.path.ismount(path):
        if path.parent == path:
            break
        path = path.parent
    return path


def disk_full_error(exc: BaseException, path: Path, what: str) -> OSError | None:
    """An ``OSError(ENOSPC)`` saying the disk is full and where, when ``exc`` (raised while
    ``what`` was being written at ``path``) came from a full disk: an ENOSPC / EDQUOT OSError, or
    any write error while less than :data:`DISK_FULL_FREE_BYTES` are free there. None otherwise."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    mount = _mount_point(path)
    try:
        free = shutil.disk_usage(mount).free
    except OSError:
        free = None
    if not full and (free is None or free >= DISK_FULL_FREE_BYTES):
        return None
    left = "" if free is None else f", {free / 2**20:.1f} MiB free"
    return OSError(errno.ENOSPC, f"the disk is full ({mount}{left}) while {what}; the partial write was removed. "
                   "Free some space there (or set output_dir elsewhere) and run the same command to resume",
                   str(path))


@contextmanager
def writing_folder(tmp: Path, dest: Path, kind: str):
    """Yield the empty folder ``tmp`` to write ``dest`` (``final/``, ``adapter/``) into; then mark
    the files written there as llmlab's (:func:`llmlab.ownership.mark_written`, which also gives
    them the umask's mode) and rename it over ``dest``, whose old copy is removed only when llmlab
    owns it.

    Raises:
        NotOwnedError: ``tmp`` or ``dest`` holds files llmlab did not write (checked before writing).
        OSError: ENOSPC when the disk filled up (``tmp`` is removed at once, the message says where).
    """
    check_replaceable(dest)
    check_replaceable(tmp)
    remove_owned(tmp)  # a copy left by a killed write
    make_dir(tmp, kind)
    with removed_on_failure(tmp, f"writing {dest}"):
        yield tmp
        mark_written(tmp, kind)
    replace_owned(tmp, dest)


@contextmanager
def removed_on_failure(tmp: Path, what: str):
    """Run the block that writes llmlab's temporary folder ``tmp``; when it fails (``OSError``, or the
    opaque ``RuntimeError`` torch and safetensors raise for a failed write) remove ``tmp`` at once
    and re-raise, a full disk as :func:`disk_full_error`'s ENOSPC naming ``what`` and the disk.

    Raises:
        OSError, RuntimeError: the block's error (ENOSPC with the disk named when the disk is full).
    """
    try:
        yield
    except (OSError, RuntimeError) as exc:
        full = disk_full_error(exc, tmp, what)
        remove_owned(tmp)
        if full is not None:
            raise full from exc
        raise


# -- the run directory -------------------------------------------------------------------------
def check_run_dir(out: Path, stage_names, adopt: bool) -> None:
    """Refuse ``out`` as a run directory unless it is absent, empty, llmlab's (marked, or written
    by an llmlab before markers: :func:`legacy_run`), or ``adopt`` is set; writes nothing.

    With ``adopt``, a folder of the user's is taken as the run directory, but none of the names
    llmlab writes there (``recipe.resolved.yaml``, ``tokenizer/``, a stage's folder, ...) may
    exist already: llmlab would overwrite them.

    Raises:
        NotOwnedError: listing what is there.
    """
    out = Path(out).resolve()  # an output_dir that is a link to a folder elsewhere: that folder
    if not out.is_dir() or owns(out, "run") or legacy_run(out):
        return  # absent or a file: the run's own mkdir says what is wrong
    # the lock is this run's; a marker being written is another rank's claim
    there = [p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
             if p.name != LOCK_NAME and not p.name.startswith((MARKER, "." + MARKER))]
    if not there:
        return
    if not adopt:
        raise NotOwnedError(f"{out} is not empty and llmlab did not write it (no {MARKER}): it holds "
                            f"{_listing(out, there)}. Choose another output_dir (an empty or new folder), or pass "
                            "--adopt to run in it: llmlab then never deletes or overwrites what is there")
    clashes = sorted(n for n in run_entry_names(stage_names) if (out / n).exists() or (out / n).is_symlink())
    if clashes:
        raise NotOwnedError(f"{out}: --adopt cannot take it, it already holds {', '.join(clashes)}, names llmlab "
                            "writes; move them away or choose another output_dir (nothing was changed)")


def run_entry_names(stage_names) -> list[str]:
    """Every name llmlab writes directly in a run directory."""
    from llmlab.layout import RunLayout

    lay = RunLayout(Path("."))
    return [p.name for p in (lay.resolved_recipe, lay.tokenizer, lay.tokenizer_fingerprint, lay.tokenizer_tmp,
                             lay.error_log, lay.root / "tensorboard", lay.root / "cache")] + list(stage_names)


def claim_run_dir(out: Path) -> bool:
    """Create or mark the run directory after :func:`check_run_dir` passed; a legacy run
    directory's llmlab folders are marked too (:func:`adopt_legacy_run`).

    Returns:
        whether a legacy (unmarked) run directory was adopted.
    """
    out = Path(out).resolve()
    if owns(out, "run"):
        return False
    legacy = out.is_dir() and legacy_run(out)
    out.mkdir(parents=True, exist_ok=True)
    if legacy:
        adopt_legacy_run(out)
    mark(out, "run")
    return legacy


# -- folders of an llmlab that wrote no markers ------------------------------------------------
def legacy_run(out: Path) -> bool:
    """Whether the unmarked folder ``out`` is a run directory written by an llmlab before markers:
    its ``recipe.resolved.yaml`` starts with the header only llmlab writes, or (``llmlab prepare``
    ran there, not ``run``) its ``tokenizer.fingerprint`` is a sha256 beside a ``tokenizer/``."""
    from llmlab.layout import RESOLVED_HEADER, RunLayout

    lay = RunLayout(Path(out))
    try:
        with open(lay.resolved_recipe, encoding="utf-8") as f:
            if f.readline().rstrip("\n") == RESOLVED_HEADER:
                return True
    except (OSError, UnicodeDecodeError):
        pass
    try:
        fp = lay.tokenizer_fingerprint.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(re.fullmatch(r"[0-9a-f]{64}", fp)) and lay.tokenizer.is_dir() and not lay.tokenizer.is_symlink()


def _legacy_stage(d: Path) -> dict | None:
    try:
        record = json.loads((d / "stage.json").read_text())  # a stage record, not a recipe
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("name") == d.name and {"fingerprint", "status", "type"} <= set(record)
    return record if ok else None


def legacy_checkpoint_files(d: Path) -> list[str] | None:
    """The files of an unmarked checkpoint folder when every file in it is one its
    ``MANIFEST.json`` names (or the manifest itself): None when it is anything else."""
    try:
        manifest = json.loads((d / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return None
    names = {p.name for p in d.iterdir()}
    if not isinstance(manifest, dict) or any(p.is_dir() for p in d.iterdir()) or \
            not names <= set(manifest) | {"MANIFEST.json"}:
        return None
    return sorted(names)


def adopt_legacy_run(out: Path) -> None:
    """Mark the folders an llmlab without markers wrote in the run directory ``out``:

    - a stage folder whose ``stage.json`` names it (its known files become llmlab's, nothing else);
    - its ``checkpoints/`` and each ``step-*`` whose files are exactly those its MANIFEST.json names;
    - its ``final/`` and ``adapter/`` when its stage.json's ``outputs`` names them (every file in them);
    - ``tokenizer/`` when ``tokenizer.fingerprint`` is beside it (every file in it);
    - the temporary folders of a write it was killed in: ``.tokenizer.tmp``, a stage's
      ``.final.tmp`` / ``.adapter.tmp`` (every file in them: only llmlab uses these names, inside
      folders it is known to have written), and ``checkpoints/.tmp-step-*`` holding only
      checkpoint file names.

    Anything else stays unmarked, so llmlab never deletes it. A folder it cannot write (a
    read-only mount) stays unmarked.
    """
    out = Path(out)
    try:
        if (out / "tokenizer.fingerprint").is_file():
            _mark_listed(out / "tokenizer", "tokenizer")
        _mark_listed(out / ".tokenizer.tmp", "tokenizer")
        for d in sorted(out.iterdir()):
            rec = _legacy_stage(d) if d.is_dir() and not d.is_symlink() and not owns(d) else None
            if rec is not None:
                _adopt_legacy_stage(d, rec)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise


def _adopt_legacy_stage(d: Path, rec: dict) -> None:
    from llmlab.layout import StageLayout

    lay = StageLayout(d)
    outputs = {Path(str(v)).name for v in (rec.get("outputs") or {}).values() if v}
    for sub in (lay.final, lay.adapter):
        if sub.name in outputs:
            _mark_listed(sub, sub.name)
    _mark_listed(lay.tmp("final"), "final")
    _mark_listed(lay.tmp("adapter"), "adapter")
    if lay.checkpoints.is_dir() and not lay.checkpoints.is_symlink() and not owns(lay.checkpoints):
        for ck in lay.checkpoints.iterdir():
            if not ck.is_dir() or ck.is_symlink():
                continue
            if legacy_checkpoint_files(ck) is not None or (ck.name.startswith((".tmp-", ".old-")) and all(
                    p.is_file() and KIND_FILES["checkpoint"].fullmatch(p.name) for p in ck.iterdir())):
                mark(ck, "checkpoint")
        mark(lay.checkpoints, "checkpoints")
    mark(d, "stage")


def _mark_listed(d: Path, kind: str) -> None:
    """Mark the unmarked real folder ``d`` (if there) as owning the plain files now in it, and no
    sub-folder."""
    if d.is_dir() and not d.is_symlink() and not owns(d):
        mark(d, kind, [p.name for p in d.iterdir() if p.is_file() and not p.is_symlink()])


def legacy_store(d: Path) -> bool:
    """Whether the unmarked folder ``d`` is a token store written by an llmlab before markers: its
    name is a 32-hex store key (``.partial`` while being written), every entry in it is a file
    named as a store names its files, and a complete store's ``manifest.json`` has the store's
    fields."""
    d = Path(d)
    m = re.fullmatch(r"[0-9a-f]{32}(\.partial)?", d.name)
    if not m or d.is_symlink() or not d.is_dir():
        return False
    entries = list(d.iterdir())
    if not all(p.is_file() and not p.is_symlink() and KIND_FILES["token-store"].fullmatch(p.name) for p in entries):
        return False
    if m.group(1):
        return True
    try:
        manifest = json.loads((d / "manifest.json").read_text())
        return {"version", "tokenizer_sha256", "dtype", "eos_id", "documents", "tokens", "shards"} <= set(manifest)
    except (OSError, ValueError, TypeError):
        return False
