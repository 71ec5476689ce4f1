"""A shrunken quick-start recipe for end-to-end tests: same stages and data, tiny sizes."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY = {
    "name": "tiny",
    "seed": 7,
    "tokenizer": {"train": {"datasets": ["bible"], "vocab_size": 512, "max_documents": 200}, "chat_template": "chatml"},
    "model": {"arch": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
              "attention_type": "gqa", "d_ff": 128, "max_seq_len": 64, "positional_encoding": "rope",
              "norm_type": "rmsnorm", "activation": "swiglu", "tie_embeddings": True},
    "datasets": {
        "bible": {"builtin": "kjv", "format": "text", "eval_split": 0.05, "max_samples": 300},
        "chat": {"builtin": "chatterbot", "format": "messages", "eval_split": 0.1, "max_samples": 400},
        "chat_pairs": {"builtin": "chatterbot_pairs", "format": "preference", "eval_split": 0.1, "max_samples": 400},
    },
    "stages": {
        "pretrain": {"type": "pretrain", "datasets": {"bible": 1.0}, "seq_len": 64, "batch_size": 8, "max_steps": 60,
                     "optimizer": {"name": "adamw", "lr": 1e-2}, "scheduler": {"name": "cosine", "warmup_steps": 4},
                     "eval_every": 20, "eval_steps": 2, "save_every": 10, "log_every": 5},
        # seq_len 64 keeps only ~37% of chatterbot's conversations (and pairs): fine for these tests
        "sft": {"type": "sft", "datasets": {"chat": 1.0}, "seq_len": 64, "batch_size": 8, "max_steps": 20,
                "max_dropped_fraction": 0.9,
                "optimizer": {"name": "adamw", "lr": 2e-3}, "scheduler": {"name": "cosine", "warmup_steps": 2},
                "eval_every": 10, "eval_steps": 2, "save_every": 10, "log_every": 5},
        "dpo": {"type": "dpo", "datasets": {"chat_pairs": 1.0}, "seq_len": 64, "batch_size": 8, "max_steps": 10,
                "max_dropped_fraction": 0.9,
                "beta": 0.1, "optimizer": {"name": "adamw", "lr": 1e-3}, "scheduler": {"name": "constant"},
                "eval_every": 5, "eval_steps": 2, "save_every": 5, "log_every": 5},
    },
}


def write_recipe(dir_: Path, recipe: dict | None = None, name: str = "tiny.yaml", **top) -> Path:
    """Write a recipe (default: TINY) into ``dir_`` with an output_dir inside it; returns its path."""
    import copy

    rec = copy.deepcopy(recipe or TINY)
    rec.setdefault("output_dir", "run")
    rec.update(top)
    path = dir_ / name
    path.write_text("# yaml-language-server: $schema=../schemas/recipe.schema.json\n" + yaml.safe_dump(rec, sort_keys=False))
    return path
