"""llmlab.data: sources, formats, the tokenizer, and per-stage batches.

Public API (imported lazily, so ``import llmlab.data`` stays cheap):

- :func:`build_tokenizer`, :func:`load_tokenizer`, :func:`tokenizer_hash`,
  :func:`check_vocab_covers` (llmlab.data.tokenizer)
- :class:`DatasetSource` (:class:`BuiltinSource` | :class:`HubSource` | :class:`LocalSource`),
  :func:`dataset_source` (llmlab.data.source: where rows come from, one content fingerprint each)
- :func:`load_named_dataset`, :class:`DatasetSplits`, :func:`load_builtin` (llmlab.data.sources)
- :func:`build_stage_data`, :class:`StageData`, :func:`pack_documents`, :func:`mix`
  (llmlab.data.pipeline)
- :class:`TokenStore`, :func:`build_store`, :func:`ensure_text_store` (llmlab.data.store: the
  memory-mapped token store of pretraining text); :func:`prepare_stages` (llmlab.data.prepare)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "tokenizer_hash": "tokenizer",
    "check_vocab_covers": "tokenizer",
    "DatasetSource": "source", "BuiltinSource": "source", "HubSource": "source", "LocalSource": "source",
    "dataset_source": "source",
    "load_named_dataset": "sources", "DatasetSplits": "sources", "load_builtin": "sources",
    "build_stage_data": "pipeline", "StageData": "pipeline", "pack_documents": "pipeline",
    "mix": "pipeline",
    "TokenStore": "store", "build_store": "store", "ensure_text_store": "store",
    "prepare_stages": "prepare",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"llmlab.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'llmlab.data' has no attribute {name!r}")
