"""End-of-run reports: ``results.json`` (stable schema), ``results.md`` and an SVG plot."""

from __future__ import annotations

import json
import os


def write_results(workdir: str, results: dict) -> None:
  """Writes ``results.json``, ``results.md`` and ``accuracy_vs_bits.svg``.

  ``results`` follows ``architecture.md``: method, model, dataset, variants
  (name, w_bits, a_bits, accuracy, model_bytes), epochs, train_seconds,
  images_per_second, plus method-specific keys.
  """
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  lines = [f"# {results['method']} / {results['model']} / {results['dataset']}", "",
           f"{results['epochs']} epochs, {results['train_seconds']:.1f} s training, "
           f"{results['images_per_second']:,.0f} images/s", "",
           "| variant | weight bits | activation bits | top-1 accuracy | model size (bytes) |",
           "|---|---:|---:|---:|---:|"]
  for v in results["variants"]:
    lines.append(f"| {v['name']} | {v['w_bits']} | {v['a_bits']} | {100 * v['accuracy']:.2f} % | "
                 f"{v['model_bytes']:,} |")
  phase_accuracy = results.get("phase_accuracy")
  if phase_accuracy:
    names = [v["name"] for v in results["variants"]]
    lines += ["", "Accuracy at the end of each phase:", "", "| phase | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for phase, accuracies in phase_accuracy.items():
      lines.append(f"| {phase} | " + " | ".join(f"{100 * accuracies[n]:.2f} %" for n in names) + " |")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(workdir, "accuracy_vs_bits.svg"), "w") as f:
    f.write(accuracy_plot_svg(results["variants"], title=f"{results['method']} {results['model']}"))


def accuracy_plot_svg(variants, title: str = "") -> str:
  """Accuracy against bit-width as a small standalone SVG (no plotting library needed)."""
  points = sorted((min(v["w_bits"], 32), v["accuracy"]) for v in variants)
  width, height, margin = 420, 280, 50
  xs = sorted({b for b, _ in points})
  x_of = {b: margin + (width - 2 * margin) * (i / max(len(xs) - 1, 1)) for i, b in enumerate(xs)}
  lo = min(a for _, a in points)
  lo = max(0.0, min(lo - 0.05, 0.9))
  y_of = lambda a: height - margin - (height - 2 * margin) * (a - lo) / max(1.0 - lo, 1e-9)
  path = " ".join(f"{'M' if i == 0 else 'L'}{x_of[b]:.1f},{y_of(a):.1f}" for i, (b, a) in enumerate(points))
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle">{title}: top-1 accuracy vs bit-width</text>',
           f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="black"/>',
           f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>',
           f'<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="2"/>']
  for b, a in points:
    parts.append(f'<circle cx="{x_of[b]:.1f}" cy="{y_of(a):.1f}" r="4" fill="#1f77b4"/>')
    parts.append(f'<text x="{x_of[b]:.1f}" y="{y_of(a) - 8:.1f}" text-anchor="middle">{100 * a:.1f}</text>')
  for b in xs:
    parts.append(f'<text x="{x_of[b]:.1f}" y="{height - margin + 18}" text-anchor="middle">'
                 f'{"FP" if b >= 32 else b}</text>')
  for frac in (0.0, 0.5, 1.0):
    a = lo + frac * (1.0 - lo)
    parts.append(f'<text x="{margin - 6}" y="{y_of(a) + 4:.1f}" text-anchor="end">{100 * a:.0f}%</text>')
  parts.append(f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">bits</text>')
  parts.append("</svg>")
  return "\n".join(parts)
