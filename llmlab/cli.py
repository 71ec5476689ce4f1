"""The ``llmlab`` command line: the typer app, assembled from :mod:`llmlab.commands`.

Each command imports its heavy modules inside its body, so ``llmlab validate`` and ``llmlab schema``
never import torch or transformers. The console script is :func:`llmlab.__main__.main`, which answers
``llmlab validate`` and ``llmlab --version`` before this module (and typer, which loads pydantic and
click, ~0.2 s) is imported; the ``validate`` command here only forwards its raw arguments.
"""

from __future__ import annotations

import typer

from llmlab.commands import register_commands

app = typer.Typer(
    name="llmlab",
    help="Train a language model from scratch through pretraining, SFT and preference alignment "
    "from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from llmlab import __version__

        typer.echo(f"llmlab {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print llmlab's version and exit.")):
    """Options before the command (the app's help is the Typer(help=...) above)."""


register_commands(app)


def main() -> None:
    """Entry point of ``python -m llmlab.cli`` (every command through typer; the console script is
    :func:`llmlab.__main__.main`)."""
    app()


if __name__ == "__main__":
    main()
