"""Compare finished runs: one table and two accuracy plots from each workdir's ``results.json``.

  python -m qflax.compare runs/quickstart runs/aao_fmnist runs/qkd_fmnist --out runs/comparison

writes ``comparison.md`` (one row per variant of every run: run, method, variant, weight and
activation bits, top-1 accuracy, model size), ``comparison.svg`` (accuracy against bit-width, one
series per run) and ``comparison_size.svg`` (accuracy against the exported model size in bytes, log
scale). As in ``results.md``, a line joins a run's points only when they are one switchable network
(``"switchable": true``); separate dedicated models get markers only.

A workdir without ``results.json``, or with a damaged one, gets one line naming it (exit code 2) and
nothing is written. Reads JSON only: no JAX, no training code is imported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from xml.sax.saxutils import escape, quoteattr

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


def _check_variant(v, k: int) -> str | None:
  """Why variant ``k`` breaks the schema, or None."""
  if not isinstance(v, dict):
    return f"variants[{k}] is not an object"
  if not isinstance(v.get("name"), str) or not v["name"]:
    return f"variants[{k}].name is missing or not a string"
  for key in ("w_bits", "a_bits"):
    if not _is_int(v.get(key)) or v[key] < 1:
      return f"variants[{k}] ({v['name']}).{key} is missing or not a positive integer"
  accuracy = v.get("accuracy")
  if not _is_number(accuracy) or not (math.isnan(accuracy) or 0.0 <= accuracy <= 1.0):
    return f"variants[{k}] ({v['name']}).accuracy is missing or not a fraction in [0, 1] (or NaN)"
  if not _is_int(v.get("model_bytes")) or v["model_bytes"] < 0:
    return f"variants[{k}] ({v['name']}).model_bytes is missing or not a non-negative integer"
  return None


def _schema_problem(results) -> str | None:
  """Why ``results`` is not a results.json of the stable schema, or None."""
  if not isinstance(results, dict):
    return "it is not a JSON object"
  for key in ("method", "model", "dataset"):
    if not isinstance(results.get(key), str):
      return f"field {key!r} is missing or not a string"
  variants = results.get("variants")
  if not isinstance(variants, list) or not variants:
    return "field 'variants' is missing or empty"
  for key in ("epochs", "train_seconds", "images_per_second"):
    if results.get(key) is not None and not _is_number(results[key]):
      return f"field {key!r} is not a number"
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
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise CompareError(f"{path} is damaged or not JSON ({type(e).__name__})") from None
  problem = _schema_problem(results)
  if problem:
    raise CompareError(f"{path} is damaged: {problem}")
  return results


def run_labels(workdirs: list[str]) -> list[str]:
  """Short unique names: each workdir's last path component, or more components where those repeat."""
  parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
  for depth in range(1, max(len(p) for p in parts) + 1):
    labels = ["/".join(p[-depth:]) for p in parts]
    if len(set(labels)) == len(labels):
      return labels
  raise CompareError(f"a workdir is given twice: {workdirs}")


# --- the table -------------------------------------------------------------------------------------------------


def _cell(text) -> str:
  return str(text).replace("|", "\\|")


def _accuracy(a: float) -> str:
  return f"{100 * a:.2f} %" if math.isfinite(a) else "n/a"


def _run_summary(label: str, r: dict) -> str:
  bits = [f"{r['method']} / {r['model']} / {r['dataset']}"]
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
