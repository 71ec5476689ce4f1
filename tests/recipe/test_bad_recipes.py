"""Every broken recipe in tests/recipes/bad/ gives its expected error on its expected line.

Each file starts with ``# expect: LINE: FRAGMENT``: some error must be on LINE of that file and
contain FRAGMENT.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmlab.recipe import load_recipe

BAD = Path(__file__).resolve().parents[1] / "recipes" / "bad"
CASES = sorted(BAD.glob("*.yaml"))
_EXPECT = re.compile(r"^# expect: (\d+): (.+)$")


def _expectation(path: Path) -> tuple[int, str]:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    m = _EXPECT.match(first)
    assert m, f"{path.name}: first line must be '# expect: LINE: FRAGMENT'"
    return int(m.group(1)), m.group(2).strip()


def test_there_are_enough_bad_recipes():
    assert len(CASES) >= 40


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_recipe_reports_expected_error(path):
    line, fragment = _expectation(path)
    resolved, errors = load_recipe(path, env={})
    assert resolved is None
    assert errors, f"{path.name}: expected an error, got none"
    rendered = [str(e) for e in errors]
    matching = [e for e in errors if fragment in e.message or fragment in str(e)]
    assert matching, f"{path.name}: no error contains {fragment!r}; got:\n" + "\n".join(rendered)
    assert any(e.line == line for e in matching), (
        f"{path.name}: {fragment!r} reported on line(s) {[e.line for e in matching]}, expected {line}:\n" + "\n".join(rendered))
    assert all(e.file == str(path) for e in matching)
    for s in rendered:
        assert re.match(r"^.+:\d+:\d+: error: ", s), s
