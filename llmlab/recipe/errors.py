"""The error type every recipe check reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RecipeError:
    """One problem in a recipe, located in a file.

    ``file`` is the recipe (or base recipe) the offending key came from, or ``"--set"`` for a
    command-line override (then ``line`` is the 1-based index of that ``--set``). ``path`` is the
    dotted key path (``stages.sft.optimizer.lr``; list items as ``[i]``), empty for YAML syntax errors.
    """

    file: str
    line: int
    col: int
    path: str
    message: str
    severity: str = "error"  # or "warning": reported, but the recipe is still valid

    def __str__(self) -> str:
        from llmlab.secrets import mask_secrets

        where = f"{self.path}: " if self.path else ""
        return mask_secrets(f"{self.file}:{self.line}:{self.col}: {self.severity}: {where}{self.message}")

    def to_dict(self) -> dict:
        """The error as a JSON-serialisable dict (secret values masked, as in ``str``); without
        ``severity``, which the list holding it (errors or warnings) already says."""
        from llmlab.secrets import mask_secrets

        fields = asdict(self)
        del fields["severity"]
        return mask_secrets(fields)


def dotted(path: tuple) -> str:
    """``('stages', 'sft', 'lr')`` → ``'stages.sft.lr'``; integers become ``[i]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
