"""The test suite's XLA:CPU back-end optimisation level: -O1 (tests/conftest.py) against XLA's default -O3.

Runs recipe smoke tests (tests/test_recipes.py) one at a time in fresh pytest processes,
each with an empty compilation cache, alternating the two levels round by round, and
prints the wall time of each and the ratio of the medians.

  python benchmarks/compile_level.py --rounds 2 --recipes qat_cifar100 tq_fashion_mnist
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (3, 1)


def run_once(recipe: str, level: int) -> float:
  """Seconds for one recipe smoke test at ``level``, compiled from nothing."""
  test = f"tests/test_recipes.py::test_recipe_trains_above_chance_without_health_warnings[{recipe}]"
  with tempfile.TemporaryDirectory() as cache:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
           "XLA_FLAGS": f"--xla_backend_optimization_level={level}"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
  if done.returncode != 0:
    raise SystemExit(f"{recipe} at -O{level} failed:\n{done.stdout[-2000:]}")
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--recipes", nargs="+", default=["qat_cifar100", "tq_fashion_mnist"])
  args = parser.parse_args()
  times = {(r, level): [] for r in args.recipes for level in LEVELS}
  for round_index in range(args.rounds):
    for recipe in args.recipes:
      for level in LEVELS if round_index % 2 == 0 else LEVELS[::-1]:
        seconds = run_once(recipe, level)
        times[recipe, level].append(seconds)
        print(f"round {round_index + 1} {recipe} -O{level}: {seconds:.1f} s", flush=True)
  print("\n| recipe smoke test | -O3 (XLA default), s | -O1 (the suite's), s | -O1 / -O3 |\n|---|---:|---:|---:|")
  totals = dict.fromkeys(LEVELS, 0.0)
  for recipe in args.recipes:
    medians = {level: statistics.median(times[recipe, level]) for level in LEVELS}
    for level in LEVELS:
      totals[level] += medians[level]
    print(f"| {recipe} | {medians[3]:.1f} | {medians[1]:.1f} | {medians[1] / medians[3]:.2f} |")
  print(f"| all (sum of medians) | {totals[3]:.1f} | {totals[1]:.1f} | {totals[1] / totals[3]:.2f} |")


if __name__ == "__main__":
  main()
