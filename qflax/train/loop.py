"""The one training loop: any method, on one device or many, resumable.

``train_and_evaluate(config, workdir)`` validates the config, loads the data,
builds the method, then runs its phases. Data parallelism is ``jax.jit`` over a
one-axis ``Mesh('data')`` (``AxisType.Auto``): the state is replicated, each
batch is sharded, XLA inserts the gradient all-reduce. The step number fixes the
phase, the epoch, the batch (the epoch order is a function of (seed, epoch)) and
the random key (``fold_in(key(seed), step)``), so a resumed run repeats an
uninterrupted one exactly.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from qflax import data as data_lib
from qflax import methods
from qflax.train import config as config_lib
from qflax.train.checkpoint import Checkpoints, CheckpointError, check_resumable
from qflax.train.metrics import MetricsLog, Progress
from qflax.train.results import write_results


_INIT_STREAM = 2**31 - 1   # fold_in stream of the initialisation key (steps use 0, 1, 2, ...)


class TrainingInterrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of the last step was saved."""

  def __init__(self, signum: int, step: int, directory: str):
    super().__init__(f"stopped by signal {signum} after step {step}; checkpoint saved in {directory}; "
                     "run the same command again to resume")
    self.signum, self.step = signum, step


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def make_mesh(num_devices: int) -> jax.sharding.Mesh:
  devices = jax.devices()[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


class _SignalFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks after every step."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _load_data(config):
  ds = config.dataset
  return data_lib.load_dataset(
      ds.name, data_dir=ds.data_dir or None, idx_dir=ds.idx_dir or None, train_limit=ds.train_limit,
      eval_limit=ds.eval_limit, download=ds.download, synthetic=dict(ds.synthetic),
      shard_index=jax.process_index(), num_shards=jax.process_count())


class _Batches:
  """Training and evaluation batches (uint8, sharded over 'data') of an in-memory dataset.

  One process: the splits live on the devices and batches are gathered there.
  Several processes: each gathers its share on the host and the global batch is
  assembled with ``make_array_from_process_local_data``.
  """

  def __init__(self, dataset, mesh, seed, batch_size, eval_batch_size):
    self.seed, self.batch_size, self.eval_batch_size = seed, batch_size, eval_batch_size
    self.sharding = NamedSharding(mesh, P("data"))
    self.local = jax.process_count() > 1
    self.dataset = dataset
    self.num_train = len(dataset.train.labels)
    self.num_test = len(dataset.test.labels)
    self.local_batch = batch_size // jax.process_count()
    if not self.local:
      replicated = NamedSharding(mesh, P())
      self.train = data_lib.to_device(dataset.train, replicated)
      self.test = data_lib.to_device(dataset.test, replicated)
      take = lambda split, idx: (split.images[idx], split.labels[idx])
      self._gather = jax.jit(take, out_shardings=self.sharding)
      # One dispatch per training step: the epoch-order slice happens inside the jit.
      self._gather_slice = jax.jit(
          lambda split, order, start: take(split, jax.lax.dynamic_slice_in_dim(order, start, self.local_batch)),
          out_shardings=self.sharding)

  def steps_per_epoch(self) -> int:
    return self.num_train // self.local_batch

  def train_epoch(self, epoch: int, start_step: int):
    """Batches ``start_step..`` of ``epoch``; the order is a function of (seed, epoch)."""
    if not self.local:
      permutation = data_lib.epoch_permutation(self.seed, epoch, self.num_train)
      for step in range(start_step, self.steps_per_epoch()):
        yield self._gather_slice(self.train, permutation, step * self.local_batch)
      return
    permutation = np.random.default_rng((self.seed, epoch, jax.process_index())).permutation(self.num_train)
    for step in range(start_step, self.steps_per_epoch()):
      idx = permutation[step * self.local_batch:(step + 1) * self.local_batch]
      yield self._global(self.dataset.train.images[idx], self.dataset.train.labels[idx])

  def eval_batches(self):
    local_batch = self.eval_batch_size // jax.process_count()
    for start in range(0, self.num_test, local_batch):
      positions = np.arange(start, start + local_batch)
      mask = positions < self.num_test
      idx = np.where(mask, positions, 0)
      if not self.local:
        images, labels = self._gather(self.test, jnp.asarray(idx))
        yield images, labels, jax.device_put(mask, self.sharding)
      else:
        yield self._global(self.dataset.test.images[idx], self.dataset.test.labels[idx], mask)

  def _global(self, *arrays):
    return tuple(jax.make_array_from_process_local_data(self.sharding, a) for a in arrays)


class _StreamedBatches:
  """Batches of a large dataset from :class:`qflax.data.StreamingPipeline` (host
  transforms and prefetch; the epoch order is a function of (seed, epoch))."""

  def __init__(self, stream, mesh, config, eval_batch_size):
    ds = config.dataset
    sharding = NamedSharding(mesh, P("data"))
    common = dict(sharding=sharding, image_size=ds.image_size, resize_size=ds.resize_size, seed=config.seed,
                  num_workers=ds.num_workers, image_key=stream.image_key, num_frames=ds.num_frames)
    self.train = data_lib.StreamingPipeline(stream.train, config.batch_size, train=True, **common)
    self.test = data_lib.StreamingPipeline(stream.test, eval_batch_size, train=False, **common)
    self.num_train = len(stream.train)

  def steps_per_epoch(self) -> int:
    return self.train.steps_per_epoch()

  def train_epoch(self, epoch: int, start_step: int):
    for images, labels, _ in self.train.epoch(epoch, start_step):
      yield images, labels

  def eval_batches(self):
    yield from self.test.epoch(0)


def train_and_evaluate(config, workdir: str, *, step_hook: Callable[[int], None] | None = None) -> dict:
  """Trains and evaluates ``config.method`` in ``workdir``; returns the results dict.

  Re-running with the same config and workdir resumes from the latest checkpoint.

  Raises:
    ConfigError, DataUnavailableError, CheckpointError: before any compute.
    NonFiniteLossError: the loss became NaN/inf (the last good checkpoint stays).
    TrainingInterrupted: SIGTERM/SIGINT (a checkpoint was saved first).
  """
  if config.distributed and not jax.distributed.is_initialized():
    jax.distributed.initialize()   # must come before anything that touches the devices
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, "config.json")
  ckpt = Checkpoints(workdir)
  resuming = ckpt.latest_step() is not None
  if os.path.exists(config_path):
    check_resumable(config_path, _config_dict(config))
  elif resuming:
    raise CheckpointError(f"{ckpt.directory} holds checkpoints but {config_path} is missing; "
                          "choose another --workdir")

  num_devices = config_lib.num_devices(config)
  mesh = make_mesh(num_devices)
  replicated = NamedSharding(mesh, P())
  eval_batch_size = config.eval_batch_size or config.batch_size
  if config.dataset.stream or data_lib.is_streamed(config.dataset.name):
    dataset = data_lib.open_stream(config.dataset.name, data_dir=config.dataset.data_dir or None,
                                   synthetic=dict(config.dataset.synthetic), download=config.dataset.download)
    batches = _StreamedBatches(dataset, mesh, config, eval_batch_size)
    sample_images = batches.test.example(0)[0][None]
  else:
    dataset = _load_data(config)
    batches = _Batches(dataset, mesh, config.seed, config.batch_size, eval_batch_size)
    sample_images = dataset.train.images[:1]
  steps_per_epoch = batches.steps_per_epoch()
  if steps_per_epoch < 1:
    raise config_lib.ConfigError(
        f"config field batch_size={config.batch_size} is larger than the training split "
        f"({batches.num_train} examples); allowed: at most {batches.num_train}")
  method = methods.get_method(config.method.name)(config, dataset.info.num_classes, steps_per_epoch)
  phases = method.phases()
  phase_starts = np.cumsum([0] + [p.num_epochs * steps_per_epoch for p in phases])
  total_steps = int(phase_starts[-1])
  phase_of = lambda step: int(np.searchsorted(phase_starts, step, side="right") - 1)
  info = dataset.info
  sample_x = data_lib.normalize(jnp.asarray(sample_images), info.mean, info.std)

  root_key = jax.random.key(config.seed)
  state = jax.jit(method.init_state)(jax.random.fold_in(root_key, _INIT_STREAM), sample_x)
  meta = {"best_accuracy": -1.0, "train_seconds": 0.0, "images_per_second": 0.0, "phase_accuracy": {}}
  if resuming:
    step = ckpt.latest_step()
    target = method.start_phase(state, phase_of(max(step - 1, 0)))
    state, meta = ckpt.restore(step, jax.device_put(target, replicated))
  else:
    for role, path in method.pretrained_checkpoints().items():
      source = Checkpoints(path)
      arrays, _ = source.restore_arrays()
      source.close()
      state = method.load_pretrained(state, role, arrays)
    if config.quant.calibrate_batches:
      calib = [data_lib.normalize(images, info.mean, info.std)
               for images, _ in itertools.islice(batches.train_epoch(0, 0), config.quant.calibrate_batches)]
      state = method.calibrate(state, calib)
    with open(config_path, "w") as f:
      json.dump(_config_dict(config), f, indent=2)
  state = jax.device_put(state, replicated)

  def make_step(phase_index):
    def step_fn(state, images, labels):
      key = jax.random.fold_in(root_key, state.step)
      aug_key, step_key = jax.random.split(key)
      x = data_lib.normalize(data_lib.augment(aug_key, images, info.augmentation), info.mean, info.std)
      return method.train_step(state, x, labels, step_key, phase_index)
    return jax.jit(step_fn, donate_argnums=0, out_shardings=replicated)

  @jax.jit
  def eval_step(state, images, labels, mask, variant_index):
    logits = method.eval_logits(state, data_lib.normalize(images, info.mean, info.std), variant_index)
    return jnp.sum((jnp.argmax(logits, -1) == labels) & mask), jnp.sum(mask)

  variants = method.variants()

  def evaluate(state):
    accuracies = {}
    for k, variant in enumerate(variants):
      correct = count = 0
      for images, labels, mask in batches.eval_batches():
        c, n = eval_step(state, images, labels, mask, jnp.int32(k))
        correct, count = correct + c, count + n
      accuracies[variant.name] = float(correct) / max(float(count), 1.0)
    return accuracies

  log = MetricsLog(workdir)
  progress = Progress(total_steps)
  progress.message(f"qflax: {config.method.name} / {config.model.name} / {dataset.name} ({dataset.source}) on "
                   f"{num_devices} {jax.default_backend()} device(s); {total_steps} steps "
                   f"({steps_per_epoch}/epoch)" + (f"; resuming at step {int(state.step)}" if resuming else ""))
  step_fns = {}
  train_seconds = float(meta["train_seconds"])
  timed_images, timed_seconds = 0, 0.0   # throughput excludes each phase's first (compiling) window
  timed_phases = set()
  last_metrics = None

  def check_finite(metrics, step):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      kept = ckpt.latest_step()
      raise NonFiniteLossError(
          f"loss became {loss} at step {step}; training stopped. The last good checkpoint "
          f"({'step ' + str(kept) if kept is not None else 'none yet'}) is kept in {ckpt.directory}. "
          "Lower optimizer.learning_rate or check the data.")
    return loss

  def save(step, state, metrics, best=False):
    if metrics is not None:
      check_finite(metrics, step)
    meta.update(train_seconds=train_seconds)
    ckpt.save(step, state, dict(meta), best=best)

  step = int(state.step)
  if method.initial_evaluation and step == 0 and method.initial_evaluation not in meta.get("phase_accuracy", {}):
    accuracies = evaluate(state)
    meta.setdefault("phase_accuracy", {})[method.initial_evaluation] = accuracies
    progress.message(f"{method.initial_evaluation}: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in accuracies.items()))
  try:
    with _SignalFlag() as stop:
      while step < total_steps:
        phase_index = phase_of(step)
        phase = phases[phase_index]
        if step == phase_starts[phase_index]:
          state = jax.device_put(method.start_phase(state, phase_index), replicated)
        if phase_index not in step_fns:
          step_fns[phase_index] = make_step(phase_index)
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        window_start, window_steps = time.perf_counter(), 0
        for images, labels in batches.train_epoch(epoch, step_in_epoch):
          if phase_of(step) != phase_index:
            break
          state, last_metrics = step_fns[phase_index](state, images, labels)
          step, step_in_epoch, window_steps = step + 1, step_in_epoch + 1, window_steps + 1
          if step_hook is not None:
            step_hook(step)
          if step % config.log_every_steps == 0 or step_in_epoch == steps_per_epoch:
            loss = check_finite(last_metrics, step)
            now = time.perf_counter()
            elapsed = now - window_start
            if phase_index in timed_phases:
              timed_seconds += elapsed
              timed_images += window_steps * config.batch_size
            timed_phases.add(phase_index)
            train_seconds += elapsed
            rate = window_steps / elapsed if elapsed > 0 else 0.0
            log.write(step, "train", {k: v for k, v in jax.device_get(last_metrics).items()},
                      epoch=epoch, phase=phase.name)
            progress.update(step, phase=phase.name, epoch=epoch, epochs=total_steps // steps_per_epoch,
                            loss=loss, accuracy=float(last_metrics["accuracy"]),
                            images_per_second=rate * config.batch_size, steps_per_second=rate)
            window_start, window_steps = time.perf_counter(), 0
          if stop.signum is not None:
            save(step, state, last_metrics)
            ckpt.wait()
            raise TrainingInterrupted(stop.signum, step, ckpt.directory)
          if step % config.checkpoint_every_steps == 0 or step == phase_starts[phase_index + 1]:
            save(step, state, last_metrics)
        train_seconds += time.perf_counter() - window_start
        phase_ended = step == phase_starts[phase_index + 1]
        if step_in_epoch == steps_per_epoch and ((epoch + 1) % config.eval_every_epochs == 0 or phase_ended):
          accuracies = evaluate(state)
          if phase_ended:
            meta.setdefault("phase_accuracy", {})[phase.name] = accuracies
          mean_accuracy = float(np.mean(list(accuracies.values())))
          log.write(step, "eval", {f"accuracy/{k}": v for k, v in accuracies.items()}, epoch=epoch,
                    phase=phase.name)
          progress.message(f"epoch {epoch + 1}: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in accuracies.items()))
          is_best = mean_accuracy > meta["best_accuracy"]
          if is_best:
            meta["best_accuracy"] = mean_accuracy
          save(step, state, last_metrics, best=is_best)
  finally:
    ckpt.wait()
    log.close()

  if timed_images:
    meta["images_per_second"] = timed_images / timed_seconds
  accuracies = evaluate(state)
  results = {
      "method": config.method.name, "model": config.model.name, "dataset": dataset.name,
      "variants": [{"name": v.name, "w_bits": v.w_bits, "a_bits": v.a_bits, "accuracy": accuracies[v.name],
                    "model_bytes": method.model_bytes(state, k, sample_x)} for k, v in enumerate(variants)],
      "epochs": total_steps // steps_per_epoch, "train_seconds": train_seconds,
      "images_per_second": float(meta["images_per_second"]), **method.report(state),
      **method.export(state, workdir, sample_x)}
  if len(meta.get("phase_accuracy", {})) > 1:
    results["phase_accuracy"] = meta["phase_accuracy"]
  write_results(workdir, results)
  ckpt.close()
  progress.message("results: " + ", ".join(f"{v['name']} {100 * v['accuracy']:.2f}%" for v in results["variants"])
                   + f" -> {os.path.join(workdir, 'results.md')}")
  return results
