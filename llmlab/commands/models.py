"""The commands on a finished run or model: ``report``, ``merge``, ``export`` and ``push``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def report(
    run_dir: Path = typer.Argument(..., help="A run directory (the recipe's output_dir)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write (default RUN_DIR/report.png)."),
):
    """Draw the loss and eval curves of every stage to a PNG and print the summary table."""
    from llmlab.report import report_command

    raise typer.Exit(report_command(run_dir, output))


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


def export(
    model_dir: Path = typer.Argument(..., help="An llmlab model directory (a stage's final/)."),
    to: str = typer.Option(..., "--to", help="Target architecture: llama or mistral."),
    out_dir: Path = typer.Argument(..., help="Where to write the native checkpoint."),
):
    """Export an llmlab Transformer to a native Llama or Mistral checkpoint when its components match."""
    from llmlab.models.export import export_command

    raise typer.Exit(export_command(model_dir, to, out_dir))


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
    from llmlab.ownership import NotOwnedError
    from llmlab.push import PushError, push as push_final

    try:
        where = push_final(target, repo, stage=stage, private=private, revision=revision, license=license,
                           dry_run=dry_run)
    except (FileNotFoundError, ValueError, NotOwnedError, PushError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote what would be pushed to {repo} into {where}" if dry_run is not None
               else f"pushed to {repo}: {where}")
