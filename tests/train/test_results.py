"""results.md and the accuracy-vs-bits SVG, checked by parsing them."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from qflax.train import results as results_lib

SVG = "{http://www.w3.org/2000/svg}"


def _variant(name, w, a, accuracy):
  return {"name": name, "w_bits": w, "a_bits": a, "accuracy": accuracy, "model_bytes": 1000 * w}


def _parse(svg):
  root = ET.fromstring(svg)
  by_class = {}
  for element in root.iter():
    by_class.setdefault(element.get("class"), []).append(element)
  return root, by_class


def _texts(elements):
  return ["".join(e.itertext()) for e in elements]


def test_single_variant_sits_inside_the_plot_not_on_the_y_axis():
  _, parts = _parse(results_lib.accuracy_plot_svg([_variant("fp32", 32, 32, 0.9)], title="fp convnet"))
  y_axis = next(e for e in parts["axis"] if e.get("x1") == e.get("x2"))
  (point,) = parts["point"]
  assert float(point.get("cx")) > float(y_axis.get("x1")) + 20
  assert "line" not in parts   # nothing to join


def test_y_ticks_are_round_and_cover_the_data():
  variants = [_variant("w2a2", 2, 2, 0.05), _variant("w4a8", 4, 8, 0.53), _variant("fp32", 32, 32, 1.0)]
  _, parts = _parse(results_lib.accuracy_plot_svg(variants))
  ticks = [int(t.rstrip("%")) for t in _texts(parts["ytick"])]
  assert ticks[0] <= 5 and ticks[-1] >= 100 and 3 <= len(ticks) <= 6
  assert all(t % 5 == 0 for t in ticks) and len(set(b - a for a, b in zip(ticks, ticks[1:]))) == 1
  assert "53%" not in _texts(parts["ytick"])
  for lo, hi in [(0.9, 0.93), (0.907, 0.907), (0.07, 0.29), (0.0, 0.0), (1.0, 1.0)]:
    ticks = results_lib.y_ticks(lo, hi)
    assert ticks[0] <= round(100 * lo, 6) and ticks[-1] >= round(100 * hi, 6) and 3 <= len(ticks) <= 6
    assert 0 <= ticks[0] and ticks[-1] <= 100


def test_dedicated_models_get_markers_only_and_switchable_networks_a_line():
  variants = [_variant("fp32", 32, 32, 0.91), _variant("w4a4", 4, 4, 0.89), _variant("w2a2", 2, 2, 0.80)]
  _, dedicated = _parse(results_lib.accuracy_plot_svg(variants, title="qat convnet"))
  assert "line" not in dedicated and len(dedicated["point"]) == 3
  _, switchable = _parse(results_lib.accuracy_plot_svg(variants, title="aao convnet", switchable=True))
  (line,) = switchable["line"]
  assert line.get("d").count("L") == 2
  for parts, word in ((dedicated, "separate"), (switchable, "switchable")):
    assert word in "".join(_texts(parts["legend"]))
    assert "accuracy vs bit-width" in _texts(parts["title"])[0]


def test_x_labels_name_weight_and_activation_bits_sorted_by_bits():
  variants = [_variant("fp32", 32, 32, 0.91), _variant("w8a8", 8, 8, 0.9), _variant("w4a8", 4, 8, 0.88),
              _variant("w2a2", 2, 2, 0.7), _variant("w4afp", 4, 32, 0.89)]
  _, parts = _parse(results_lib.accuracy_plot_svg(variants))
  assert _texts(parts["xtick"]) == ["W2A2", "W4A8", "W4AFP", "W8A8", "FP"]
  xs = {p.get("data-variant"): float(p.get("cx")) for p in parts["point"]}
  assert xs["w2a2"] < xs["w4a8"] < xs["w4afp"] < xs["w8a8"] < xs["fp32"]


def test_titles_are_escaped_and_the_svg_parses():
  root, _ = _parse(results_lib.accuracy_plot_svg([_variant("a<b", 4, 4, 0.5)], title="x & <y>"))
  assert root.tag == SVG + "svg"


def _results(**extra):
  return {"method": "qat", "model": "convnet", "dataset": "synthetic", "epochs": 2, "train_seconds": 3.0,
          "images_per_second": 1234.0, "variants": [_variant("fp32", 32, 32, 0.9), _variant("w4a8", 4, 8, 0.8)],
          **extra}


def test_write_results_files(tmp_path):
  results_lib.write_results(str(tmp_path), _results(switchable=True))
  assert json.loads((tmp_path / "results.json").read_text())["switchable"] is True
  md = (tmp_path / "results.md").read_text()
  assert "| weight bits | activation bits | W/A |" in md
  assert "| w4a8 | 4 | 8 | W4A8 |" in md and "| fp32 | 32 | 32 | FP |" in md and "1,234 images/s" in md
  _, parts = _parse((tmp_path / "accuracy_vs_bits.svg").read_text())
  assert len(parts["line"]) == 1


@pytest.mark.parametrize("rate", [0.0, None])
def test_unmeasured_throughput_is_not_reported_as_zero(tmp_path, rate):
  results_lib.write_results(str(tmp_path), _results(images_per_second=rate))
  md = (tmp_path / "results.md").read_text()
  assert "throughput not measured" in md and "0 images/s" not in md
