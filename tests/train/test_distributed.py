"""Several processes for real: two CPU processes joined by ``jax.distributed`` (gloo
collectives, one CPU device each) train the tiny config in one shared workdir, as
``--distributed`` runs do on several hosts (item "several processes tested for real" of
the issue "Checkpoints you can trust...").

The processes are ``distributed_worker.py``. They share no persistent compilation cache:
JAX writes its entries from process 0 only, so in a later run process 1 would compile
what process 0 loads, and on a busy machine the two would reach their first collective
further apart than gloo's 30 s connection timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import make_tiny_config
from jax.sharding import NamedSharding, PartitionSpec as P
from qflax import data, train

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT = 300            # seconds for all processes of one run (a hang fails the test, it does not block CI)
# Every run (the one-process reference too) compiles with the same flags; LLVM's
# optimisations off halve the compile time that dominates these tiny runs.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()}
LOGS_AND_RESULTS = ("metrics.jsonl", "tensorboard/", "results.json", "results.md", "config.json", "task.json",
                    "accuracy_vs_bits.svg", ".lock")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(directory: Path, workdir: Path, *, processes: int = 2, devices: int = 1, sigterm_at: int = 0,
            overrides=None, name=None) -> list[dict]:
  """Runs every process of one run to its end; returns their reports (process 0 first).
  Their reports and logs are ``<directory>/<name>.<process>.json|log``."""
  port, procs, logs, name = _free_port(), [], [], name or workdir.name
  for i in range(processes):
    report, log = directory / f"{name}.{i}.json", directory / f"{name}.{i}.log"
    spec = {"process_id": i, "num_processes": processes, "port": port, "devices": devices, "workdir": str(workdir),
            "overrides": overrides or {}, "sigterm_at": sigterm_at if i == 0 else 0, "report": str(report)}
    logs.append(log)
    with open(log, "w") as out:
      procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], stdout=out,
                                    stderr=subprocess.STDOUT, env=ENV))
  tail = lambda: "\n".join(f"--- process {i}:\n" + log.read_text()[-3000:] for i, log in enumerate(logs))
  deadline = time.monotonic() + TIMEOUT
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
      p.wait()
    pytest.fail(f"the processes did not end within {TIMEOUT} s (one waiting in a collective?)\n{tail()}")
  assert [p.returncode for p in procs] == [0] * processes, tail()
  return [json.loads((directory / f"{name}.{i}.json").read_text()) for i in range(processes)]


def _final_state(workdir):
  state, _ = train.latest_arrays(str(workdir))
  return jax.tree_util.tree_map(np.asarray, state)


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
  return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def two_processes(directory):
  """An uninterrupted two-process run: ``(reports, workdir)``."""
  workdir = directory / "two"
  return _launch(directory, workdir), workdir


def test_two_processes_train_like_one_process_with_the_same_global_batch(directory, two_processes):
  reports, workdir = two_processes
  assert [(r["process_index"], r["process_count"], r["ended"], r["last_step"]) for r in reports] == [
      (0, 2, "finished", 6), (1, 2, "finished", 6)]
  assert reports[0]["accuracy"] == reports[1]["accuracy"]
  # One process with two devices: the same two shards of every global batch.
  [one_report] = _launch(directory, directory / "one", processes=1, devices=2)
  assert (one_report["process_count"], one_report["ended"]) == (1, "finished")
  one, two = _final_state(directory / "one"), _final_state(workdir)
  assert int(one["step"]) == int(two["step"]) == 6
  # Both runs see the same global batches and sum the same two gradient shards (gloo
  # across processes, in memory within one): equal up to float rounding.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                         one["params"], two["params"])


def _check_only_process_0_writes_outputs(reports, outputs=LOGS_AND_RESULTS):
  first, second = (set(r["written"]) for r in reports)
  for name in outputs:
    assert any(path.startswith(name) for path in first), (name, sorted(first))
  # Process 1 writes only its part of each checkpoint (Orbax's per-process metadata).
  assert all(path.startswith("checkpoints/") for path in second), sorted(second)


def test_only_process_0_writes_logs_results_and_the_config(two_processes):
  reports, workdir = two_processes
  _check_only_process_0_writes_outputs(reports)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]   # one writer, no duplicates
  assert len(os.listdir(workdir / "tensorboard")) == 1
  assert [v["accuracy"] for v in json.loads((workdir / "results.json").read_text())["variants"]] == (
      reports[0]["accuracy"])


def test_sigterm_to_process_0_alone_stops_both_at_one_step_and_the_run_resumes(directory, two_processes):
  workdir = directory / "interrupted"
  # Logged steps (every 5th here) and epoch ends (3, 6) are where the processes compare
  # their signal flags: the SIGTERM that process 0 receives after step 4 stops both
  # after step 5; process 1 alone would otherwise go on into a collective that never ends.
  overrides = {"log_every_steps": 5}
  stopped = _launch(directory, workdir, sigterm_at=4, overrides=overrides)
  assert [(r["ended"], r["step"], r["signum"], r["last_step"]) for r in stopped] == [
      ("interrupted", 5, signal.SIGTERM, 5)] * 2
  assert not (workdir / "results.json").exists()
  assert int(_final_state(workdir)["step"]) == 5
  _check_only_process_0_writes_outputs(stopped, ("metrics.jsonl", "tensorboard/", "config.json", "task.json", ".lock"))
  resumed = _launch(directory, workdir, overrides=overrides, name="resumed")
  assert [(r["ended"], r["last_step"]) for r in resumed] == [("finished", 6)] * 2
  # A resumed run keeps the config.json and task.json it started with.
  _check_only_process_0_writes_outputs(resumed, [n for n in LOGS_AND_RESULTS if n not in ("config.json", "task.json")])
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [3, 5, 6]   # logged steps, once each
  # The interrupted and resumed run ends exactly where the uninterrupted one did.
  reference = _final_state(two_processes[1])
  final = _final_state(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, reference["params"], final["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, reference["opt_state"], final["opt_state"])
  assert resumed[0]["accuracy"] == two_processes[0][0]["accuracy"]


def test_the_host_path_of_several_processes_feeds_the_batches_of_one_process(monkeypatch):
  """What each process feeds is checked here in one process, on eight devices: the
  multi-process path (the whole dataset on the host, each process reading the rows
  its devices hold of every global batch) gives exactly the one-process batches."""
  config = make_tiny_config()
  dataset = data.load_dataset("synthetic", synthetic=dict(config.dataset.synthetic))
  mesh = train.make_mesh(8)
  make = lambda: data.DeviceBatches(dataset, NamedSharding(mesh, P("data")), NamedSharding(mesh, P()), seed=3,
                                    batch_size=16, eval_batch_size=24)
  one = make()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  several = make()
  monkeypatch.undo()
  assert several.processes == 2 and several.steps_per_epoch() == one.steps_per_epoch() == 3
  assert several.fingerprint() == one.fingerprint()
  for a, b in zip([*one.train_epoch(1, 1), *one.eval_batches()], [*several.train_epoch(1, 1), *several.eval_batches()]):
    assert [x.sharding for x in a] == [x.sharding for x in b]
    jax.tree_util.tree_map(np.testing.assert_array_equal, [np.asarray(x) for x in a], [np.asarray(x) for x in b])
