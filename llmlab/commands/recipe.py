"""The commands that read a recipe without training: ``validate``, ``schema`` and ``plan``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from llmlab.commands.options import OUTPUT_DIR_HELP, SET_HELP


def validate(ctx: typer.Context):
    """Check recipes, directories of recipes or globs for CI: every error at once, as text, json,
    GitHub annotations or SARIF (llmlab validate --help).

    Exit status: 0 valid, 1 invalid, 2 usage error. Its options are parsed by argparse in
    :func:`llmlab.recipe.cli_support.validate_main` (llmlab.__main__.main calls it before typer loads).
    """
    from llmlab.recipe.cli_support import validate_main

    raise typer.Exit(validate_main(list(ctx.args)))


#: ``validate`` forwards its raw arguments to argparse
VALIDATE_SETTINGS = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True,
                                          "help_option_names": []}, "add_help_option": False}


def schema():
    """Print the recipe JSON Schema."""
    from llmlab.recipe.cli_support import schema_command

    raise typer.Exit(schema_command())


def plan(
    recipe: Path = typer.Argument(..., help="Recipe file."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help=OUTPUT_DIR_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    resolved: bool = typer.Option(False, "--resolved", help="Print the fully resolved recipe instead of the table."),
    world_size: Optional[int] = typer.Option(None, "--world-size", "--nproc", min=1,
                                             help="Processes that will train together (default: $WORLD_SIZE, else 1): "
                                                  "tokens per step count all of them, memory is per device."),
):
    """Show the stage graph without training: sizes, mixtures, tokens, memory and the status of each stage."""
    raise typer.Exit(plan_command(recipe, output_dir=output_dir, overrides=set_, resolved=resolved,
                                  world_size=world_size))


def _stage_table(rows: list[dict]):
    """One row per stage: type, from, data shares, steps, tokens, trainable parameters, memory, status."""
    from rich.table import Table

    from llmlab.plan import _fmt_count, fmt_bytes

    t = Table()
    for col in ("stage", "type", "from", "datasets (share)", "steps", "tokens", "tokens/step", "trainable",
                "memory est. per device", "tokens/param (Chinchilla 20)", "status"):
        t.add_column(col)
    for row in rows:
        shares = ", ".join(f"{k} {v:.0f}%" for k, v in row["datasets"].items())
        status = row["status"] + (f" ({row['status_detail']})" if row["status_detail"] else "")
        steps = str(row["steps"]) + (f" ({row['epochs']:g} epochs)" if row.get("epochs") is not None else "")
        t.add_row(row["stage"], row["type"], row["from"], shares, steps, _fmt_count(row["tokens"]),
                  _fmt_count(row["tokens_per_step"]), _fmt_count(row["trainable"]), fmt_bytes(row["memory_bytes"]),
                  "-" if row["tokens_per_param"] is None else f"{row['tokens_per_param']:.1f}", status)
    return t


def _data_table(ds_rows: list[dict]):
    """Pretraining data: what the token stores hold once prepared (llmlab prepare)."""
    from rich.table import Table

    from llmlab.plan import _fmt_count

    d = Table(title="pretraining data")
    for col in ("stage", "dataset", "documents", "tokens", "epochs seen"):
        d.add_column(col)
    for row in ds_rows:
        d.add_row(row["stage"], row["dataset"], "not prepared" if row["documents"] is None else f"{row['documents']:,}",
                  "-" if row["tokens"] is None else _fmt_count(row["tokens"]),
                  "-" if row["epochs"] is None else f"{row['epochs']:.2f}")
    return d


def plan_command(recipe_path: Path, output_dir: Path | None = None, overrides=(), resolved: bool = False,
                 fmt: str = "text", world_size: int | None = None) -> int:
    """``llmlab plan``: print the table (or the resolved recipe); 0 ok, 1 invalid recipe.

    ``world_size``: processes to plan for (None: :func:`llmlab.plan.default_world_size`)."""
    from llmlab.console import make_console
    from llmlab.data.prepare import dataset_plan
    from llmlab.plan import _exactness, _fmt_count, as_run_plan, default_world_size, memory_table, plan_rows, world_line
    from llmlab.recipe import dump_resolved, load_for_command
    from llmlab.runplan import PretrainedSpec

    console = make_console()
    world_size = world_size or default_world_size()
    rec = load_for_command(recipe_path, overrides, output_dir, console, world_size=world_size)
    if rec is None:
        return 1
    if resolved:
        print(dump_resolved(rec), end="")
        return 0
    run = as_run_plan(rec, fresh=True)  # statuses and fingerprints follow the data files as they are now
    rows, facts = plan_rows(run, world_size)
    if fmt == "json":
        print(json.dumps({"rows": rows, **facts, "datasets": dataset_plan(rec, rows)}, indent=2))
        return 0
    model = run.model
    arch = f"from_pretrained {model.from_pretrained}" if isinstance(model, PretrainedSpec) else model.arch
    name, out = run.settings.name, run.settings.output_dir
    console.print(f"[bold]{name}[/]: {arch}, {_fmt_count(facts['params'])} parameters "
                  f"({_exactness(run, facts)}), vocab {facts['vocab_size']}, run dir {out}")
    console.print(world_line(facts))
    if facts["tokenizer"] == "changed":
        console.print("[yellow]the tokenizer in the run directory was trained from a different tokenizer section or "
                      "data: `llmlab run` retrains it and then every stage. To keep the finished run, restore the "
                      "recipe's tokenizer section (and its datasets) or give this recipe another output_dir.[/]")
    console.print(_stage_table(rows))
    from llmlab.recipe.optim_auto import auto_notes

    for note in auto_notes(rec):  # optimizer values that `lr: auto` chose
        console.print(note)
    mem = memory_table(rows, facts)
    if mem is not None:
        console.print(mem)
    ds_rows = dataset_plan(rec, rows)
    if ds_rows:
        console.print(_data_table(ds_rows))
    return 0
