"""A recipe from someone else is untrusted: hostile YAML gets a clear, located error, fast."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from llmlab.recipe import load_recipe
from llmlab.recipe.yamlload import MAX_DEPTH, MAX_RECIPE_BYTES, MAX_VALUES

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def _errors(path: Path):
    resolved, errors = load_recipe(path, env={})
    assert resolved is None and errors
    return errors


def test_billion_laughs_is_refused_quickly_with_bounded_memory(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append("name: bomb")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    errors = _errors(bomb)
    elapsed = time.perf_counter() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert any(f"more than {MAX_VALUES:,} values" in e.message for e in errors), errors
    # the fully expanded document would hold 10^10 strings; the bound stops it near 10^5
    assert elapsed < 10, elapsed
    assert grown_mb < 200, grown_mb


def test_deep_nesting_is_refused_at_its_line(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: deep\nx: " + "[" * 10_000 + "]" * 10_000 + "\n")
    errors = _errors(deep)
    assert len(errors) == 1 and errors[0].line == 2, errors
    assert f"more than {MAX_DEPTH} levels" in errors[0].message
    block = tmp_path / "block.yaml"  # block style, too: each level a mapping indented further
    block.write_text("name: deep\n" + "".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n")
    errors = _errors(block)
    assert errors[0].line == MAX_DEPTH + 2 and "levels deep" in errors[0].message, errors


def test_nul_byte_is_located(tmp_path):
    bad = tmp_path / "nul.yaml"
    bad.write_text("name: x\nseed: 1\ndescription: a\x00b\n")
    errors = _errors(bad)
    assert (errors[0].line, errors[0].col) == (3, 15), errors
    assert "U+0000" in errors[0].message


def test_non_utf8_is_located(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: x\nseed: 1\ndescription: caf\xe9\n")
    errors = _errors(bad)
    assert (errors[0].line, errors[0].col) == (3, 17), errors
    assert "0xe9 is not valid UTF-8" in errors[0].message


def test_oversized_recipe_is_refused_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    text = QUICKSTART.read_text()
    big.write_text(text + "#" * (MAX_RECIPE_BYTES + 1) + "\n")
    errors = _errors(big)
    assert "recipes are limited to" in errors[0].message and errors[0].line == 1


def test_ordinary_aliases_still_work(tmp_path):
    # a recipe using an anchor for a shared optimizer block stays valid: the bounds are far above real use
    text = QUICKSTART.read_text()
    assert load_recipe(QUICKSTART, env={})[1] == []
    ok = tmp_path / "ok.yaml"
    ok.write_text(text)
    resolved, errors = load_recipe(ok, env={})
    assert errors == [] and resolved["name"]


@pytest.mark.parametrize("n", [MAX_DEPTH - 2])
def test_nesting_within_the_bound_is_not_refused_for_depth(tmp_path, n):
    ok = tmp_path / "nest.yaml"
    ok.write_text("name: x\nx: " + "[" * n + "]" * n + "\n")
    errors = _errors(ok)  # invalid as a recipe, but not because of its depth
    assert not any("levels deep" in e.message for e in errors), errors
