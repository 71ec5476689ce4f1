"""``llmlab merge ADAPTER_DIR [--base DIR] OUT``: fold a PEFT LoRA adapter into its base weights."""

from __future__ import annotations

import json
from pathlib import Path


def merge_adapter(adapter_dir: Path, out_dir: Path, base: Path | str | None = None, allow_code: bool = False) -> Path:
    """Load ``base`` (default: the adapter's ``base_model_name_or_path``) plus the adapter, merge
    (``merge_and_unload``) and save a full HF model with the adapter's tokenizer to ``out_dir``.

    Raises:
        FileNotFoundError: no adapter_config.json in ``adapter_dir``.
        ValueError: no base given and none recorded in the adapter.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    import llmlab.models  # noqa: F401  registers our model type
    from llmlab.models.build import load_causal_lm

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    base = base or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg_path}: base_model_name_or_path is empty; pass --base")
    model = load_causal_lm(base, allow_code=allow_code)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(out_dir)
    return out_dir
