"""After training: load a run's model from its workdir, evaluate it, export it.

  >>> run = qflax.load("runs/quickstart")                  # finished or interrupted
  >>> [v.name for v in run.variants]
  ['fp32', 'w4a4']
  >>> logits = run.predict(images, "w4a4")                  # uint8 images, as the dataset stores them

``launch.py --workdir W --mode=evaluate`` evaluates every variant (optionally on
another dataset: ``--config.dataset.name=...``) and ``--mode=export`` writes
``W/export/``: the integer model files (one per network: a switchable network's
bit-widths share one file), a StableHLO artifact of the evaluation function with the
variant index as a runtime input (loadable with ``jax.export.deserialize`` in plain
JAX), and a manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qflax import data as data_lib
from qflax import methods
from qflax._files import write_together
from qflax.methods.base import Method, Task, TrainState, Variant, VariantNetwork
from qflax.train import config as config_lib
from qflax.train import loop as loop_lib
from qflax.train.checkpoint import TASK_FILE, CheckpointError, Checkpoints

class SavedRun(NamedTuple):
  """A run's method and trained state, restored from its workdir."""
  workdir: str
  config: ml_collections.ConfigDict
  method: Method
  state: TrainState
  step: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def variants(self) -> tuple[Variant, ...]:
    return self.method.variants

  def index(self, variant) -> int:
    names = [v.name for v in self.variants]
    if isinstance(variant, (int, np.integer)) and not isinstance(variant, bool) and 0 <= variant < len(names):
      return variant
    if variant not in names:
      raise ValueError(f"variant {variant!r} is not in this run; allowed: {names}")
    return names.index(variant)

  def network(self, variant) -> VariantNetwork:
    return self.method.network(self.state, self.index(variant))

  def predict(self, images, variant) -> jax.Array:
    """Logits for a batch of images (``uint8``, or other integers or floats in ``[0, 255]``) at
    ``variant``; values off that scale (e.g. images normalised already) raise ``ValueError``."""
    if self.method not in _PREDICT:
      _PREDICT[self.method] = jax.jit(self.method.eval_logits)
    images, expected = jnp.asarray(images), tuple(self.method.task.input_shape)
    if not (jnp.issubdtype(images.dtype, jnp.integer) or jnp.issubdtype(images.dtype, jnp.floating)):
      raise TypeError(f"images of dtype {images.dtype}; expected uint8, or other integers or floats in [0, 255]")
    if images.shape[1:] != expected:
      raise ValueError(f"images of shape (batch, {', '.join(map(str, expected))}) expected (what the run was "
                       f"trained on), got {images.shape}")
    index = self.index(variant)
    if not images.shape[0]:
      return jnp.zeros((0, self.method.task.num_classes), jnp.float32)
    if images.dtype != jnp.uint8:
      low, high = map(float, jax.device_get(_value_range(images)))
      if not np.isfinite([low, high]).all():    # jnp.min and jnp.max propagate NaN
        raise ValueError("images hold NaN or infinite values")
      if not 0 <= low <= high <= 255:
        raise ValueError(f"images hold values from {low} to {high}; expected pixel values in [0, 255] "
                         "(uint8, or other numbers on that scale)")
    x = data_lib.normalize(images, self.mean, self.std)
    return _PREDICT[self.method](self.state, x, jnp.int32(index))


_PREDICT = weakref.WeakKeyDictionary()   # one compiled predictor per loaded method


@jax.jit
def _value_range(images):
  return jnp.min(images), jnp.max(images)


def _read_json(path: str, what: str):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{os.path.dirname(path)} is not a qflax run: {path} ({what}) is missing") from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} ({what}) is damaged or not JSON ({type(e).__name__}); "
                          "it was left as it is") from None


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was started with (``config.json``), lists back to tuples."""
  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value
  saved = _read_json(os.path.join(workdir, "config.json"), "the run's config")
  if not isinstance(saved, dict):
    raise CheckpointError(f"{workdir}/config.json is not a qflax run config")
  return ml_collections.ConfigDict(tuples(saved))


def _read_task(workdir: str) -> tuple[Task, tuple[float, ...], tuple[float, ...]]:
  """``task.json``: the run's data shapes and normalisation, each value checked."""
  task_json = _read_json(os.path.join(workdir, TASK_FILE), "the run's data shapes")

  def damaged(what):
    return CheckpointError(f"{workdir}/{TASK_FILE} is damaged ({what})")

  try:
    task = Task(int(task_json["num_classes"]), tuple(int(d) for d in task_json["input_shape"]),
                int(task_json["steps_per_epoch"]))
    mean, std = tuple(float(m) for m in task_json["mean"]), tuple(float(s) for s in task_json["std"])
  except (KeyError, TypeError, ValueError):
    raise damaged("fields missing or of the wrong type") from None
  if task.num_classes < 2 or task.steps_per_epoch < 1:
    raise damaged(f"num_classes {task.num_classes}, steps_per_epoch {task.steps_per_epoch}")
  if len(task.input_shape) not in (3, 4) or min(task.input_shape) < 1:
    raise damaged(f"input_shape {task.input_shape}: (height, width, channels) or (frames, height, width, channels)")
  channels = task.input_shape[-1]
  if len(mean) != channels or len(std) != channels or not np.all(np.isfinite(mean + std)) or min(std) <= 0:
    raise damaged(f"mean {mean} and std {std}: {channels} finite values each, std > 0")
  return task, mean, std


def load(workdir: str, *, checkpoint: str = "latest") -> SavedRun:
  """The method and state of the run in ``workdir`` at its ``latest`` (or ``best``) checkpoint.

  Raises ``CheckpointError`` (one line naming the cause) for a directory that is not a
  qflax run, a run with no checkpoint yet, or a damaged one; ``ConfigError`` if its
  config no longer validates.
  """
  if checkpoint not in ("latest", "best"):
    raise ValueError(f"checkpoint={checkpoint!r}; allowed: 'latest' or 'best'")
  if not isinstance(workdir, (str, bytes, os.PathLike)):
    raise TypeError(f"workdir must be a path to a run's directory, got {workdir!r}")
  workdir = os.path.abspath(os.fsdecode(workdir))
  if not os.path.isdir(workdir):
    raise CheckpointError(f"{workdir} is not a directory holding a qflax run")
  config = load_config(workdir)
  settings = config_lib.load(config)
  task, mean, std = _read_task(workdir)
  method = methods.get_method(settings.method_name)(settings.method, task)
  with Checkpoints(workdir, read_only=True) as ckpt:
    starts = np.cumsum([0] + [p.num_epochs * task.steps_per_epoch for p in method.phases])
    fresh = jax.eval_shape(method.init_state, jax.random.key(0))

    def target_for(step):
      phase = int(np.searchsorted(starts, max(step - 1, 0), side="right") - 1)
      return method.start_phase(fresh, min(phase, len(method.phases) - 1))
    if ckpt.latest_step() is None:
      raise CheckpointError(f"{ckpt.directory} holds no checkpoint yet: the run has not saved one")
    step, state, meta = ckpt.restore_latest_good(target_for)
    if checkpoint == "best":
      if meta["best_step"] is None:
        raise CheckpointError(f"the run in {workdir} has not been evaluated yet, so it has no best checkpoint")
      step = meta["best_step"]
      state, _ = ckpt.restore(step, target_for(step))
  return SavedRun(workdir, config, method, state, step, mean, std)


def evaluate(run: SavedRun, dataset: config_lib.DatasetSettings | None = None, batch_size: int = 0) -> dict:
  """Top-1 accuracy of every variant of ``run`` on ``dataset``'s evaluation split (the
  run's own by default), with the training loop's batches and evaluation step."""
  settings = config_lib.load(run.config).loop
  loop = dataclasses.replace(settings, dataset=dataset or settings.dataset, num_devices=1,
                             eval_batch_size=batch_size or settings.eval_batch)
  batches, name, _, info = loop_lib.load_batches(loop, 0, loop_lib.make_mesh(1))
  shape, task = tuple(np.shape(batches.sample)), run.method.task
  if (info.num_classes, shape) != (task.num_classes, task.input_shape):
    raise config_lib.ConfigError(
        f"dataset {name!r} has {info.num_classes} classes of shape {shape}; the run was trained on "
        f"{task.num_classes} classes of shape {task.input_shape}")
  return loop_lib.evaluate_variants(loop_lib.make_eval_step(run.method, run.mean, run.std), run.variants, batches,
                                    run.state)


def networks_by_variables(run: SavedRun) -> list[list[int]]:
  """Variant indices grouped by the network they run: variants whose model and variables
  are the same objects (a switchable network's bit-widths) share one integer model file."""
  groups: dict[tuple, list[int]] = {}
  for k in range(len(run.variants)):
    net = run.network(k)
    key = (net.model, tuple(id(leaf) for leaf in jax.tree_util.tree_leaves(net.variables)))
    groups.setdefault(key, []).append(k)
  return list(groups.values())


def stablehlo(run: SavedRun) -> bytes:
  """``jax.export`` of ``(images, variant_index) -> logits`` with the trained state as
  constants: uint8 (or float) images of shape ``(batch, *input_shape)`` with a symbolic
  batch, normalised inside; the variant index is a runtime int32, so one artifact serves
  every variant; an index outside ``0 .. len(variants) - 1`` gives NaN logits (a runtime
  input cannot raise). Loads with ``jax.export.deserialize`` in plain JAX."""
  from jax import export as jax_export
  state, method, mean, std = run.state, run.method, run.mean, run.std
  last = len(method.variants) - 1

  def logits(images, variant_index):
    out = method.eval_logits(state, data_lib.normalize(images, mean, std), jnp.clip(variant_index, 0, last))
    return jnp.where((variant_index >= 0) & (variant_index <= last), out, jnp.nan)
  batch = jax_export.symbolic_shape("batch")
  shape = jax.ShapeDtypeStruct(batch + tuple(method.task.input_shape), jnp.uint8)
  exported = jax_export.export(jax.jit(logits))(shape, jax.ShapeDtypeStruct((), jnp.int32))
  return exported.serialize()


def export(run: SavedRun, directory: str | None = None) -> dict:
  """Writes ``<workdir>/export/``: ``<name>.qfx`` integer model files (one per network),
  ``model.stablehlo`` and ``manifest.json`` (variants, files, input shape, normalisation);
  returns the manifest."""
  from qflax import export as export_lib
  directory = directory or os.path.join(run.workdir, "export")
  os.makedirs(directory, exist_ok=True)
  files = {}
  for group in networks_by_variables(run):
    names = [run.variants[k].name for k in group]
    filename = ("switchable" if len(group) > 1 else names[0].replace("@", "_")) + ".qfx"
    size = export_lib.save(os.path.join(directory, filename), run.method.integer_model(run.state, group))
    files[filename] = {"variants": names, "bytes": size}
  artifact = stablehlo(run)
  manifest = {"variants": [v.name for v in run.variants], "files": files,
              "stablehlo": {"file": "model.stablehlo", "bytes": len(artifact),
                            "sha256": hashlib.sha256(artifact).hexdigest(),
                            "inputs": ["uint8 images (batch, " + ", ".join(map(str, run.method.task.input_shape)) + ")",
                                       f"int32 variant index (0..{len(run.variants) - 1}; another gives NaN logits)"]},
              "input_shape": list(run.method.task.input_shape), "mean": list(run.mean), "std": list(run.std),
              "step": run.step}
  write_together({os.path.join(directory, "model.stablehlo"): artifact,      # the manifest describes this artifact
                  os.path.join(directory, "manifest.json"): json.dumps(manifest, indent=2)})
  return manifest
