"""How long `llmlab validate` takes, side by side with what it must stay well under.

    python benchmarks/validate_speed.py [RECIPE ...] [--runs N]

Reports, as medians over N runs:
- cold: `python -m llmlab.cli validate RECIPE` in a fresh interpreter (what CI pays), next to a bare
  `python -c pass` and a `python -c "import torch"` for scale;
- warm: `load_recipe(RECIPE)` in this process once imports and the schema are cached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_wall(cmd: list[str], runs: int, env: dict) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    """Run the benchmark and print a small table. Returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", default=[str(p) for p in sorted((ROOT / "recipes").glob("*.yaml"))])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    from llmlab.recipe import load_recipe

    bare = _median_wall([sys.executable, "-c", "pass"], args.runs, env)
    torch_import = _median_wall([sys.executable, "-c", "import torch"], args.runs, env)
    print(f"{'what':58s} {'median s':>9s}")
    print(f"{'python -c pass':58s} {bare:9.3f}")
    label = 'python -c "import torch"'
    print(f"{label:58s} {torch_import:9.3f}")
    for recipe in args.recipes:
        cold = _median_wall([sys.executable, "-m", "llmlab.cli", "validate", recipe], args.runs, env)
        load_recipe(recipe)  # warm the caches
        warm = []
        for _ in range(max(args.runs, 20)):
            t0 = time.perf_counter()
            _, errors = load_recipe(recipe)
            warm.append(time.perf_counter() - t0)
        name = Path(recipe).name
        status = "valid" if not errors else f"{len(errors)} errors"
        print(f"{'llmlab validate ' + name + ' (cold, ' + status + ')':58s} {cold:9.3f}")
        print(f"{'load_recipe ' + name + ' (warm, in process)':58s} {statistics.median(warm):9.3f}")
        print(f"{'  cold validate / import torch':58s} {cold / torch_import:9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
