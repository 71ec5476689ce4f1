"""The recipe language: loading with source positions, ``extends``, ``--set``, ``${VAR}``,
JSON Schema and semantic validation, and resolution. Imports neither torch nor transformers.

The public names are imported lazily (as in :mod:`llmlab.data`), so importing a leaf module such
as ``llmlab.recipe.schema`` does not load the rest of the package.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RecipeLoadError": "api", "dump_resolved": "api", "load_for_command": "api", "load_recipe": "api", "load_recipe_or_raise": "api",
    "stage_order": "api", "RecipeError": "errors", "load_schema": "schema", "schema_path": "schema",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"llmlab.recipe.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'llmlab.recipe' has no attribute {name!r}")
