"""``llmlab cache``: list the token stores of a store root, and prune those unused for long."""

from __future__ import annotations

import time
from pathlib import Path


def cache_command(target: Path, output_dir: Path | None = None, overrides=(), prune: bool = False,
                  unused_days: float = 30.0, dry_run: bool = False) -> int:
    """``llmlab cache``: ``target`` is a recipe (its store root; its own current stores are never
    pruned) or a store-root folder. Prints one row per store; with ``prune``, deletes those last
    used more than ``unused_days`` days ago. Returns 0, or 1 for an invalid recipe or a missing
    folder."""
    from rich.table import Table

    from llmlab.console import make_console
    from llmlab.data.store_admin import list_stores, prune_stores, recipe_store_keys
    from llmlab.plan import fmt_bytes

    console = make_console()
    keep: set[str] = set()
    if target.is_file():
        from llmlab.data.store import store_root
        from llmlab.recipe import load_for_command

        rec = load_for_command(target, overrides, output_dir, console)
        if rec is None:
            return 1
        root, keep = store_root(rec), recipe_store_keys(rec)
    elif target.is_dir():
        root = target
    else:
        console.print(f"error: {target}: neither a recipe file nor a store folder", style="red",
                      markup=False, highlight=False)
        return 1
    entries = list_stores(root)
    now = time.time()
    t = Table(title=f"token stores in {root}")
    for col in ("store", "dataset", "split", "documents", "tokens", "size", "last used", "recipe"):
        t.add_column(col)
    for e in entries:
        key = e.path.name.removesuffix(".partial")
        t.add_row(e.path.name[:12] + ("… (partial)" if not e.complete else "…"), e.dataset or "-", e.split or "-",
                  "-" if e.documents is None else f"{e.documents:,}", "-" if e.tokens is None else f"{e.tokens:,}",
                  fmt_bytes(e.bytes), f"{(now - e.last_used) / 86400:.1f} days ago", "reads it" if key in keep else "")
    console.print(t)
    total = sum(e.bytes for e in entries)
    console.print(f"{len(entries)} folders, {fmt_bytes(total)}")
    others = [d.name for d in sorted(root.iterdir()) if d.is_dir() and d not in {e.path for e in entries}] \
        if root.is_dir() else []
    if others:
        console.print(f"{len(others)} other folder(s) in {root} are not token stores and are left alone: "
                      f"{', '.join(others[:8])}", markup=False, highlight=False)
    if prune:
        gone = prune_stores(root, unused_days, keep=keep, dry_run=dry_run)
        verb = "would delete" if dry_run else "deleted"
        console.print(f"{verb} {len(gone)} folders unused for more than {unused_days:g} days "
                      f"({fmt_bytes(sum(e.bytes for e in gone))})", markup=False, highlight=False)
        for e in gone:
            console.print(f"  {e.path}", markup=False, highlight=False)
    return 0
