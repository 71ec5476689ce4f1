"""llmlab models: our Transformer (LlmlabConfig / LlmlabForCausalLM /
LlmlabForSequenceClassification), the Mamba2 builder, LoRA presets, parameter counts and export.

Importing this package is cheap and does not import torch or transformers (the recipe validator
imports ``llmlab.models.lora_presets`` and ``llmlab.models.params`` and must answer in well under a
second). The model classes are loaded on first use::

    from llmlab.models import LlmlabForCausalLM      # imports torch/transformers, registers
    import llmlab.models.modeling_llmlab              # same
    llmlab.models.register()                          # same, explicitly

Loading any of them registers ``model_type "llmlab"`` with AutoConfig, AutoModel,
AutoModelForCausalLM and AutoModelForSequenceClassification, so
``AutoModelForCausalLM.from_pretrained(dir)`` works without ``trust_remote_code``. If transformers
is already imported when this package is imported, registration happens right away.
"""

from __future__ import annotations

import importlib
import sys

_LAZY = {
    "LlmlabConfig": "llmlab.models.configuration_llmlab",
    "LlmlabPreTrainedModel": "llmlab.models.modeling_llmlab",
    "LlmlabModel": "llmlab.models.modeling_llmlab",
    "LlmlabForCausalLM": "llmlab.models.modeling_llmlab",
    "LlmlabForSequenceClassification": "llmlab.models.modeling_llmlab",
    "build_model": "llmlab.models.build",
    "load_causal_lm": "llmlab.models.build",
    "load_reward_model": "llmlab.models.build",
    "apply_lora": "llmlab.models.build",
    "export_model": "llmlab.models.export",
    "count_parameters": "llmlab.models.params",
    "count_lora_parameters": "llmlab.models.params",
    "estimate_training_memory": "llmlab.models.params",
}

__all__ = [  # noqa: RUF022 - grouped by module like _LAZY
    "LlmlabConfig", "LlmlabPreTrainedModel", "LlmlabModel", "LlmlabForCausalLM", "LlmlabForSequenceClassification",
    "build_model", "load_causal_lm", "load_reward_model", "apply_lora", "export_model",
    "count_parameters", "count_lora_parameters", "estimate_training_memory", "register",
]


def register() -> None:
    """Register the llmlab classes with transformers' Auto classes (imports torch; idempotent)."""
    importlib.import_module("llmlab.models.modeling_llmlab").register_auto_classes()


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmlab.models' has no attribute {name!r}")
    if module == "llmlab.models.configuration_llmlab":
        register()  # a config alone is not useful without the models being known to the Auto classes
    return getattr(importlib.import_module(module), name)


if "transformers" in sys.modules and "torch" in sys.modules:
    register()
