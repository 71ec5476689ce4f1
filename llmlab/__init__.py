"""llmlab: train a language model from scratch through pretraining, SFT and preference alignment
from one YAML recipe."""

__version__ = "0.1.0"
