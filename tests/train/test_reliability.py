"""Checkpoints you can trust and validation that misses nothing (one test per item of the
issue "Checkpoints you can trust...")."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from qflax import data, train
from qflax.train import checkpoint as checkpoint_lib
from qflax.train import loop as loop_lib

ROOT = Path(__file__).resolve().parents[2]


def _state(workdir, step=None):
  ckpt = train.Checkpoints(str(workdir))
  try:
    return ckpt.restore_arrays(step)
  finally:
    ckpt.close()


def _steps(workdir):
  ckpt = train.Checkpoints(str(workdir))
  try:
    return ckpt.steps()
  finally:
    ckpt.close()


def _interrupt_at(step):
  def hook(s):
    if s == step:
      os.kill(os.getpid(), signal.SIGINT)
  return hook


def _flip_a_byte(step_dir):
  """XORs one byte in the middle of every array data file (OCDBT keeps no checksum, so
  some flips change values silently: the digest must catch those)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if "/d/" in os.path.join(r, f)]
  assert files
  for victim in files:
    with open(victim, "r+b") as f:
      f.seek(os.path.getsize(victim) // 2)
      byte = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([byte[0] ^ 0x40]))


def test_1_a_corrupt_checkpoint_is_refused_and_the_previous_good_one_resumed(tiny_config, tmp_path, capfd):
  tiny_config.checkpoint_every_steps = 2
  full = train.train_and_evaluate(tiny_config, str(tmp_path / "full"))
  with pytest.raises(train.TrainingInterrupted):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"), step_hook=_interrupt_at(5))
  assert _steps(tmp_path / "run")[-1] == 5
  _flip_a_byte(tmp_path / "run" / "checkpoints" / "5" / "state")
  capfd.readouterr()
  resumed = train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  err = capfd.readouterr().err
  assert "checkpoints/5 is damaged" in err and "using step 4 instead" in err, err
  # Reported: the warning said the checkpoint "was left as it is" while it was moved aside.
  assert "moved to " + str(tmp_path / "run" / "checkpoints" / "damaged" / "5") in err and "left as it is" not in err
  assert (tmp_path / "run" / "checkpoints" / "damaged" / "5").is_dir()           # kept, moved aside
  a, b = _state(tmp_path / "full")[0], _state(tmp_path / "run")[0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, a["params"], b["params"])
  assert [v["accuracy"] for v in full["variants"]] == [v["accuracy"] for v in resumed["variants"]]


def test_1_the_digest_catches_a_changed_array():
  tree = {"a": np.arange(6.0), "b": {"c": np.ones((2, 2), np.int32)}}
  digest = checkpoint_lib.state_digest(tree)
  assert digest == checkpoint_lib.state_digest({"b": {"c": np.ones((2, 2), np.int32)}, "a": np.arange(6.0)})
  changed = {"a": np.arange(6.0), "b": {"c": np.array([[2, 1], [1, 1]], np.int32)}}
  assert checkpoint_lib.state_digest(changed) != digest


def test_2_a_run_stopped_before_its_first_checkpoint_says_so(tiny_config, tmp_path):
  """Reported defect: the message said the last good checkpoint ("none yet") was kept in a
  checkpoints directory that did not exist."""
  tiny_config.optimizer.learning_rate = 1e30
  with pytest.raises(train.NonFiniteLossError, match="No checkpoint had been written yet") as stopped:
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert "kept in" not in str(stopped.value) and not _steps(tmp_path)


def test_2_nothing_non_finite_is_saved(tiny_config, tmp_path):
  tiny_config.optimizer.learning_rate = 1e30
  tiny_config.checkpoint_every_steps = 1
  with pytest.raises(train.NonFiniteLossError):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  for step in _steps(tmp_path):
    state, _ = _state(tmp_path, step)
    leaves = jax.tree_util.tree_leaves(state)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in leaves if np.issubdtype(np.asarray(a).dtype, np.floating))


@pytest.mark.parametrize("field,value", [
    ("optimizer.learning_rate", math.nan), ("optimizer.learning_rate", math.inf), ("optimizer.momentum", math.nan),
    ("optimizer.weight_decay", math.nan), ("optimizer.weight_decay", -1.0), ("optimizer.warmup_epochs", math.nan),
    ("quant.act_param_init.alpha", math.nan), ("quant.act_param_init.alpha", -4.0),
    ("optimizer.step_milestones", (math.nan,)), ("method.beta", math.nan)])
def test_3_nan_inf_and_negatives_are_refused(tiny_config, field, value):
  if field == "method.beta":
    tiny_config.method.name = "aao"
  node = tiny_config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(train.ConfigError, match=field.replace(".", r"\.")):
    train.validate(tiny_config)


@pytest.mark.parametrize("method,field,value", [("cmtkd", "gamma", math.nan), ("tq", "eps", math.nan),
                                                ("progressive", "progressive_bits", ("a",))])
def test_3_method_fields_too(tiny_config, method, field, value):
  tiny_config.method = {"name": method, "bit_axis": "auto", field: value}
  tiny_config.bits = (2,) if method != "tq" else (32,)
  tiny_config.quant.calibrate_batches = 1
  with pytest.raises(train.ConfigError, match=f"method.{field}"):
    train.load(tiny_config)


_KILL = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import make_tiny_config
from qflax import train
config = make_tiny_config()
config.checkpoint_every_steps = 2
def hook(step):
  if step == {step}:
    train.Checkpoints({workdir!r}).close()
    os.kill(os.getpid(), signal.SIGKILL)
train.train_and_evaluate(config, {workdir!r}, step_hook=hook)
"""


@pytest.mark.parametrize("kill_at", [4, 5])
def test_4_best_and_metadata_survive_a_sigkill(tiny_config, tmp_path, kill_at):
  tiny_config.checkpoint_every_steps = 2
  full = train.train_and_evaluate(tiny_config, str(tmp_path / "full"))
  workdir = str(tmp_path / "killed")
  script = _KILL.format(tests=str(ROOT / "tests"), step=kill_at, workdir=workdir)
  out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert out.returncode == -signal.SIGKILL
  resumed = train.train_and_evaluate(tiny_config, workdir)
  drop = lambda r: {k: v for k, v in r.items() if k not in ("train_seconds", "images_per_second")}
  assert drop(resumed) == drop(full)
  (_, meta_full), (_, meta_resumed) = _state(tmp_path / "full"), _state(workdir)
  assert {k: meta_full[k] for k in ("best_accuracy", "best_step", "phase_accuracy")} == {
      k: meta_resumed[k] for k in ("best_accuracy", "best_step", "phase_accuracy")}
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  keys = [(r["split"], r["step"]) for r in records]
  assert len(keys) == len(set(keys))                             # item 9: no duplicate rows


def test_4_the_latest_checkpoint_at_an_evaluation_carries_its_results(tiny_config, tmp_path):
  tiny_config.checkpoint_every_steps = 1
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, str(tmp_path))
  _, meta = _state(tmp_path, 3)
  assert meta["best_step"] == 3 and meta["best_accuracy"] >= 0 and "train" in meta["phase_accuracy"]


@pytest.mark.parametrize("line", ["c.num_epoch = 1", "c.optimizer.lr = 0.1"])
def test_5_unknown_fields_in_a_config_file_are_refused(tmp_path, line):
  path = tmp_path / "typo.py"
  path.write_text("from qflax.train import default_config\n\ndef get_config():\n  c = default_config()\n"
                  f"  {line}\n  return c\n")
  with pytest.raises(train.ConfigError, match="did you mean"):
    train.validate(train.load_config_file(str(path)))


@pytest.mark.parametrize("field,value", [("model.options", {"widths": ()}),
                                         ("model.options", {"widths": (16, -1, 64)}),
                                         ("dataset.synthetic.image_size", 0), ("dataset.synthetic.num_classes", 0),
                                         # reported: these three were tracebacks during compute
                                         ("seed", 10**23), ("dataset.synthetic.image_size", 1),
                                         ("dataset.synthetic.num_train", 10**12)])
def test_6_bad_model_and_data_options_fail_before_compute(tiny_config, tmp_path, field, value):
  node = tiny_config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(train.ConfigError, match=field.split(".")[0]):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_6_streaming_a_dataset_without_a_streaming_source_is_named(tiny_config, tmp_path):
  """Reported defect: ``dataset.stream=True`` on fashion_mnist was a 20-line traceback, rc 1."""
  tiny_config.dataset.name, tiny_config.dataset.stream = "fashion_mnist", True
  with pytest.raises(train.ConfigError, match=r"dataset\.stream=True .*streaming sources"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_8_a_second_run_in_the_same_workdir_is_refused(tiny_config, tmp_path):
  os.makedirs(tmp_path, exist_ok=True)
  with checkpoint_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(train.CheckpointError, match="in use by another run"):
      train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_9_disk_full_is_one_line_and_keeps_the_earlier_checkpoints(tiny_config, tmp_path, monkeypatch):
  tiny_config.checkpoint_every_steps = 1
  saved = []
  original = checkpoint_lib.ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step >= 3:
      raise OSError(28, "No space left on device")
    saved.append(step)
    return original(self, step, *args, **kwargs)
  closed = []
  original_close = checkpoint_lib.ocp.CheckpointManager.close
  monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "save", save)
  monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "close",
                      lambda self: closed.append(1) or original_close(self))
  with pytest.raises(train.CheckpointError, match=r"checkpoints/3 \(No space left on device\)"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  monkeypatch.undo()
  assert _steps(tmp_path) == [1, 2] and saved == [1, 2]
  assert closed == [1]   # the manager whose save failed is still closed


def test_9_a_failed_background_write_is_named_by_its_own_step(tmp_path, monkeypatch):
  """Reported defect: Orbax writes in the background, and a write that failed was
  reported under the step of the next save."""
  meta = {"best_accuracy": -1.0, "best_step": None, "train_seconds": 0.0, "phase_accuracy": {}}
  state = {"w": np.arange(4, dtype=np.float32)}
  failures = [OSError(28, "No space left on device")]
  original = checkpoint_lib.ocp.CheckpointManager.wait_until_finished

  def wait_until_finished(self):
    original(self)
    if failures and 2 in self.all_steps():
      raise failures.pop()
  with train.Checkpoints(str(tmp_path)) as ckpt:
    ckpt.save(1, state, meta)
    ckpt.save(2, state, meta)
    monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "wait_until_finished", wait_until_finished)
    with pytest.raises(train.CheckpointError, match=r"checkpoints/2 \(No space left on device\)"):
      ckpt.save(3, state, meta)
  monkeypatch.undo()


def test_9_a_damaged_config_json_or_a_step_beyond_the_run_is_one_error(tiny_config, tmp_path):
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, str(tmp_path))
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(train.CheckpointError, match="not JSON"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  good = tmp_path / "good"
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, str(good))
  os.rename(good / "checkpoints" / "3", good / "checkpoints" / "30")
  with pytest.raises(train.CheckpointError, match="beyond"):
    train.train_and_evaluate(tiny_config, str(good))


def test_9_sigterm_during_the_final_evaluation_is_not_swallowed(tiny_config, tmp_path, monkeypatch):
  tiny_config.num_epochs = 1
  original = loop_lib.evaluate

  def evaluate(run, state):
    out = original(run, state)
    if int(state.step) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return out
  monkeypatch.setattr(loop_lib, "evaluate", evaluate)
  with pytest.raises(train.TrainingInterrupted, match="after step 3"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not (tmp_path / "results.json").exists()
  monkeypatch.undo()
  results = train.train_and_evaluate(tiny_config, str(tmp_path))     # resumes, only reports
  assert results["epochs"] == 1


def _idx_dataset(directory, seed):
  rng = np.random.default_rng(seed)
  for split, n in (("train", 64), ("t10k", 32)):
    data.write_idx(str(directory / f"{split}-images-idx3-ubyte"), rng.integers(0, 255, (n, 8, 8), np.uint8))
    data.write_idx(str(directory / f"{split}-labels-idx1-ubyte"), rng.integers(0, 4, n).astype(np.uint8))


def test_10_another_idx_dir_on_resume_cannot_switch_the_data(tiny_config, tmp_path, monkeypatch):
  for name, seed in (("a", 0), ("b", 1)):
    (tmp_path / name).mkdir()
    _idx_dataset(tmp_path / name, seed)
  tiny_config.dataset.name = "fashion_mnist"
  tiny_config.dataset.idx_dir = str(tmp_path / "a")
  tiny_config.dataset.download = False
  tiny_config.model.options.widths = (4, 8, 8)
  with pytest.raises(train.TrainingInterrupted):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"), step_hook=_interrupt_at(2))
  tiny_config.dataset.idx_dir = str(tmp_path / "b")
  closed = []
  close = checkpoint_lib.ocp.CheckpointManager.close
  monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "close", lambda self: closed.append(close(self)))
  with pytest.raises(train.CheckpointError, match="training data differ"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  # Reported defect: a refused resume left Orbax's manager open (its cleanup thread then
  # printed a traceback at interpreter exit).
  assert len(closed) == 1
  monkeypatch.undo()
  moved = tmp_path / "moved"
  os.rename(tmp_path / "a", moved)                                # the same data elsewhere resumes
  tiny_config.dataset.idx_dir = str(moved)
  train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
