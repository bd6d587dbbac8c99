"""``qflax-compare``: one table and one plot from several runs' ``results.json``."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from qflax import compare


def _run(workdir, method, variants, switchable=False):
  workdir.mkdir(parents=True)
  results = {"method": method, "model": "convnet", "dataset": "fashion_mnist", "epochs": 3, "train_seconds": 12.5,
             "images_per_second": 900.0,
             "variants": [{"name": n, "w_bits": w, "a_bits": a, "accuracy": acc, "model_bytes": size}
                          for n, w, a, acc, size in variants]}
  if switchable:
    results["switchable"] = True
  (workdir / "results.json").write_text(json.dumps(results))
  return str(workdir)


@pytest.fixture
def two_runs(tmp_path):
  qat = _run(tmp_path / "a" / "quickstart", "qat", [("fp32", 32, 32, 0.905, 104000), ("w4a8", 4, 8, 0.9, 15000)])
  aao = _run(tmp_path / "b" / "aao", "aao", [("fp32", 32, 32, 0.9, 104000), ("w4a4", 4, 4, 0.88, 14000),
                                             ("w2a2", 2, 2, 0.8, 8000)], switchable=True)
  return qat, aao


def test_table_and_plot_of_two_runs(two_runs, tmp_path):
  out = tmp_path / "cmp"
  proc = subprocess.run([sys.executable, "-m", "qflax.compare", *two_runs, "--out", str(out)], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  table = (out / "comparison.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
  assert len(rows) == 5
  assert "| quickstart | qat | w4a8 | 4 | 8 | 90.00 % | 15,000 |" in table
  assert "one switchable network" in table and "![comparison](comparison.svg)" in table

  svg = ET.fromstring((out / "comparison.svg").read_text())
  ns = {"s": "http://www.w3.org/2000/svg"}
  points = svg.findall(".//s:circle[@class='point']", ns)
  assert sorted((p.get("data-run"), p.get("data-bits")) for p in points) == sorted([
      ("quickstart", "FP"), ("quickstart", "W4A8"), ("aao", "FP"), ("aao", "W4A4"), ("aao", "W2A2")])
  # One line, for the switchable run only; the dedicated models get markers only.
  assert len(svg.findall(".//s:path[@class='line']", ns)) == 1
  colors = {p.get("data-run"): p.get("fill") for p in points}
  assert colors["quickstart"] != colors["aao"]
  legend = [t.text for t in svg.findall(".//s:g[@class='legend']/s:text", ns)]
  assert legend == ["quickstart", "aao"]
  height = float(svg.get("height"))
  assert all(float(t.get("y")) <= height for t in svg.iter("{http://www.w3.org/2000/svg}text"))


@pytest.mark.parametrize("damage, match", [
    (None, "no results.json"),
    ("{not json", "damaged or not JSON"),
    ('{"method": "qat", "model": "m", "dataset": "d", "variants": [{"name": "x"}]}', "w_bits is missing"),
])
def test_a_run_that_cannot_be_compared_is_one_line_and_nothing_is_written(two_runs, tmp_path, damage, match):
  bad = tmp_path / "bad"
  bad.mkdir()
  if damage is not None:
    (bad / "results.json").write_text(damage)
  out = tmp_path / "cmp"
  proc = subprocess.run([sys.executable, "-m", "qflax.compare", *two_runs, str(bad), "--out", str(out)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and match in proc.stderr and "Traceback" not in proc.stderr
  assert not out.exists()


def test_labels_stay_unique_when_last_components_repeat(tmp_path):
  assert compare.run_labels([str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]) == ["x/run", "y/run"]
