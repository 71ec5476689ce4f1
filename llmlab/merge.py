"""``llmlab merge ADAPTER_DIR [--base DIR] OUT``: fold a PEFT LoRA adapter into its base weights."""

from __future__ import annotations

import json
from pathlib import Path

from llmlab.ownership import check_replaceable, writing_folder


def merge_adapter(adapter_dir: Path, out_dir: Path, base: Path | str | None = None, allow_code: bool = False,
                  force: bool = False) -> Path:
    """Load ``base`` (default: the adapter's ``base_model_name_or_path``) plus the adapter, merge
    (``merge_and_unload``) and save a full HF model with the adapter's tokenizer to ``out_dir``.

    A recorded base that no longer exists because the run directory was moved is found again at
    the same place relative to the adapter (``<run>/<stage>/adapter`` → ``<run>/<input>/final``).

    ``out_dir`` is written as a folder llmlab owns (:mod:`llmlab.ownership`: written beside it,
    marked, renamed into place), so ``force`` replaces only an earlier merge's output, never a
    folder of the user's.

    Raises:
        FileNotFoundError: no adapter_config.json in ``adapter_dir``, or the base directory is gone
            (the message says to pass ``--base``).
        NotOwnedError: ``out_dir`` is a file, or holds files llmlab did not write (listed); nothing
            was written.
        FileExistsError: ``out_dir`` holds an earlier merge and ``force`` is False.
        ValueError: no base given and none recorded in the adapter.
        OSError: ENOSPC when the disk filled up (the message says where; the partial copy is removed).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    import llmlab.models  # noqa: F401  registers our model type
    from llmlab.models.build import load_causal_lm

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    out_dir = Path(out_dir).resolve()
    check_replaceable(out_dir, "merged")  # a folder of the user's (or a run's): refused, even with force
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} holds an earlier llmlab merge; pass --force to overwrite it")
    recorded = not base
    base = base or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg_path}: base_model_name_or_path is empty; pass --base")
    if recorded:
        base = _locate_recorded_base(str(base), adapter_dir, cfg_path)
    model = load_causal_lm(base, allow_code=allow_code)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base
    tokenizer = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=bool(allow_code))
    with writing_folder(out_dir.with_name(f".{out_dir.name}.tmp"), out_dir, "merged") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def _locate_recorded_base(base: str, adapter_dir: Path, cfg_path: Path) -> str:
    """The adapter's recorded base, or where it is now when the run directory moved; a hub id is
    returned as it is.

    Raises:
        FileNotFoundError: a local base that exists neither where recorded nor at the same place
            relative to the adapter.
    """
    looks_local = base.startswith(("/", "./", "../", "~")) or "\\" in base or base.count("/") > 1
    if not looks_local or Path(base).expanduser().is_dir():
        return base
    recorded = Path(base)
    # <run>/<input stage>/final recorded; the adapter is <run>/<stage>/adapter
    if recorded.name == "final" and len(recorded.parts) >= 2:
        moved = adapter_dir.resolve().parent.parent / recorded.parent.name / "final"
        if moved.is_dir():
            return str(moved)
    raise FileNotFoundError(f"{cfg_path}: the base model {base} recorded by the adapter does not exist (was the run "
                            "directory moved?); pass --base DIR")
