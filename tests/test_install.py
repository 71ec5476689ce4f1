"""The set-up promises: README's commands, .ci/run, the lock file and pyproject's ranges agree."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [line for line in re.findall(r"```bash\n(.*?)```", text, re.S)[0:2] for line in [line.strip()]]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _requirements(extras=("test",)) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_ci_runs_the_readme_test_command_through_the_lock():
    install_and_run, install_and_test = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()
    for command in (install_and_run, install_and_test):
        # torch first (the CPU build), then llmlab; both through the lock file
        assert command.index("pip install torch==") < command.index("pip install -e")
        assert command.count("-c constraints.txt") == 2, command
    assert "llmlab run recipes/quickstart.yaml" in install_and_run
    assert install_and_test.endswith("python -m pytest -q")


def test_lock_pins_every_dependency_within_pyprojects_ranges():
    pins = _lock()
    for req in _requirements(extras=("test",)):
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's '{req.specifier}'"
        )
    readme_torch = re.search(r"pip install torch==([0-9.]+)", _readme_commands()[1]).group(1)
    assert pins["torch"] == readme_torch


def test_hugging_face_stack_is_capped_below_its_next_major():
    """Each range admits the locked (tested) release and stops before the next major one (for a
    0.x package, before 1.0)."""
    pins = _lock()
    reqs = [r for r in _requirements(extras=("test", "bench"))
            if r.name.lower() in ("transformers", "peft", "trl", "accelerate", "datasets")]
    assert {r.name.lower() for r in reqs} == {"transformers", "peft", "trl", "accelerate", "datasets"}
    for req in reqs:
        locked = Version(pins[req.name.lower()])
        next_major = Version(f"{locked.major + 1}")
        assert req.specifier.contains(locked), f"{req.name} '{req.specifier}' excludes the locked {locked}"
        assert not req.specifier.contains(next_major), f"{req.name} '{req.specifier}' admits {next_major}"


def test_lock_script_floors_and_freeze():
    floors = subprocess.run([sys.executable, str(ROOT / "scripts" / "lock.py"), "floors"],
                            check=True, capture_output=True, text=True).stdout.split()
    assert [f.split("==")[0] for f in floors] == ["transformers", "peft", "trl", "accelerate", "datasets"]
    reqs = {r.name.lower(): r for r in _requirements()}
    for pin in floors:
        name, version = pin.split("==")
        assert reqs[name].specifier.contains(Version(version)), pin
    frozen = subprocess.run([sys.executable, str(ROOT / "scripts" / "lock.py"), "freeze"],
                            check=True, capture_output=True, text=True).stdout
    assert "llmlab" not in frozen.lower().replace("llmlab's", "")
    assert re.search(r"^torch==[0-9.]+$", frozen, re.M), "local version label (+cpu) must be dropped"
