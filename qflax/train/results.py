"""End-of-run reports: ``results.json`` (stable schema), ``results.md`` and an SVG plot."""

from __future__ import annotations

import json
import math
import os
from xml.sax.saxutils import escape, quoteattr

FP_BITS = 32
_COLOR = "#1f77b4"


def _bits(b) -> str:
  return "FP" if b >= FP_BITS else str(b)


def bits_label(w_bits: int, a_bits: int) -> str:
  """``"W4A8"``; ``"FP"`` when both are full precision (32 bits), ``"W4AFP"`` when only activations are."""
  return "FP" if w_bits >= FP_BITS and a_bits >= FP_BITS else f"W{_bits(w_bits)}A{_bits(a_bits)}"


def _bits_key(variant) -> tuple:
  """Sorts by bits, fewest first, full precision last; weights before activations."""
  return (min(variant["w_bits"], FP_BITS), min(variant["a_bits"], FP_BITS))


def _throughput(images_per_second) -> str:
  if images_per_second is None or not math.isfinite(images_per_second) or images_per_second <= 0:
    return "throughput not measured"
  return f"{images_per_second:,.0f} images/s"


def results_markdown(results: dict) -> str:
  """The ``results.md`` table: one row per variant with its weight (W) and activation (A) bits."""
  lines = [f"# {results['method']} / {results['model']} / {results['dataset']}", "",
           f"{results['epochs']} epochs, {results['train_seconds']:.1f} s training, "
           f"{_throughput(results.get('images_per_second'))}"
           + ("; one switchable network for every bit-width" if results.get("switchable") else ""), "",
           "| variant | weight bits | activation bits | W/A | top-1 accuracy | model size (bytes) |",
           "|---|---:|---:|:---:|---:|---:|"]
  for v in results["variants"]:
    lines.append(f"| {v['name']} | {v['w_bits']} | {v['a_bits']} | {bits_label(v['w_bits'], v['a_bits'])} | "
                 f"{100 * v['accuracy']:.2f} % | {v['model_bytes']:,} |")
  phase_accuracy = results.get("phase_accuracy")
  if phase_accuracy:
    names = [v["name"] for v in results["variants"]]
    lines += ["", "Accuracy at the end of each phase:", "", "| phase | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for phase, accuracies in phase_accuracy.items():
      cells = (f"{100 * accuracies[n]:.2f} %" if n in accuracies else "-" for n in names)   # "-": renamed since
      lines.append(f"| {phase} | " + " | ".join(cells) + " |")
  lines += _health_markdown(results.get("quantizer_health"))
  return "\n".join(lines) + "\n"


def _health_markdown(health) -> list[str]:
  """The quantizer health summary: warnings, then per variant the layers' last statistics."""
  if not health:
    return []
  lines = ["", "## Quantizer health", ""]
  lines += [f"- {w}" for w in health["warnings"]] or ["No quantizer degenerated (no warning)."]
  for variant, layers in health["variants"].items():
    if not layers:
      continue
    lines += ["", f"{variant}:", "", "| quantizer | bits | zero codes | saturated | levels used | entropy (bits) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, s in layers.items():
      saturated = s["clip_fraction"]
      lines.append(f"| {name} | {int(s['bits'])} | {100 * s['zero_fraction']:.1f} % | {100 * saturated:.1f} % | "
                   f"{int(s['levels_used'])} | {s['entropy_bits']:.2f} |")
  return lines


def write_results(workdir: str, results: dict) -> None:
  """Writes ``results.json``, ``results.md`` and ``accuracy_vs_bits.svg``.

  ``results`` follows ``architecture.md``: method, model, dataset, variants
  (name, w_bits, a_bits, accuracy, model_bytes), epochs, train_seconds,
  images_per_second, plus method-specific keys; ``"switchable": true`` marks
  variants that are one network run at several bit-widths (the plot joins them).
  """
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(results_markdown(results))
  with open(os.path.join(workdir, "accuracy_vs_bits.svg"), "w") as f:
    f.write(accuracy_plot_svg(results["variants"], title=f"{results['method']} {results['model']}",
                              switchable=bool(results.get("switchable", False))))


def y_ticks(lo: float, hi: float) -> list[int]:
  """Round accuracy ticks in percent (multiples of 1, 2, 5, 10, 20 or 25) spanning ``[lo, hi]`` (fractions).

  The axis runs from the first tick to the last: 3 to 6 ticks, inside 0..100 %.
  """
  lo_pct, hi_pct = (round(100 * max(0.0, min(v, 1.0)), 6) for v in (lo, hi))   # 100 * 0.07 is 7.000000000000001
  for step in (1, 2, 5, 10, 20, 25):
    first, last = math.floor(lo_pct / step) * step, math.ceil(hi_pct / step) * step
    while (last - first) // step + 1 < 3 and (first > 0 or last < 100):   # widen on the tighter side
      down = first > 0 and (last >= 100 or lo_pct - first <= last - hi_pct)
      first, last = (first - step, last) if down else (first, last + step)
    if (last - first) // step + 1 <= 6:
      return list(range(first, last + 1, step))
  return [0, 25, 50, 75, 100]


def plot_points(variants):
  """``(x label, accuracy, variant name)`` sorted by bits, and the distinct x labels in that order."""
  ordered = sorted((v for v in variants if math.isfinite(v["accuracy"])), key=_bits_key)
  points = [(bits_label(v["w_bits"], v["a_bits"]), float(v["accuracy"]), v["name"]) for v in ordered]
  return points, list(dict.fromkeys(label for label, _, _ in points))


class PlotFrame:
  """The plot area (pixels) and its scales: ``x`` per bit label, ``y`` for an accuracy in percent."""
  width, height, left, right, top, bottom = 460, 300, 56, 20, 44, 56

  def __init__(self, labels, ticks, legend_rows: int = 0):
    self.plot_w, self.plot_h = self.width - self.left - self.right, self.height - self.top - self.bottom
    self.height += 16 * legend_rows   # below the x-axis title
    self.ticks = ticks
    self.x = {label: self.left + self.plot_w * (i + 0.5) / len(labels) for i, label in enumerate(labels)}

  def y(self, percent: float) -> float:
    return self.top + self.plot_h * (self.ticks[-1] - percent) / (self.ticks[-1] - self.ticks[0])

  def axes(self, title: str) -> list[str]:
    """Background, title, both axes with their ticks and labels."""
    left, top, bottom_y = self.left, self.top, self.top + self.plot_h
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
             f'viewBox="0 0 {self.width} {self.height}" font-family="sans-serif" font-size="12">',
             f"<title>{escape(title)}</title>", f'<rect width="{self.width}" height="{self.height}" fill="white"/>',
             f'<text class="title" x="{self.width / 2}" y="18" text-anchor="middle" font-size="14">'
             f"{escape(title)}</text>",
             f'<line class="axis" x1="{left}" y1="{bottom_y}" x2="{left + self.plot_w}" y2="{bottom_y}" '
             'stroke="black"/>',
             f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{bottom_y}" stroke="black"/>']
    for t in self.ticks:
      parts.append(f'<line x1="{left}" y1="{self.y(t):.1f}" x2="{left + self.plot_w}" y2="{self.y(t):.1f}" '
                   'stroke="#ddd"/>')
      parts.append(f'<text class="ytick" x="{left - 6}" y="{self.y(t) + 4:.1f}" text-anchor="end">{t}%</text>')
    for label, x in self.x.items():
      parts.append(f'<text class="xtick" x="{x:.1f}" y="{bottom_y + 18}" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{left + self.plot_w / 2}" y="{bottom_y + 34}" text-anchor="middle">'
                 "bit-width (W = weights, A = activations)</text>")
    middle = top + self.plot_h / 2
    parts.append(f'<text x="14" y="{middle}" text-anchor="middle" transform="rotate(-90 14 {middle})">'
                 "top-1 accuracy (%)</text>")
    return parts


def accuracy_plot_svg(variants, title: str = "", *, switchable: bool = False) -> str:
  """Top-1 accuracy per bit-width as a small standalone SVG (no plotting library needed).

  The x axis has one category per weight/activation bit pair (``W4A8`` ..., ``FP`` last), each inside the
  plot, never on the y axis; the y axis has round percent ticks around the data. Markers show each variant;
  a line joins them only when ``switchable`` (one network evaluated at several bit-widths): separate
  dedicated models get markers only.
  """
  points, labels = plot_points(variants)
  accuracies = [a for _, a, _ in points]
  frame = PlotFrame(labels, y_ticks(min(accuracies, default=0.0), max(accuracies, default=1.0)))
  parts = frame.axes(f"{title}: top-1 accuracy vs bit-width" if title else "top-1 accuracy vs bit-width")
  xy = [(frame.x[label], frame.y(100 * a)) for label, a, _ in points]
  if switchable and len(points) > 1:
    path = " ".join(f"{'L' if i else 'M'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(xy))
    parts.append(f'<path class="line" d="{path}" fill="none" stroke="{_COLOR}" stroke-width="2"/>')
  for (label, a, name), (x, y) in zip(points, xy):
    parts.append(f'<circle class="point" data-variant={quoteattr(name)} data-bits="{label}" cx="{x:.1f}" '
                 f'cy="{y:.1f}" r="4" fill="{_COLOR}"><title>{escape(name)}: {100 * a:.2f}%</title></circle>')
    parts.append(f'<text x="{x:.1f}" y="{y - 8:.1f}" text-anchor="middle">{100 * a:.1f}</text>')
  parts.append(_legend(switchable, x=frame.left + 8, y=frame.height - 8))
  parts.append("</svg>")
  return "\n".join(parts)


def _legend(switchable: bool, x: float, y: float) -> str:
  text = "one switchable network, run at each bit-width" if switchable else "a separate model per bit-width"
  line = (f'<line x1="{x - 6}" y1="{y - 4}" x2="{x + 6}" y2="{y - 4}" stroke="{_COLOR}" stroke-width="2"/>'
          if switchable else "")
  return (f'<g class="legend">{line}<circle cx="{x}" cy="{y - 4}" r="4" fill="{_COLOR}"/>'
          f'<text x="{x + 12}" y="{y}" font-size="11">{text}</text></g>')
