"""The Colab notebook (examples/colab_aao.ipynb) is well-formed and runs headless on CPU.

The runner executes the notebook's code cells in order, in one namespace, in a fresh
Python process (so the 8 fake CPU devices of conftest.py do not apply), with
``QFLAX_NOTEBOOK_TINY=1`` and ``JAX_PLATFORMS=cpu``, in a temporary working directory.
IPython shell and magic lines (``!cmd``, ``%pip ...``) become ``pass``. It then writes
what the test checks to a JSON file.
"""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "colab_aao.ipynb"
BITS = (32, 8, 4, 2)
VARIANTS = {"fp32": 32, "w8a8": 8, "w4a4": 4, "w2a2": 2}

RUNNER = textwrap.dedent(r'''
  import json, os, re, subprocess, sys, time

  notebook, summary_path = sys.argv[1], sys.argv[2]
  real_check_call = subprocess.check_call

  def no_pip(args, *a, **k):   # qflax is importable here: the install cell must not reach for pip
    if any("pip" in str(x) for x in args):
      raise AssertionError(f"the install cell ran {args} although qflax is importable")
    return real_check_call(args, *a, **k)
  subprocess.check_call = no_pip

  ns = {"__name__": "__main__"}
  start = time.perf_counter()
  with open(notebook) as f:
    cells = json.load(f)["cells"]
  for i, cell in enumerate(cells):
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    source = re.sub(r"^(\s*)[!%].*$", r"\1pass", source, flags=re.M)   # shell / magic lines
    exec(compile(source, f"<notebook cell {i}>", "exec"), ns)
  seconds = time.perf_counter() - start

  from qflax.train import saved
  run = ns["run"]
  summary = {
      "seconds": seconds, "tiny": ns["TINY"], "backend": ns["BACKEND"], "bits": list(ns["BITS"]),
      "workdir": os.path.abspath(ns["WORKDIR"]), "plot_file": os.path.abspath(ns["PLOT_FILE"]),
      "predict_images": int(len(ns["images"])), "accuracy": ns["accuracy"],
      "variants": [[v.name, v.w_bits, v.a_bits] for v in run.variants],
      "networks": saved.networks_by_variables(run), "step": run.step,
      "results": [{k: v[k] for k in ("name", "w_bits", "a_bits", "accuracy")} for v in ns["results"]["variants"]],
      "switchable": ns["results"]["switchable"], "table": ns["table"],
      "jax_build": ns["jax_build"](),   # what the install cell would ask pip for on this machine
  }
  with open(summary_path, "w") as f:
    json.dump(summary, f)
''')


def _notebook():
  with open(NOTEBOOK) as f:
    return json.load(f)


def _code(cell):
  source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
  return re.sub(r"^(\s*)[!%].*$", r"\1pass", source, flags=re.M)


def test_notebook_is_well_formed_nbformat_4():
  nb = _notebook()
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  assert isinstance(nb["metadata"], dict) and nb["metadata"]["kernelspec"]["language"] == "python"
  assert isinstance(nb["cells"], list) and nb["cells"]
  ids = []
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code", "raw")
    assert isinstance(cell["metadata"], dict)
    source = cell["source"]
    assert isinstance(source, str) or (isinstance(source, list) and all(isinstance(s, str) for s in source))
    if isinstance(source, list):   # nbformat's multiline strings: every line but the last ends with a newline
      assert all(s.endswith("\n") for s in source[:-1]) and not any("\n" in s[:-1] for s in source)
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, "the notebook is stored without outputs"
      compile(_code(cell), "<cell>", "exec")
    else:
      assert "outputs" not in cell and "execution_count" not in cell
    if nb["nbformat_minor"] >= 5:
      assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", cell["id"])
      ids.append(cell["id"])
  assert len(ids) == len(set(ids))
  kinds = [c["cell_type"] for c in nb["cells"]]
  assert kinds[0] == "markdown" and kinds.count("code") >= 5
  settings = [c for c in nb["cells"] if c["cell_type"] == "code" and "QFLAX_NOTEBOOK_TINY" in _code(c)]
  assert len(settings) == 1, "the settings live in one cell"
  try:
    import nbformat   # optional: not a dependency
  except ImportError:
    return
  nbformat.validate(nbformat.reads(NOTEBOOK.read_text(), as_version=4))


def test_notebook_runs_headless_on_cpu_with_tiny_settings(tmp_path):
  runner, summary_path = tmp_path / "run_notebook.py", tmp_path / "summary.json"
  runner.write_text(RUNNER)
  env = dict(os.environ, QFLAX_NOTEBOOK_TINY="1", JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(ROOT)) if p)
  work = tmp_path / "cwd"
  work.mkdir()
  proc = subprocess.run([sys.executable, str(runner), str(NOTEBOOK), str(summary_path)], cwd=work, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  s = json.loads(summary_path.read_text())
  out = proc.stdout
  assert s["tiny"] and s["backend"] == "cpu" and tuple(s["bits"]) == BITS
  assert re.fullmatch(r"jax(\[(tpu|cuda12|cuda13)\])?", s["jax_build"]), s["jax_build"]

  # Training finished: the loop wrote its results and a checkpoint at the last step, in the cwd.
  workdir = Path(s["workdir"])
  assert workdir.is_relative_to(work.resolve()) and (workdir / "results.json").is_file()
  assert s["step"] == 4096 // 64, "one epoch of the tiny training subset"
  assert s["switchable"] and {r["name"] for r in s["results"]} == set(VARIANTS)

  # One network, switched at inference: every bit-width runs the same shared weights.
  assert {name: w for name, w, a in s["variants"]} == VARIANTS and all(w == a for _, w, a in s["variants"])
  assert len(s["networks"]) == 1 and sorted(s["networks"][0]) == list(range(len(BITS)))

  # run.predict's accuracies: one per bit-width, in [0, 1], well above chance (10 classes).
  accuracy = s["accuracy"]
  assert set(accuracy) == set(VARIANTS) and s["predict_images"] == 1000
  assert all(isinstance(a, float) and math.isfinite(a) and 0.0 <= a <= 1.0 for a in accuracy.values())
  assert all(accuracy[name] > 0.5 for name in ("fp32", "w8a8", "w4a4")), accuracy   # measured: about 0.74
  assert accuracy["w2a2"] > 0.25, accuracy                                             # measured: about 0.55
  # The same 1000 test images as the loop's evaluation: run.predict agrees with it.
  for r in s["results"]:
    assert abs(r["accuracy"] - accuracy[r["name"]]) <= 0.003, (r, accuracy)

  # The table and the plot (an SVG from qflax without matplotlib, a PNG with it).
  for name, bits in VARIANTS.items():
    label = "FP" if bits == 32 else f"W{bits}A{bits}"
    assert re.search(rf"\| {label} \| {name} \| {accuracy[name]:.4f} \|", out), out
  plot = Path(s["plot_file"])
  assert plot.is_file() and plot.parent == workdir
  if plot.suffix == ".svg":
    svg = plot.read_text()
    assert svg.startswith("<svg") and svg.count('class="point"') == len(BITS) and 'class="line"' in svg
  else:
    assert plot.suffix == ".png" and plot.read_bytes().startswith(b"\x89PNG")
