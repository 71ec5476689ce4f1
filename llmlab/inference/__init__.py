"""Talk to a trained model and measure it: loading, generation, chat, evaluation, HTTP serving.

Everything here works on any stage's output: ``<run>/<stage>/final/`` (a Hugging Face model
directory), ``<run>/<stage>/adapter/`` (a PEFT adapter; its base is found from the adapter config or
the run's recipe), or a run directory plus a stage name. See :func:`load_for_inference`.

The modules import torch and transformers; import them lazily from the CLI.
"""

from __future__ import annotations

__all__ = ["GenerationSettings", "evaluate_model", "load_for_inference", "locate_model"]


def __getattr__(name):  # lazy re-exports so ``import llmlab.inference`` stays cheap
    if name in ("load_for_inference", "locate_model"):
        from llmlab.inference import loading

        return getattr(loading, name)
    if name == "evaluate_model":
        from llmlab.inference.evaluate import evaluate_model

        return evaluate_model
    if name == "GenerationSettings":
        from llmlab.inference.generation import GenerationSettings

        return GenerationSettings
    raise AttributeError(name)
