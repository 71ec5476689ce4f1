"""The recipe language: loading with source positions, ``extends``, ``--set``, ``${VAR}``,
JSON Schema and semantic validation, and resolution. Imports neither torch nor transformers."""

from llmlab.recipe.api import RecipeLoadError, dump_resolved, load_recipe, load_recipe_or_raise, stage_order
from llmlab.recipe.errors import RecipeError
from llmlab.recipe.schema import load_schema, schema_path

__all__ = ["RecipeError", "RecipeLoadError", "dump_resolved", "load_recipe", "load_recipe_or_raise", "load_schema",
           "schema_path", "stage_order"]
