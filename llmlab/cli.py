"""The ``llmlab`` command line.

Each command imports its heavy modules inside its body, so ``llmlab validate`` and ``llmlab schema``
never import torch or transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="llmlab",
    help="Train a language model from scratch through pretraining, SFT and preference alignment "
    "from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SET_HELP = "Override a recipe key, e.g. --set stages.sft.optimizer.lr=1e-5 (repeatable)."


@app.command()
def validate(
    recipes: List[Path] = typer.Argument(..., help="Recipe files to check."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    format: str = typer.Option("text", "--format", help="Output format: text or json."),
):
    """Check recipes against the schema and the semantic rules; print every error at once.

    Exit status: 0 valid, 1 invalid, 2 usage error.
    """
    from llmlab.recipe.cli_support import validate_command

    raise typer.Exit(validate_command(recipes, set_, format))


@app.command()
def schema():
    """Print the recipe JSON Schema."""
    from llmlab.recipe.cli_support import schema_command

    raise typer.Exit(schema_command())


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe file."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Run directory (default: the recipe's output_dir)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    resolved: bool = typer.Option(False, "--resolved", help="Print the fully resolved recipe instead of the table."),
):
    """Show the stage graph without training: sizes, mixtures, tokens, memory and the status of each stage."""
    from llmlab.plan import plan_command

    raise typer.Exit(plan_command(recipe, output_dir=output_dir, overrides=set_, resolved=resolved))


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe file."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Run directory (default: the recipe's output_dir)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    only: Optional[str] = typer.Option(None, "--only", help="Run only this stage."),
    from_: Optional[str] = typer.Option(None, "--from", help="Rerun this stage and everything downstream."),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage."),
    force: bool = typer.Option(False, "--force", help="Rerun every selected stage, even finished ones."),
    reset_optimizer: bool = typer.Option(False, "--reset-optimizer", help="On resume, load the weights only."),
    allow_code: bool = typer.Option(False, "--allow-code", help="Allow the recipe to run Python code (reward functions, trust_remote_code)."),
):
    """Run a recipe: skip finished stages, resume a partial one, start the rest."""
    from llmlab.runner import run_command

    raise typer.Exit(run_command(recipe, output_dir=output_dir, overrides=set_, only=only, from_stage=from_,
                                 until=until, force=force, reset_optimizer=reset_optimizer, allow_code=allow_code))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
