"""How long `llmlab validate` takes, and how much a CI job must install for it.

    python benchmarks/validate_speed.py [RECIPE_OR_DIR ...] [--runs N]

Reports the minimum over N runs of the wall time and of the CPU time (user + system) (the minimum,
not the median: on a shared CPU every other process only adds time, so the minimum is the best
estimate of the command's own cost):
- cold: `python -m llmlab validate recipes/` (every shipped recipe, one process: what CI pays) and
  one recipe, next to a bare `python -c pass` and a `python -c "import torch"` for scale;
- warm: `load_recipe` of every recipe in this process once imports and the schema are cached;
- imports: the modules that a validate process imports, biggest first (`python -X importtime`);
- install: the installed size of llmlab's dependencies against the light CI set (README, "llmlab in CI").

llmlab's bytecode is compiled first (``compileall``; ``PYTHONDONTWRITEBYTECODE`` is dropped), as pip
does on install: otherwise every run also compiles llmlab's sources (~30 ms).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: what README's "llmlab in CI" job installs beside `pip install --no-deps llmlab`
LIGHT = ("pyyaml", "jsonschema", "packaging")


def _min_times(cmd: list[str], runs: int, env: dict) -> tuple[float, float]:
    """(wall, CPU: user + system) seconds of ``cmd``, each the minimum over ``runs`` runs. On a
    shared CPU the CPU time varies less than the wall time (waiting for a core is not counted)."""
    import resource

    walls, cpus = [], []
    for _ in range(runs):
        r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(t1 - t0)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return min(walls), min(cpus)


def _import_times(cmd: list[str], env: dict, top: int = 8) -> list[tuple[str, float]]:
    """(top-level package, seconds spent importing its modules: their self times summed) of a
    process, biggest first."""
    err = subprocess.run([sys.executable, "-X", "importtime", *cmd], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=False).stderr
    out: dict[str, float] = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            name = m.group(2).split(".")[0]
            out[name] = out.get(name, 0.0) + int(m.group(1)) / 1e6
    return sorted(out.items(), key=lambda kv: -kv[1])[:top]


def _installed_mib(names) -> tuple[int, float]:
    """(distributions, MiB on disk) of ``names`` and everything they require (markers for no extra)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    seen: dict = {}
    stack = list(names)
    while stack:
        key = re.sub(r"[-_.]+", "-", stack.pop()).lower()
        if key in seen:
            continue
        try:
            seen[key] = dist = md.distribution(key)
        except md.PackageNotFoundError:
            continue
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    size = 0
    for dist in seen.values():
        for f in dist.files or []:
            try:
                size += os.path.getsize(dist.locate_file(f))
            except OSError:
                pass
    return len(seen), size / 2**20


def main() -> int:
    """Run the benchmark and print a small table. Returns 0."""
    import tomllib

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", default=["recipes/"])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed llmlab has its bytecode compiled: not timed
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "llmlab")], env=env, check=False)

    from llmlab.recipe.api import load_recipe
    from llmlab.recipe.cli_support import expand_paths

    validate = ["-m", "llmlab", "validate", *args.recipes]
    one = ["-m", "llmlab", "validate", "recipes/quickstart.yaml"]
    print(f"min of {args.runs} runs; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (shared: noisy)")
    print(f"{'what':58s} {'wall s':>9s} {'CPU s':>9s}")
    for label, cmd in (("python -c pass", ["-c", "pass"]), ('python -c "import torch"', ["-c", "import torch"]),
                       (f"llmlab validate {' '.join(args.recipes)} (cold)", validate),
                       ("llmlab validate recipes/quickstart.yaml (cold)", one)):
        wall, cpu = _min_times([sys.executable, *cmd], args.runs, env)
        print(f"{label:58s} {wall:9.3f} {cpu:9.3f}")
    files, _, _ = expand_paths(args.recipes)
    for f in files:
        load_recipe(f)  # warm the caches
    warm, warm_cpu = [], []
    for _ in range(args.runs):
        t0, c0 = time.perf_counter(), time.process_time()
        for f in files:
            load_recipe(f)
        warm.append(time.perf_counter() - t0)
        warm_cpu.append(time.process_time() - c0)
    print(f"{f'load_recipe x {len(files)} (warm, in process)':58s} {min(warm):9.3f} {min(warm_cpu):9.3f}")
    print("imports of a validate process (s per package, self times summed, one run):")
    for name, secs in _import_times(validate, env):
        print(f"  {name:56s} {secs:9.3f}")
    deps = [re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0]
            for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    for label, names in (("llmlab's dependencies", deps), (f"light CI set ({', '.join(LIGHT)})", LIGHT)):
        n, mib = _installed_mib(names)
        print(f"install: {label:49s} {n:3d} packages {mib:8.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
