"""llmlab: train a language model from scratch through pretraining, SFT and preference alignment
from one YAML recipe."""

#: the release; pyproject.toml reads it from here. Recipes name it in `requires:` (docs/compatibility.md).
__version__ = "0.2.0"
