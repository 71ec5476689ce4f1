"""Stage types. Each is looked up lazily (through :data:`llmlab.stage_specs.STAGE_SPECS`) so importing
llmlab.stages stays cheap."""

from __future__ import annotations

import importlib

from llmlab.stage_specs import stage_spec


def stage_class(stage_type: str):
    """Return the Stage subclass for ``stage_type`` (its spec's ``implementation``).

    Raises:
        KeyError: when the type is unknown.
    """
    module, _, cls = stage_spec(stage_type).implementation.partition(":")
    return getattr(importlib.import_module(module), cls)
