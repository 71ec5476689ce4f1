"""``llmlab prepare``: tokenise what a recipe's stages need before training (see
:mod:`llmlab.data.prepare`), with the run's tokenizer trained or loaded as ``llmlab run`` does."""

from __future__ import annotations

from pathlib import Path


def prepare_command(recipe_path: Path, output_dir: Path | None = None, overrides=(), stage: str | None = None,
                    processes: int | None = None, verify: bool = False, adopt: bool = False) -> int:
    """``llmlab prepare``: returns 0 when everything is prepared (and, with ``verify``, every store
    shard matches its sha256), 1 on an invalid recipe, bad data, a damaged store, a full disk (named),
    an ``output_dir`` holding files llmlab did not write (unless ``adopt``: see ``llmlab run --adopt``)
    or one in use by another ``llmlab run`` or ``prepare`` (its run lock, :func:`llmlab.runguard.run_lock`,
    is held for the whole prepare: the tokenizer is written there)."""
    import logging

    from rich.table import Table

    from llmlab.console import make_console
    from llmlab.data.prepare import prepare_stages
    from llmlab.ownership import NotOwnedError, check_run_dir
    from llmlab.recipe import load_for_command
    from llmlab.runguard import RunLockedError, run_lock
    from llmlab.runner import Runner, quiet_libraries

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
    t = Table(title=f"llmlab prepare → {rec['output_dir']}")
    for col in ("stage", "dataset", "split", "documents / examples", "tokens", "time", "store"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["stage"], r["dataset"], r["split"], f"{r['documents']:,}",
                  "-" if r["tokens"] is None else f"{r['tokens']:,}", f"{r['seconds']:.1f} s", r["store"] or "cache/")
    console.print(t)
    return 0
