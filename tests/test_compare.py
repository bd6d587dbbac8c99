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


def _results(epochs="3", name='"w2a2"', bits="2"):
  return ('{"method": "qat", "model": "m", "dataset": "d", "epochs": %s, "variants": [{"name": %s, "w_bits": %s, '
          '"a_bits": 2, "accuracy": 0.5, "model_bytes": 10}]}' % (epochs, name, bits))


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
    # Reported: each of these was a traceback (RecursionError, OverflowError, UnicodeEncodeError after
    # truncating the plot), or wrote a plot that is not XML or a table that breaks.
    ("[" * 100000 + "]" * 100000, "damaged or not JSON (RecursionError)"),
    (_results(epochs="1" + "0" * 400), "'epochs' is not a finite number >= 0"),
    (_results(epochs="NaN"), "'epochs' is not a finite number >= 0"),
    (_results(name='"\\ud800"'), "name is missing, or not a string without control characters"),
    (_results(name='"a\\u001bb"'), "name is missing, or not a string without control characters"),
    (_results(name='"two\\nlines"'), "name is missing, or not a string without control characters"),
    (_results(bits="1000000"), "w_bits is missing or not an integer in 1..64"),
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


def _main(argv, capsys):
  with pytest.raises(SystemExit) as exited:
    compare.main(argv)
  return exited.value.code, capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_one_line_and_keeps_an_earlier_comparison(two_runs, tmp_path, capsys,
                                                                                        monkeypatch):
  """Reported: ``--out`` a file, or inside one, was a FileExistsError / NotADirectoryError traceback,
  and a failed write left an earlier comparison's files truncated."""
  (tmp_path / "file").write_text("")
  for out in (tmp_path / "file", tmp_path / "file" / "sub"):
    code, err = _main([*two_runs, "--out", str(out)], capsys)
    assert code == 2 and err.startswith(f"error: --out {str(out)!r}: ") and err.count("\n") == 1, err
  out = tmp_path / "cmp"
  compare.main([*two_runs, "--out", str(out)])
  before = {p.name: p.read_bytes() for p in out.iterdir()}

  def disk_full(*args):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr("qflax._files.os.replace", disk_full)
  code, err = _main([*reversed(two_runs), "--out", str(out)], capsys)
  assert code == 2 and "No space left on device" in err, err
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before      # whole, and no temporary file left


def test_the_same_run_under_two_names_is_refused(two_runs, tmp_path, capsys):
  (tmp_path / "link").symlink_to(two_runs[0])
  code, err = _main([*two_runs, str(tmp_path / "link"), "--out", str(tmp_path / "cmp")], capsys)
  assert code == 2 and "a run is given twice" in err, err


def test_html_in_a_name_is_shown_as_text_in_the_table(tmp_path):
  run = _run(tmp_path / "r", "<b>qat</b>", [("<script>x</script>", 2, 2, 0.5, 10)])
  table = compare.comparison_markdown([("r", compare.read_results(run))])
  assert "<script>" not in table and "&lt;script&gt;x&lt;/script&gt;" in table
  assert "<b>" not in table and "&lt;b&gt;qat&lt;/b&gt; / convnet" in table
