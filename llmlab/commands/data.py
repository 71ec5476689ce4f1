"""The data commands: ``prepare`` (tokenise ahead of training) and ``cache`` (list or prune the token
stores)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llmlab.commands.options import ADOPT_HELP, OUTPUT_DIR_HELP, SET_HELP


def prepare(
    recipe: Path = typer.Argument(..., help="Recipe file."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help=OUTPUT_DIR_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    stage: Optional[str] = typer.Option(None, "--stage", help="Prepare only this stage's data."),
    processes: Optional[int] = typer.Option(None, "--processes", help="Tokenising processes (default: all cores)."),
    verify: bool = typer.Option(False, "--verify", help="Hash every token-store shard again against the sha256 in its manifest, whatever its verification record says (without it a shard is hashed once, on its first read, and then trusted while its size, times and inode are unchanged)."),
    adopt: bool = typer.Option(False, "--adopt", help=ADOPT_HELP),
):
    """Tokenise the data of every stage ahead of training (idempotent, resumable after a kill)."""
    raise typer.Exit(prepare_command(recipe, output_dir=output_dir, overrides=set_, stage=stage, processes=processes,
                                     verify=verify, adopt=adopt))


def prepare_command(recipe_path: Path, output_dir: Path | None = None, overrides=(), stage: str | None = None,
                    processes: int | None = None, verify: bool = False, adopt: bool = False) -> int:
    """``llmlab prepare``: tokenise what a recipe's stages need before training
    (:mod:`llmlab.data.prepare`), with the run's tokenizer trained or loaded as ``llmlab run`` does.

    Returns 0 when everything is prepared (and, with ``verify``, every store shard matches its
    sha256), 1 on an invalid recipe, bad data, a damaged store, a full disk (named), an
    ``output_dir`` holding files llmlab did not write (unless ``adopt``: see ``llmlab run --adopt``)
    or one in use by another ``llmlab run`` or ``prepare`` (its run lock,
    :func:`llmlab.runguard.run_lock`, is held for the whole prepare: the tokenizer is written there)."""
    import logging

    from rich.table import Table

    from llmlab.commands.run import quiet_libraries
    from llmlab.console import make_console
    from llmlab.data.prepare import prepare_stages
    from llmlab.ownership import NotOwnedError, check_run_dir
    from llmlab.recipe import load_for_command
    from llmlab.runguard import RunLockedError, run_lock
    from llmlab.runner import Runner

    console = make_console()
    rec = load_for_command(recipe_path, overrides, output_dir, console)
    if rec is None:
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        runner = Runner(rec, console)
        check_run_dir(runner.out, runner.order, adopt)  # before the lock file: refuse a user's folder untouched
        # the run directory's lock, as `llmlab run` holds it: one prepare or run writes its tokenizer at a time
        with run_lock(runner.out, announce=lambda msg: console.print(msg, style="yellow")):
            runner.claim_output_dir(adopt)
            tokenizer, _ = runner.ensure_tokenizer()
            rows = prepare_stages(rec, tokenizer, [stage] if stage else None, processes=processes, progress=True,
                                  verify=verify)
    except (KeyError, ValueError, OSError, NotOwnedError, RunLockedError) as e:  # a damaged store's StoreError
        # is a ValueError; an unreachable hub dataset's HubUnreachableError a ConnectionError (an OSError);
        # RunLockedError: another prepare or run holds the folder (its pid and command are named)
        console.print(f"error: {e}", style="red", markup=False, highlight=False)
        return 1
    t = Table(title=f"llmlab prepare → {runner.out}")
    for col in ("stage", "dataset", "split", "documents / examples", "tokens", "time", "store"):
        t.add_column(col)
    for row in rows:
        t.add_row(row["stage"], row["dataset"], row["split"], f"{row['documents']:,}",
                  "-" if row["tokens"] is None else f"{row['tokens']:,}", f"{row['seconds']:.1f} s",
                  row["store"] or "cache/")
    console.print(t)
    return 0


def cache(
    target: Path = typer.Argument(..., help="A recipe (its token-store root) or a store-root folder."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help=OUTPUT_DIR_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    prune: bool = typer.Option(False, "--prune", help="Delete stores unused for more than --unused-days (never the recipe's own, never one being written, never a folder that is not a token store)."),
    unused_days: float = typer.Option(30.0, "--unused-days", help="With --prune: days since a store was last opened."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --prune: only list what would be deleted."),
):
    """List the token stores of a store root (size, tokens, last use); --prune deletes old ones."""
    from llmlab.cache import cache_command

    raise typer.Exit(cache_command(target, output_dir=output_dir, overrides=set_, prune=prune,
                                   unused_days=unused_days, dry_run=dry_run))
