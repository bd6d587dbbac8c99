"""Checkpoints with Orbax: the latest two and the best, resumable, never silently replaced."""

from __future__ import annotations

import json
import os
from typing import Any

import orbax.checkpoint as ocp

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
  with open(config_path) as f:
    saved = _flatten(json.load(f))
  now = _flatten(json.loads(json.dumps(config_dict)))
  differences = [k for k in sorted(set(saved) | set(now))
                 if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
  if differences:
    detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differences[:5])
    raise CheckpointError(
        f"workdir {os.path.dirname(config_path)} holds a run with another config ({detail}); "
        "resume it with its own config, or choose another --workdir")


class Checkpoints:
  """``<workdir>/checkpoints/latest`` keeps the last two, ``.../best`` the best one."""

  def __init__(self, workdir: str):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.latest = ocp.CheckpointManager(os.path.join(self.directory, "latest"),
                                        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    self.best = ocp.CheckpointManager(os.path.join(self.directory, "best"),
                                      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: Any, meta: dict, *, best: bool = False):
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    managers = (self.latest, self.best) if best else (self.latest,)
    for manager in managers:
      if manager.latest_step() != step:
        manager.save(step, args=args, force=True)

  def restore_arrays(self, step: int | None = None, *, best: bool = False) -> tuple[Any, dict]:
    """A checkpoint as plain arrays (no target structure needed): ``(state tree, meta)``."""
    manager = self.best if best else self.latest
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no {'best' if best else 'latest'} checkpoint in {self.directory}")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise self._error(step, e) from e
    return restored["state"], restored["meta"]

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    try:
      restored = self.latest.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise self._error(step, e) from e
    return restored["state"], restored["meta"]

  def _error(self, step, cause):
    path = os.path.join(self.directory, "latest", str(step))
    return CheckpointError(
        f"checkpoint {path} is corrupt or does not match this run's model "
        f"({type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''}). It was left as it is: "
        "move it away to start again, or resume with the config that wrote it")

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.wait()
    self.latest.close()
    self.best.close()
