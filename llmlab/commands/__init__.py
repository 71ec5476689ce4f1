"""The ``llmlab`` command line: one typer function per command, grouped by what it works on.

=====================  ==============================================================
module                 commands
=====================  ==============================================================
``commands.recipe``    ``validate``, ``schema``, ``plan``  (read a recipe, train nothing)
``commands.run``       ``run``
``commands.data``      ``prepare``, ``cache``
``commands.models``    ``report``, ``merge``, ``export``, ``push``
``commands.inference`` ``chat``, ``generate``, ``eval``, ``serve``
=====================  ==============================================================

A command parses its options and prints; the work is done by the domain modules (the runner, the
planner, :mod:`llmlab.inference`, ...), which each command imports inside its body, so importing
this package loads typer only and ``llmlab validate`` / ``llmlab schema`` never import torch.
:mod:`llmlab.cli` assembles the app with :func:`register_commands`.
"""

from __future__ import annotations


def register_commands(app) -> None:
    """Add every ``llmlab`` command to the typer ``app``, in the order ``llmlab --help`` lists them."""
    from llmlab.commands import data, inference, models, recipe, run

    app.command(**recipe.VALIDATE_SETTINGS)(recipe.validate)
    for fn in (recipe.schema, recipe.plan, run.run, data.prepare, data.cache, models.report, models.merge,
               models.export, models.push, inference.chat, inference.generate):
        app.command()(fn)
    app.command("eval")(inference.eval_)
    app.command()(inference.serve)
