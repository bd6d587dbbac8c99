"""One process of a multi-process run on CPU, for ``test_distributed.py``.

  python distributed_worker.py SPEC_JSON

``SPEC_JSON`` holds ``process_id``, ``num_processes``, ``port`` (the coordinator, on
127.0.0.1), ``devices`` (CPU devices of this process), ``workdir``, ``overrides``
(``{"dotted.field": value}`` applied to the tiny test config), ``sigterm_at`` (this
process sends itself SIGTERM after that step; 0: never) and ``report`` (a JSON file
this process writes: how the run ended, at which step, and which files of the workdir
it opened for writing, seen through a Python audit hook).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

START = time.perf_counter()

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from conftest import make_tiny_config  # noqa: E402  (sets 8 CPU devices; overridden below)

import jax  # noqa: E402


def _watch_writes(workdir: str) -> list[str]:
  """Paths under ``workdir`` this process opens for writing (Python-level opens)."""
  written = []
  root = os.path.abspath(workdir) + os.sep

  def hook(event, args):
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
      return
    path, mode, flags = os.path.abspath(os.fsdecode(args[0])), args[1], args[2]
    writing = any(c in (mode or "") for c in "wax+") or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
    if writing and path.startswith(root):
      written.append(os.path.relpath(path, root))
  sys.addaudithook(hook)
  return written


def _config(overrides: dict):
  config = make_tiny_config()
  for field, value in overrides.items():
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def main(spec: dict) -> int:
  jax.config.update("jax_num_cpu_devices", spec["devices"])
  if spec["num_processes"] > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{spec['port']}",
                               num_processes=spec["num_processes"], process_id=spec["process_id"])
  from qflax import train
  config = _config(spec["overrides"])
  config.distributed = spec["num_processes"] > 1    # already initialised: the loop only checks
  written = _watch_writes(spec["workdir"])
  steps, seconds = [], [round(time.perf_counter() - START, 2)]

  def hook(step):
    steps.append(step)
    seconds.append(round(time.perf_counter() - START, 2))
    if step == spec.get("sigterm_at"):
      os.kill(os.getpid(), signal.SIGTERM)

  report = {"process_index": jax.process_index(), "process_count": jax.process_count()}
  try:
    results = train.train_and_evaluate(config, spec["workdir"], step_hook=hook)
    report.update(ended="finished", accuracy=[v["accuracy"] for v in results["variants"]])
  except train.TrainingInterrupted as e:
    report.update(ended="interrupted", step=e.step, signum=e.signum)
  seconds.append(round(time.perf_counter() - START, 2))
  report.update(last_step=steps[-1] if steps else None, written=sorted(set(written)), seconds=seconds)
  with open(spec["report"], "w") as f:
    json.dump(report, f)
  return 0


if __name__ == "__main__":
  sys.exit(main(json.loads(sys.argv[1])))
