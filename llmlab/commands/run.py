"""``llmlab run``: load the recipe, take the run directory's lock, run the stages
(:class:`llmlab.runner.Runner`), print the summary table; every failure becomes a message and an
exit status."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import List, Optional

import typer

from llmlab.commands.options import ADOPT_HELP, OUTPUT_DIR_HELP, SET_HELP


def run(
    recipe: Path = typer.Argument(..., help="Recipe file."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help=OUTPUT_DIR_HELP),
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
    raise typer.Exit(run_command(recipe, output_dir=output_dir, overrides=set_, only=only, from_stage=from_,
                                 until=until, force=force, reset_optimizer=reset_optimizer, allow_code=allow_code,
                                 adopt=adopt))


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars; llmlab draws one bar per stage."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _write_error_log(out: Path) -> Path:
    """Write the current exception's traceback to ``out/error.log``, or to a temporary file when
    ``out`` cannot be written (the failure may be that very directory); returns where it went."""
    import tempfile
    import traceback

    from llmlab.layout import RunLayout
    from llmlab.secrets import mask_secrets

    text = mask_secrets(traceback.format_exc())
    try:
        out.mkdir(parents=True, exist_ok=True)
        RunLayout(out).error_log.write_text(text)
        return RunLayout(out).error_log
    except OSError:
        fd, name = tempfile.mkstemp(prefix="llmlab-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return Path(name)


def _load(recipe_path: Path, overrides, allow_code: bool, console) -> dict | None:
    """The resolved recipe, its warnings printed; None after printing its errors."""
    from llmlab.recipe import load_recipe

    warnings: list = []
    resolved, errors = load_recipe(recipe_path, list(overrides), allow_code=bool(allow_code), warnings=warnings)
    for w in warnings:  # e.g. a warm-up that outlasts max_steps
        console.print(str(w), style="yellow", markup=False, highlight=False)
    if errors:
        for e in errors:
            console.print(str(e), markup=False, highlight=False)
        console.print(f"{len(errors)} error(s); nothing was run", style="red")
        return None
    return resolved


def run_command(recipe_path: Path, output_dir: Path | None = None, overrides=(), only=None, from_stage=None,
                until=None, force=False, reset_optimizer=False, allow_code=False, adopt=False) -> int:
    """``llmlab run``: returns the exit status (0 ok, 1 invalid recipe, failed stage or an
    ``output_dir`` that holds files llmlab did not write and ``adopt`` is not set; 130 interrupted).
    Error messages and ``error.log`` have secrets masked (:mod:`llmlab.secrets`)."""
    from llmlab.console import make_console, process_rank
    from llmlab.ownership import NotOwnedError, check_run_dir
    from llmlab.run_summary import summary_table
    from llmlab.runguard import RunLockedError, run_lock
    from llmlab.runner import RunError, Runner
    from llmlab.secrets import mask_secrets

    rank = process_rank()
    # under torchrun / accelerate launch only rank 0 reports; every rank reports its own failure
    console = make_console(quiet=rank != 0)
    alarm = make_console() if rank != 0 else console
    prefix = f"[rank {rank}] " if rank != 0 else ""

    def fail(message: str) -> int:
        alarm.print(mask_secrets(f"{prefix}error: {message}"), style="red", markup=False, highlight=False)
        return 1

    t0 = time.perf_counter()
    resolved = _load(recipe_path, overrides, allow_code, console)
    if resolved is None:
        return 1
    if output_dir is not None:
        resolved["output_dir"] = str(Path(output_dir).resolve())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    runner = Runner(resolved, console, allow_code=allow_code)
    from llmlab.train.loop import TrainingError

    try:
        check_run_dir(runner.out, runner.order, adopt)  # before the lock file: refuse a user's folder untouched
        with run_lock(runner.out, announce=lambda msg: console.print(msg, style="yellow")):
            outcomes = runner.run(only=only, from_stage=from_stage, until=until, force=force,
                                  reset_optimizer=reset_optimizer, adopt=adopt)
    except RunLockedError as e:  # before the generic handler: never write error.log into another run's dir
        return fail(str(e))
    except (RunError, TrainingError, NotOwnedError, ValueError) as e:
        return fail(str(e))
    except OSError as e:  # read-only mount, full disk, output_dir that is a file, missing file ...
        what = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        return fail(f"{what}; finished stages and checkpoints are kept")
    except Exception as e:  # anything else: say what and where, keep the traceback for a bug report
        log_path = _write_error_log(runner.out)
        return fail(f"{type(e).__name__}: {e}\n(traceback in {log_path}; finished stages and checkpoints are kept)")
    except KeyboardInterrupt:
        console.print("interrupted; finished stages and checkpoints are kept. Run the same command to resume.",
                      style="yellow")
        return 130
    console.print(summary_table(outcomes, runner.out))
    console.print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
