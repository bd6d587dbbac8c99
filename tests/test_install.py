"""A non-editable install: the wheel carries the package, the recipes and the
``qflax-train`` entry point, which trains a recipe from a directory outside the clone.

The wheel is built with pip (build isolation fetches setuptools from the package
index, as a user's ``pip install .`` does) and installed without dependencies into a
target directory; the test's own interpreter supplies jax and the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qflax.data import sources

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """``(target dir, wheel path)``: the built wheel installed (no deps) into a fresh directory."""
  out = tmp_path_factory.mktemp("wheel")
  build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
  if build.returncode != 0:
    pytest.fail(f"pip wheel failed: {build.stderr[-2000:]}")
  (wheel,) = out.glob("qflax-*.whl")
  target = tmp_path_factory.mktemp("site")
  install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                            str(wheel)], capture_output=True, text=True, timeout=600)
  if install.returncode != 0:
    pytest.fail(f"pip install failed: {install.stderr[-2000:]}")
  return target, wheel


def test_the_wheel_holds_the_recipes_and_the_entry_point(installed):
  _, wheel = installed
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
  recipes = {Path(n).name for n in names if n.startswith("qflax/configs/") and n.endswith(".py")}
  assert {"quickstart.py", "aao_cifar100.py", "qkd_cifar100.py", "tq_resnet20.py"} <= recipes
  assert "qflax-train = qflax.cli:main" in entry_points
  assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


@pytest.mark.skipif(not os.path.isdir(sources.SYSTEM_FASHION_MNIST_DIR),
                    reason="real Fashion-MNIST is needed (.ci/run installs it)")
def test_the_entry_point_runs_the_quickstart_outside_the_clone(installed, tmp_path):
  target, _ = installed
  script = target / "bin" / "qflax-train"
  assert script.is_file()
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}
  # The script's shebang names the interpreter pip ran under; run it with that one.
  proc = subprocess.run(
      [sys.executable, str(script), "--config", "quickstart", "--workdir", "run", "--config.num_epochs=1",
       "--config.dataset.train_limit=512", "--config.dataset.eval_limit=256", "--config.batch_size=64",
       "--config.model.options.widths=(4,8,8)"],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((elsewhere / "run" / "results.json").read_text())
  assert [v["name"] for v in results["variants"]] == ["fp32", "w4a4"]
  # The package that ran is the installed copy, not the clone.
  where = subprocess.run([sys.executable, "-c", "import qflax; print(qflax.__file__)"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=120)
  assert where.stdout.strip().startswith(str(target)), where.stdout
