"""Helpers for scripts/test-latest: the lock file (constraints.txt), the floors, the versions.

    python scripts/lock.py freeze     # constraints.txt content from the active environment
    python scripts/lock.py floors     # the ">=" floors of the Hugging Face stack, pinned
    python scripts/lock.py versions   # the versions of the packages that matter, one per line

Uses only the standard library (tomllib, importlib.metadata) and pip's own ``pip freeze``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the packages whose new releases most often break llmlab; printed by ``versions``
WATCHED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers",
           "safetensors", "huggingface_hub", "pytorch_optimizer", "numpy")

HEADER = """\
# The exact package versions llmlab's test suite last passed with (Python 3.11, CPU torch).
# Used by the README's set-up commands and .ci/run: pip install ... -c constraints.txt
# Refresh it only through `scripts/test-latest --write-lock` (newest releases, whole suite green).
"""


def freeze() -> str:
    """constraints.txt text: ``pip freeze`` of this environment without llmlab itself, local
    version labels dropped (``torch==2.13.0`` also admits a CUDA build of the same release)."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    lines = []
    for line in out.splitlines():
        if not line or line.startswith("#") or line.lower().startswith("llmlab"):
            continue
        lines.append(re.sub(r"\+[A-Za-z0-9.]+$", "", line))
    return HEADER + "\n".join(sorted(lines, key=str.lower)) + "\n"


#: the Hugging Face stack whose floors ``floors`` pins (the rest resolves to what those allow)
FLOOR_PACKAGES = ("transformers", "peft", "trl", "accelerate", "datasets")


def floors() -> str:
    """``name==floor`` for each of :data:`FLOOR_PACKAGES`, read from the ``>=`` floor that
    pyproject.toml declares (main dependencies or the ``test`` extra).

    Raises:
        SystemExit: a watched package has no ``>=`` floor in pyproject.toml.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    found = {}
    for req in reqs:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*.*?>=\s*([0-9][^,;\s]*)", req)
        if m:
            found[m.group(1).lower()] = m.group(3)
    missing = [name for name in FLOOR_PACKAGES if name not in found]
    if missing:
        raise SystemExit(f"pyproject.toml declares no '>=' floor for {', '.join(missing)}")
    return "".join(f"{name}=={found[name]}\n" for name in FLOOR_PACKAGES)


def versions() -> str:
    """``name version`` for each watched package installed here."""
    rows = []
    for name in WATCHED:
        try:
            rows.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            rows.append(f"{name} (not installed)")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    commands = {"freeze": freeze, "floors": floors, "versions": versions}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python scripts/lock.py {{{'|'.join(commands)}}}")
    sys.stdout.write(commands[sys.argv[1]]())
