"""The context length a model declares: one rule for generation (``chat``, ``generate``, ``serve``),
held-out scoring (:mod:`llmlab.heldout`) and loading. A leaf module (no llmlab imports), so the
inference and data layers can both use it without an import cycle."""

from __future__ import annotations

from typing import Any

#: the context ``llmlab serve`` and ``llmlab eval`` assume for a model whose config declares none
#: (a foreign Mamba)
UNDECLARED_CONTEXT = 2048


def context_limit(model: Any) -> int | None:
    """The model's maximum sequence length in tokens, when its config declares one
    (``max_position_embeddings``, ``max_seq_len``, ``n_positions`` or ``max_sequence_length``; an
    llmlab Mamba2 stores its recipe's ``max_seq_len``, see :func:`llmlab.models.build.mamba2_config`);
    None when it declares none."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
