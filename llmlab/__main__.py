"""The ``llmlab`` console script (``llmlab = llmlab.__main__:main``; also ``python -m llmlab``).

Kept tiny so that a CI check pays for no more than it uses: ``llmlab validate`` and ``llmlab
--version`` import neither typer nor torch (see :mod:`llmlab.recipe.cli_support`); every other
command runs through the Typer app in :mod:`llmlab.cli`.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run the command in ``sys.argv``. ``llmlab validate ...`` and ``llmlab --version`` are answered
    without importing typer; everything else goes through :data:`llmlab.cli.app`.

    Raises:
        SystemExit: with the command's exit status.
    """
    argv = sys.argv[1:]
    if argv == ["--version"]:
        from llmlab import __version__

        print(f"llmlab {__version__}")
        raise SystemExit(0)
    if argv[:1] == ["validate"]:
        from llmlab.recipe.cli_support import validate_main

        raise SystemExit(validate_main(argv[1:]))
    from llmlab.cli import app

    app()


if __name__ == "__main__":
    main()
