"""The ``llmlab`` command line (the Typer app).

Each command imports its heavy modules inside its body, so ``llmlab validate`` and ``llmlab schema``
never import torch or transformers. The console script is :func:`llmlab.__main__.main`, which answers
``llmlab validate`` and ``llmlab --version`` before this module (and typer, which loads pydantic and
click, ~0.2 s) is imported; the ``validate`` command here only forwards its raw arguments.
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


def _version(value: bool) -> None:
    if value:
        from llmlab import __version__

        typer.echo(f"llmlab {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print llmlab's version and exit.")):
    """Options before the command (the app's help is the Typer(help=...) above)."""


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []}, add_help_option=False)
def validate(ctx: typer.Context):
    """Check recipes, directories of recipes or globs for CI: every error at once, as text, json,
    GitHub annotations or SARIF (llmlab validate --help).

    Exit status: 0 valid, 1 invalid, 2 usage error. Its options are parsed by argparse in
    :func:`llmlab.recipe.cli_support.validate_main` (llmlab.__main__.main calls it before typer loads).
    """
    from llmlab.recipe.cli_support import validate_main

    raise typer.Exit(validate_main(list(ctx.args)))


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
    world_size: Optional[int] = typer.Option(None, "--world-size", "--nproc", min=1,
                                             help="Processes that will train together (default: $WORLD_SIZE, else 1): "
                                                  "tokens per step count all of them, memory is per device."),
):
    """Show the stage graph without training: sizes, mixtures, tokens, memory and the status of each stage."""
    from llmlab.plan import plan_command

    raise typer.Exit(plan_command(recipe, output_dir=output_dir, overrides=set_, resolved=resolved,
                                  world_size=world_size))


ADOPT_HELP = ("Write into a non-empty output folder llmlab did not create; llmlab still never deletes or "
              "overwrites the files already there.")


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
    adopt: bool = typer.Option(False, "--adopt", help=ADOPT_HELP),
):
    """Run a recipe: skip finished stages, resume a partial one, start the rest.

    llmlab deletes or overwrites only what it wrote (a marker file in every folder it creates): a
    --force or a stale stage removes llmlab's files of that stage and keeps any other file."""
    from llmlab.runner import run_command

    raise typer.Exit(run_command(recipe, output_dir=output_dir, overrides=set_, only=only, from_stage=from_,
                                 until=until, force=force, reset_optimizer=reset_optimizer, allow_code=allow_code,
                                 adopt=adopt))


@app.command()
def prepare(
    recipe: Path = typer.Argument(..., help="Recipe file."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Run directory (default: the recipe's output_dir)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    stage: Optional[str] = typer.Option(None, "--stage", help="Prepare only this stage's data."),
    processes: Optional[int] = typer.Option(None, "--processes", help="Tokenising processes (default: all cores)."),
    verify: bool = typer.Option(False, "--verify", help="Also check every token-store shard against the sha256 in its manifest."),
    adopt: bool = typer.Option(False, "--adopt", help=ADOPT_HELP),
):
    """Tokenise the data of every stage ahead of training (idempotent, resumable after a kill)."""
    from llmlab.prepare import prepare_command

    raise typer.Exit(prepare_command(recipe, output_dir=output_dir, overrides=set_, stage=stage, processes=processes,
                                     verify=verify, adopt=adopt))


@app.command()
def cache(
    target: Path = typer.Argument(..., help="A recipe (its token-store root) or a store-root folder."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Run directory (default: the recipe's output_dir)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    prune: bool = typer.Option(False, "--prune", help="Delete stores unused for more than --unused-days (never the recipe's own, never one being written, never a folder that is not a token store)."),
    unused_days: float = typer.Option(30.0, "--unused-days", help="With --prune: days since a store was last opened."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --prune: only list what would be deleted."),
):
    """List the token stores of a store root (size, tokens, last use); --prune deletes old ones."""
    from llmlab.cache import cache_command

    raise typer.Exit(cache_command(target, output_dir=output_dir, overrides=set_, prune=prune,
                                   unused_days=unused_days, dry_run=dry_run))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (the recipe's output_dir)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write (default RUN_DIR/report.png)."),
):
    """Draw the loss and eval curves of every stage to a PNG and print the summary table."""
    from llmlab.report import report_command

    raise typer.Exit(report_command(run_dir, output))


@app.command()
def merge(
    adapter_dir: Path = typer.Argument(..., help="A PEFT adapter directory (a stage's adapter/)."),
    out_dir: Path = typer.Argument(..., help="Where to write the merged Hugging Face model."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model dir or hub id (default: from adapter_config.json)."),
    allow_code: bool = typer.Option(False, "--allow-code", help="Allow trust_remote_code for the base model."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT_DIR when an earlier llmlab merge wrote it "
                               "(a folder llmlab did not write is never overwritten)."),
):
    """Merge a LoRA adapter into its base model (merge_and_unload) and save the full model."""
    from llmlab.merge import merge_adapter
    from llmlab.ownership import NotOwnedError

    try:
        merge_adapter(adapter_dir, out_dir, base=base, allow_code=allow_code, force=force)
    except (OSError, ValueError, NotOwnedError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"merged model written to {out_dir}")


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="An llmlab model directory (a stage's final/)."),
    to: str = typer.Option(..., "--to", help="Target architecture: llama or mistral."),
    out_dir: Path = typer.Argument(..., help="Where to write the native checkpoint."),
):
    """Export an llmlab Transformer to a native Llama or Mistral checkpoint when its components match."""
    from llmlab.models.export import export_command

    raise typer.Exit(export_command(model_dir, to, out_dir))


@app.command()
def push(
    target: Path = typer.Argument(..., help="A run directory or a stage's final/ folder."),
    repo: str = typer.Option(..., "--repo", help="Hub repo id, owner/name (created when missing)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="With a run directory: the stage to push "
                                        "(default: the last stage with a final/)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created when missing)."),
    license: Optional[str] = typer.Option(None, "--license", help="The card's license, e.g. apache-2.0."),
    dry_run: Optional[Path] = typer.Option(None, "--dry-run", help="Write the folder that would be uploaded "
                                           "to this path instead; upload nothing."),
):
    """Upload a stage's final/ to the Hugging Face hub with a model card (recipe, stages, metrics)
    and the resolved recipe; the token is huggingface_hub's (HF_TOKEN or `hf auth login`)."""
    from llmlab.push import push_command

    raise typer.Exit(push_command(target, repo, stage=stage, private=private, revision=revision,
                                  license=license, dry_run=dry_run))


# chat, generate, eval, serve (llmlab/inference/commands.py imports only the standard library and typer)
from llmlab.inference.commands import register_commands  # noqa: E402

register_commands(app)


def main() -> None:
    """Entry point of ``python -m llmlab.cli`` (every command through typer; the console script is
    :func:`llmlab.__main__.main`)."""
    app()


if __name__ == "__main__":
    main()
