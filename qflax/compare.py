"""Compare finished runs: one table and two accuracy plots from each workdir's ``results.json``.

  python -m qflax.compare runs/quickstart runs/aao_fmnist runs/qkd_fmnist --out runs/comparison

writes ``comparison.md`` (one row per variant of every run: run, method, variant, weight and
activation bits, top-1 accuracy, model size) and ``comparison.svg`` (accuracy against bit-width,
one colour per run). As in ``results.md``, a line joins a run's points only when they are one
switchable network (``"switchable": true``); separate dedicated models get markers only.

A workdir without ``results.json``, or with a damaged one, and an ``--out`` that cannot be written
get one line naming it (exit code 2); nothing is written, and an earlier comparison there is kept
whole. It reads JSON only; nothing is trained or evaluated.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
import unicodedata
from xml.sax.saxutils import escape, quoteattr

from qflax._files import write_together
from qflax.train import results as results_lib

EXIT_USAGE = 2
RESULTS_FILE = "results.json"
FP_BITS = 32
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


class CompareError(ValueError):
  """A workdir that cannot be compared; the message is the one line shown."""


# --- reading ---------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
  try:
    return _is_number(value) and math.isfinite(value)
  except OverflowError:     # an integer beyond any float
    return False


def _is_text(value) -> bool:
  """A non-empty string that can be written out: no control characters, no lone surrogates."""
  return isinstance(value, str) and bool(value) and not any(
      unicodedata.category(c) in ("Cc", "Cs") for c in value)


def _check_variant(v, k: int) -> str | None:
  """Why variant ``k`` breaks the schema, or None."""
  if not isinstance(v, dict):
    return f"variants[{k}] is not an object"
  if not _is_text(v.get("name")):
    return f"variants[{k}].name is missing, or not a string without control characters"
  for key in ("w_bits", "a_bits"):
    if not _is_int(v.get(key)) or not 1 <= v[key] <= 64:
      return f"variants[{k}] ({v['name']}).{key} is missing or not an integer in 1..64"
  accuracy = v.get("accuracy")
  if not _is_number(accuracy) or not (math.isnan(accuracy) or 0.0 <= accuracy <= 1.0):
    return f"variants[{k}] ({v['name']}).accuracy is missing or not a fraction in [0, 1] (or NaN)"
  if not _is_int(v.get("model_bytes")) or not 0 <= v["model_bytes"] < 2 ** 63:
    return f"variants[{k}] ({v['name']}).model_bytes is missing or not a non-negative integer"
  return None


def _schema_problem(results) -> str | None:
  """Why ``results`` is not a results.json of the stable schema, or None."""
  if not isinstance(results, dict):
    return "it is not a JSON object"
  for key in ("method", "model", "dataset"):
    if not _is_text(results.get(key)):
      return f"field {key!r} is missing, or not a string without control characters"
  variants = results.get("variants")
  if not isinstance(variants, list) or not variants:
    return "field 'variants' is missing or empty"
  for key in ("epochs", "train_seconds", "images_per_second"):
    if results.get(key) is not None and not (_is_finite(results[key]) and results[key] >= 0):
      return f"field {key!r} is not a finite number >= 0"
  for k, v in enumerate(variants):
    problem = _check_variant(v, k)
    if problem:
      return problem
  names = [v["name"] for v in variants]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  return f"variant names repeat: {duplicates}" if duplicates else None


def read_results(workdir: str) -> dict:
  """The ``results.json`` of ``workdir``, checked; raises :class:`CompareError` (one line naming it)."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.isdir(workdir):
    raise CompareError(f"{workdir}: not a directory")
  try:
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
  except FileNotFoundError:
    raise CompareError(f"{workdir}: no {RESULTS_FILE} (the run has not finished, or it is not a qflax run)") from None
  except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:   # RecursionError: nesting too deep
    raise CompareError(f"{path} is damaged or not JSON ({type(e).__name__})") from None
  problem = _schema_problem(results)
  if problem:
    raise CompareError(f"{path} is damaged: {problem}")
  return results


def run_labels(workdirs: list[str]) -> list[str]:
  """Short unique names: each workdir's last path component, or more components where those repeat."""
  real = [os.path.realpath(w) for w in workdirs]
  twice = sorted({w for w, r in zip(workdirs, real) if real.count(r) > 1})
  if twice:
    raise CompareError(f"a run is given twice (the same directory under another name): {twice}")
  parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
  for depth in range(1, max(len(p) for p in parts) + 1):
    labels = ["/".join(p[-depth:]) for p in parts]
    if len(set(labels)) == len(labels):
      return labels
  raise CompareError(f"a workdir is given twice: {workdirs}")


# --- the table -------------------------------------------------------------------------------------------------


def _cell(text) -> str:
  """Text for a markdown table cell: ``|`` escaped, and HTML shown as text rather than rendered."""
  return html.escape(str(text), quote=False).replace("|", "\\|")


def _accuracy(a: float) -> str:
  return f"{100 * a:.2f} %" if math.isfinite(a) else "n/a"


def _run_summary(label: str, r: dict) -> str:
  bits = [f"{_cell(r['method'])} / {_cell(r['model'])} / {_cell(r['dataset'])}"]
  if r.get("epochs") is not None:
    bits.append(f"{r['epochs']:g} epochs")
  if r.get("train_seconds") is not None:
    bits.append(f"{r['train_seconds']:.1f} s training")
  if r.get("switchable"):
    bits.append("one switchable network for every bit-width")
  return f"- **{_cell(label)}**: " + ", ".join(bits)


def comparison_markdown(runs: list[tuple[str, dict]], images: tuple[str, ...] = ()) -> str:
  """``comparison.md``: a line per run, then one table with a row per variant of every run."""
  lines = [f"# Comparison of {len(runs)} run{'s' if len(runs) != 1 else ''}", ""]
  lines += [_run_summary(label, r) for label, r in runs]
  lines += ["", "| run | method | variant | W bits | A bits | top-1 accuracy | model size (bytes) |",
            "|---|---|---|---:|---:|---:|---:|"]
  for label, r in runs:
    for v in r["variants"]:
      lines.append(f"| {_cell(label)} | {_cell(r['method'])} | {_cell(v['name'])} | {v['w_bits']} | {v['a_bits']} | "
                   f"{_accuracy(v['accuracy'])} | {v['model_bytes']:,} |")
  if images:
    lines += [""] + [f"![{os.path.splitext(name)[0]}]({name})" for name in images]
  return "\n".join(lines) + "\n"


# --- the plot --------------------------------------------------------------------------------------------------


def comparison_svg(runs: list[tuple[str, dict]]) -> str:
  """Accuracy against bit-width for every run (one colour each), on one set of axes."""
  variants = [v for _, r in runs for v in r["variants"]]
  _, labels = results_lib.plot_points(variants)
  accuracies = [v["accuracy"] for v in variants if math.isfinite(v["accuracy"])]
  ticks = results_lib.y_ticks(min(accuracies, default=0.0), max(accuracies, default=1.0))
  frame = results_lib.PlotFrame(labels, ticks, legend_rows=len(runs))
  parts = frame.axes("top-1 accuracy vs bit-width")
  for k, (label, r) in enumerate(runs):
    color = PALETTE[k % len(PALETTE)]
    points, _ = results_lib.plot_points(r["variants"])
    xy = [(frame.x[bits], frame.y(100 * a)) for bits, a, _ in points]
    if r.get("switchable") and len(xy) > 1:
      path = " ".join(f"{'L' if i else 'M'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(xy))
      parts.append(f'<path class="line" d="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
    for (bits, a, name), (x, y) in zip(points, xy):
      parts.append(f'<circle class="point" data-run={quoteattr(label)} data-variant={quoteattr(name)} '
                   f'data-bits="{bits}" cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}">'
                   f"<title>{escape(label)} {escape(name)}: {100 * a:.2f}%</title></circle>")
    y = frame.top + frame.plot_h + 60 + 16 * k
    parts.append(f'<g class="legend"><circle cx="{frame.left + 8}" cy="{y - 4}" r="4" fill="{color}"/>'
                 f'<text x="{frame.left + 20}" y="{y}" font-size="11">{escape(label)}</text></g>')
  parts.append("</svg>")
  return "\n".join(parts)


def compare(workdirs: list[str], out: str) -> list[str]:
  """Writes ``comparison.md`` and ``comparison.svg`` to ``out``; returns their paths.
  Every workdir is read and checked before anything is written."""
  runs = list(zip(run_labels(workdirs), [read_results(w) for w in workdirs]))
  texts = {"comparison.svg": comparison_svg(runs), "comparison.md": comparison_markdown(runs, ("comparison.svg",))}
  try:
    os.makedirs(out, exist_ok=True)
    write_together({os.path.join(out, name): text for name, text in texts.items()})   # an earlier one stays whole
  except OSError as e:
    raise CompareError(f"--out {out!r}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")) from None
  return [os.path.join(out, "comparison.md"), os.path.join(out, "comparison.svg")]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="qflax-compare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", help="finished runs (each holds results.json)")
  parser.add_argument("--out", default="comparison", help="where comparison.md and comparison.svg go")
  args = parser.parse_args(argv)
  try:
    paths = compare(args.workdirs, args.out)
  except CompareError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
  print("wrote " + ", ".join(paths))


if __name__ == "__main__":
  main()
