"""Checkpoints with Orbax (the latest two and the best, verified on restore), the checks
of a workdir before a run resumes in it, and of the runs a method starts from."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from qflax import models
from qflax.methods.base import Start
from qflax.options import ConfigError

# Fields that may change between a run and its resumption (they do not change
# what is computed); any other difference makes resuming an error.
RESUMABLE_CHANGES = ("log_every_steps", "checkpoint_every_steps", "eval_every_epochs", "num_devices", "distributed",
                     "dataset.data_dir", "dataset.idx_dir", "dataset.download", "eval_batch_size")


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message names its directory."""


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def check_resumable(config_path: str, config_dict: dict) -> None:
  """Raises if ``config_path`` (the config a workdir was started with) differs from
  ``config_dict`` in a field that changes the computation."""
  try:
    with open(config_path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not an object")
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{config_path} is damaged or not JSON ({type(e).__name__}); the workdir was left as it "
                          "is: restore the file or choose another --workdir") from None
  saved = _flatten(saved)
  now = _flatten(json.loads(json.dumps(config_dict)))
  differences = [k for k in sorted(set(saved) | set(now))
                 if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
  if differences:
    detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differences[:5])
    raise CheckpointError(
        f"workdir {os.path.dirname(config_path)} holds a run with another config ({detail}); "
        "resume it with its own config, or choose another --workdir")


def check_start(start: Start) -> None:
  """Checks, before any compute, that ``start.workdir`` holds a finished ``fp`` run of
  ``start.model`` with a checkpoint; raises :class:`ConfigError` naming ``start.field``."""
  def fail(why):
    raise ConfigError(f"config field {start.field}={start.workdir!r} is invalid: {why}; allowed: the --workdir of "
                      f"an fp run of model {start.model.name!r} (python launch.py --config configs/... "
                      "--config.method.name=fp)")
  config_path = os.path.join(start.workdir, "config.json")
  if not os.path.isfile(config_path):
    fail(f"{config_path} does not exist")
  try:
    with open(config_path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    fail(f"{config_path} is not readable JSON ({type(e).__name__})")
  if not isinstance(saved, dict) or not isinstance(saved.get("method"), dict) or not isinstance(
      saved.get("model"), dict):
    fail(f"{config_path} is not a qflax run config")
  if saved["method"].get("name") != "fp":
    fail(f"it holds a {saved['method'].get('name')!r} run, not fp")
  if saved["model"].get("name") != start.model.name:
    fail(f"it holds model {saved['model'].get('name')!r}")
  saved_options = saved["model"].get("options", {})
  if not isinstance(saved_options, dict):
    fail(f"{config_path} is not a qflax run config")
  as_built = lambda o: json.loads(json.dumps(models.builder_options(start.model.name, o)))
  if as_built(saved_options) != as_built(start.model.options):
    fail(f"its model options {saved_options} differ from {json.loads(json.dumps(start.model.options))}")
  with Checkpoints(start.workdir, read_only=True) as source:
    latest = source.latest_step()
  if latest is None:
    fail(f"{os.path.join(start.workdir, 'checkpoints')} holds no checkpoint")


def latest_arrays(workdir: str) -> tuple[Any, dict]:
  """The newest checkpoint of ``workdir`` as plain arrays: ``(state tree, meta)``."""
  with Checkpoints(workdir, read_only=True) as source:
    return source.restore_arrays()


def start_variables(start: Start) -> dict:
  """``{"params", "batch_stats"}`` of the network an ``fp`` run trained (its final state)."""
  arrays, _ = latest_arrays(start.workdir)
  first = lambda a: np.asarray(a)[0]     # an fp run is a qat run with one replica
  return {"params": jax.tree_util.tree_map(first, arrays["params"]["model"]),
          "batch_stats": jax.tree_util.tree_map(first, (arrays.get("batch_stats") or {}).get("model", {}))}


TASK_FILE = "task.json"
LOCK_FILE = ".lock"


def write_task(workdir: str, task, info, fingerprint: str) -> None:
  """``task.json``: what a loaded run needs of its data (classes, input shape,
  normalisation) and a fingerprint of the training split, checked on resume."""
  with open(os.path.join(workdir, TASK_FILE), "w") as f:
    json.dump({"num_classes": task.num_classes, "input_shape": list(task.input_shape),
               "steps_per_epoch": task.steps_per_epoch, "mean": list(info.mean), "std": list(info.std),
               "data_fingerprint": fingerprint}, f, indent=2)


def check_same_data(workdir: str, fingerprint: str) -> None:
  """A resumed run must see the data it started with (``dataset.idx_dir`` or
  ``data_dir`` may move, the data may not change)."""
  path = os.path.join(workdir, TASK_FILE)
  try:
    with open(path) as f:
      saved = json.load(f).get("data_fingerprint")
  except (OSError, ValueError, AttributeError):
    raise CheckpointError(f"{path} is missing or damaged; resume with the workdir as it was written") from None
  if saved != fingerprint:
    raise CheckpointError(f"the training data differ from those the run in {workdir} started with "
                          "(another dataset, split size or files); resume it with its own data, or choose another "
                          "--workdir")


class WorkdirLock:
  """An exclusive lock on a workdir for the life of a run (``fcntl.flock`` on
  ``<workdir>/.lock``): a second run in the same workdir fails at once."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def __enter__(self):
    import fcntl
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or "another process"
      self._file.close()
      raise CheckpointError(f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}); wait for "
                            "it to finish or choose another --workdir") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"pid {os.getpid()}")
    self._file.flush()
    return self

  def __exit__(self, *exc):
    import fcntl
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


def state_digest(tree) -> str:
  """A SHA-256 of every array in ``tree`` (dtype, shape, bytes), independent of how the
  tree is nested, so a checkpoint restored with or without a target structure checks
  against the digest recorded when it was saved."""
  leaves = []
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:   # replicated over processes
      leaf = leaf.addressable_data(0)
    array = np.ascontiguousarray(np.asarray(leaf))
    leaves.append(hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).digest())
  return hashlib.sha256(b"".join(sorted(leaves))).hexdigest()


_META_TYPES = {"best_accuracy": (int, float), "best_step": (int, type(None)), "train_seconds": (int, float),
               "phase_accuracy": dict, "digest": str}
# Throughput totals; checkpoints written before they existed lack them.
_OPTIONAL_META_TYPES = {"train_images": int, "timed_images": int, "timed_seconds": (int, float)}


class Checkpoints:
  """``<workdir>/checkpoints/<step>``: the latest ``keep`` steps and the best evaluated one,
  through one Orbax ``CheckpointManager`` (preservation: ``LatestN`` or ``BestN`` by the
  mean evaluation accuracy). Every save records a digest of the state in its metadata;
  :meth:`restore` verifies it and, when the newest checkpoint is damaged, moves it to
  ``checkpoints/damaged/`` and falls back to the previous good one. Nothing is written
  before the first save.

  ``read_only=True`` is for readers of a run that may still be training (evaluate, export, a
  start checkpoint): nothing in the directory is created, cleaned up, moved or saved, so the
  partial write of a live run is left alone, and a damaged checkpoint is skipped in place.
  """

  def __init__(self, workdir: str, *, keep: int = 2, warn=print, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.keep, self.warn, self.read_only = keep, warn, read_only
    self._manager = None
    self._writing = None       # the step of the last save, which may still be writing in the background

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  @property
  def manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      self._manager = ocp.CheckpointManager(self.directory, options=self._options())
    return self._manager

  def _options(self) -> ocp.CheckpointManagerOptions:
    if self.read_only:   # creates, cleans and deletes nothing (Orbax's own read_only warns on every open)
      return ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
    policy = cm.AnyPreservationPolicy([cm.LatestN(self.keep), cm.BestN(
        get_metric_fn=lambda m: m["accuracy"], n=1, keep_checkpoints_without_metrics=False)])
    return ocp.CheckpointManagerOptions(preservation_policy=policy, create=True, cleanup_tmp_directories=True)

  def exists(self) -> bool:
    return os.path.isdir(self.directory)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps()) if self.exists() else []

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict, *, accuracy: float | None = None):
    """Saves ``state`` and ``meta`` (with the state's digest) as ``step``; ``accuracy``
    (an evaluation's mean) makes it a candidate for the best checkpoint."""
    if self.read_only:
      raise ValueError(f"{self.directory} was opened read-only")
    if step in self.steps():
      return
    meta = {**meta, "digest": state_digest(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self.wait()     # a background write that failed is reported as its own step, not this one
    self._writing = step
    try:
      self.manager.save(step, args=args, force=True, metrics=None if accuracy is None else {"accuracy": accuracy})
    except Exception as e:  # noqa: BLE001 - disk full, permissions: one line, the earlier steps stay
      raise self._write_error(step, e) from None

  def _write_error(self, step, cause):
    where = self.directory if step is None else os.path.join(self.directory, str(step))
    return CheckpointError(f"could not write checkpoint {where} "
                           f"({_write_cause(cause)}); the earlier checkpoints are kept")

  def restore_arrays(self, step: int | None = None) -> tuple[Any, dict]:
    """A checkpoint as plain arrays (no target structure needed): ``(state tree, meta)``.
    Arrays saved on devices this process does not have (another device count, other
    processes) come back on its first local device."""
    fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return self._restore(step, ocp.args.StandardRestore(fallback_sharding=fallback))

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """``step`` into the structure of ``target``; a damaged ``step`` raises."""
    return self._restore(step, ocp.args.StandardRestore(target))

  def restore_latest_good(self, target_for) -> tuple[int, Any, dict]:
    """The newest checkpoint that verifies, restored into ``target_for(step)``:
    ``(step, state, meta)``. Damaged newer ones
    are moved to ``checkpoints/damaged/<step>`` (kept, never deleted; left in place when read-only)
    with a warning; if none verifies, :class:`CheckpointError`."""
    errors = []
    for step in reversed(self.steps()):
      try:
        state, meta = self.restore(step, target_for(step))
      except CheckpointError as e:
        errors.append(e)
        continue
      for e in errors:
        where = "left in place (read-only)" if self.read_only else f"moved to {self._quarantine(e.step)}"
        self.warn(f"warning: {e.damage}; {where}, using step {step} instead")
      if errors and not self.read_only:
        self._manager.reload()
      return step, state, meta
    if errors:
      raise errors[0]
    raise CheckpointError(f"no checkpoint in {self.directory}")

  def _quarantine(self, step: int) -> str:
    """Moves a damaged checkpoint to ``checkpoints/damaged/``; returns where it went."""
    target = os.path.join(self.directory, "damaged", str(step))
    target = target if not os.path.exists(target) else f"{target}.{os.getpid()}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(os.path.join(self.directory, str(step)), target)
    return target

  def _restore(self, step, state_args) -> tuple[Any, dict]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise self._error(step, _described(e)) from None
    meta = restored["meta"]
    bad = [k for k, types in _META_TYPES.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), types)]
    bad += [k for k, types in _OPTIONAL_META_TYPES.items() if isinstance(meta, dict) and k in meta
            and not isinstance(meta[k], types)]
    if bad:
      raise self._error(step, f"its metadata has no valid {', '.join(bad)}")
    if state_digest(restored["state"]) != meta["digest"]:
      raise self._error(step, "its arrays do not match the digest recorded when it was saved")
    return restored["state"], meta

  def _error(self, step, why):
    damage = f"checkpoint {os.path.join(self.directory, str(step))} is damaged or does not match this run ({why})"
    error = CheckpointError(f"{damage}. It was left as it is: move it away to start again, or resume with the "
                            "config that wrote it")
    error.step, error.damage = step, damage
    return error

  def wait(self):
    """Waits for the background write of the last save; its failure raises, once."""
    if self._manager is not None:
      try:
        self._manager.wait_until_finished()
      except Exception as e:  # noqa: BLE001
        raise self._write_error(self._writing, e) from None
      finally:
        self._writing = None

  def close(self):
    """Waits for the last write, then closes the manager (also when that write failed)."""
    if self._manager is None:
      return
    try:
      self.wait()
    except CheckpointError:
      with contextlib.suppress(Exception):   # Orbax may raise the failed write again
        self._manager.close()
      raise
    else:
      self._manager.close()
    finally:
      self._manager = None


def _write_cause(error) -> str:
  """The OS error behind a failed write (TensorStore reports it as ``os_error_code='28'``
  inside a long message), else the error's first line."""
  code = error.errno if isinstance(error, OSError) and error.errno else None
  found = re.search(r"os_error_code='(\d+)'", str(error))
  code = code or (int(found.group(1)) if found else None)
  return os.strerror(code) if code else _described(error)


def _described(error) -> str:
  """``Type: first line of the message`` (at most 200 characters of it)."""
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"
