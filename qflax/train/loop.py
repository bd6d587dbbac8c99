"""The one training loop: any method, on one device or many, resumable.

``train_and_evaluate(config, workdir)`` validates the config, loads the data,
builds the method, then runs its phases. Data parallelism is ``jax.jit`` over a
one-axis ``Mesh('data')`` (``AxisType.Auto``): the state is replicated, each
batch is sharded, XLA inserts the gradient all-reduce. The step number fixes the
phase, the epoch, the batch (the epoch order is a function of (seed, epoch)) and
the random key (``fold_in(key(seed), step)``), so a resumed run repeats an
uninterrupted one exactly.

The loop is four functions: :func:`setup` (settings, data, method, mesh),
:func:`initial_state` (restore, or initialise, start from other runs and prepare),
:func:`run_phase` (train one phase, evaluating and checkpointing on the way) and
:func:`finish` (the final report).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from qflax import data as data_lib
from qflax import methods
from qflax.methods.base import Method, Task, TrainState
from qflax.train import config as config_lib
from qflax.train.checkpoint import (CheckpointError, Checkpoints, WorkdirLock, check_resumable, check_same_data,
                                    start_variables, write_task)
from qflax.train.health import HealthMonitor
from qflax.train.metrics import MetricsLog, Progress
from qflax.train.results import write_results

_INIT_STREAM = 2**31 - 1   # fold_in stream of the initialisation key (steps use 0, 1, 2, ...)
# With several processes, they agree on a stop signal at least every this many steps
# (and at every logged step and epoch end), so all stop at the same step.
_SIGNAL_SYNC_STEPS = 10


class TrainingInterrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of the last step was saved."""

  def __init__(self, signum: int, step: int, directory: str):
    super().__init__(f"stopped by signal {signum} after step {step}; checkpoint saved in {directory}; "
                     "run the same command again to resume")
    self.signum, self.step = signum, step


class NonFiniteLossError(FloatingPointError):
  """The loss or the state became NaN or infinite; the last good checkpoint is kept."""


def make_mesh(num_devices: int) -> jax.sharding.Mesh:
  devices = jax.devices()[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


class _SignalFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks after every step.

  With several processes a signal may reach only some of them, and all must stop at
  the same step (the checkpoint is a collective): :meth:`agreed` then shares the flags
  at steps every process checks alike.
  """

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

  def agreed(self, sync: bool) -> int | None:
    """The signal to stop on now: this process's own when it runs alone; with several
    processes, the first one any process received, exchanged when ``sync`` (every
    process passes the same ``sync`` points), else ``None``."""
    if jax.process_count() == 1:
      return self.signum
    if not sync:
      return None
    received = [int(s) for s in multihost_utils.process_allgather(np.int32(self.signum or 0)) if s]
    return received[0] if received else None


class Run(NamedTuple):
  """What stays fixed for a whole run."""
  config: config_lib.Config
  config_dict: dict
  workdir: str
  method: Method
  batches: object                 # data.DeviceBatches or data.StreamedBatches
  dataset: str
  source: str
  info: data_lib.DatasetInfo
  replicated: NamedSharding
  phase_starts: np.ndarray        # step at which each phase starts, and the total
  steps_per_epoch: int
  step_fns: dict                  # phase index -> jitted train step
  eval_step: Callable

  @property
  def total_steps(self) -> int:
    return int(self.phase_starts[-1])

  def phase_of(self, step: int) -> int:
    return int(np.searchsorted(self.phase_starts, step, side="right") - 1)

  def train_step(self, phase_index: int):
    if phase_index not in self.step_fns:
      self.step_fns[phase_index] = _jit_train_step(self, phase_index)
    return self.step_fns[phase_index]


def _jit_train_step(run: Run, phase_index: int):
  root_key, info = jax.random.key(run.config.run.seed), run.info

  def step_fn(state, images, labels):
    key = jax.random.fold_in(root_key, state.step)
    aug_key, step_key = jax.random.split(key)
    x = data_lib.normalize(data_lib.augment(aug_key, images, info.augmentation), info.mean, info.std)
    return run.method.train_step(state, x, labels, step_key, phase_index)
  return jax.jit(step_fn, donate_argnums=0, out_shardings=run.replicated)


def load_batches(loop: config_lib.LoopSettings, seed: int, mesh):
  """``(batches, dataset name, source, DatasetInfo)`` for the loop's dataset settings."""
  ds = loop.dataset
  sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  sizes = dict(seed=seed, batch_size=loop.batch_size, eval_batch_size=loop.eval_batch)
  if ds.streamed:
    stream = data_lib.open_stream(ds.name, data_dir=ds.data_dir or None, synthetic=dataclasses.asdict(ds.synthetic),
                                  download=ds.download)
    batches = data_lib.StreamedBatches(stream, sharding, image_size=ds.image_size, resize_size=ds.resize_size,
                                       num_frames=ds.num_frames, num_workers=ds.num_workers, **sizes)
    return batches, stream.name, stream.source, stream.info
  dataset = data_lib.load_dataset(
      ds.name, data_dir=ds.data_dir or None, idx_dir=ds.idx_dir or None, train_limit=ds.train_limit,
      eval_limit=ds.eval_limit, download=ds.download, synthetic=dataclasses.asdict(ds.synthetic))
  # Every process holds the whole (small) dataset and feeds its devices' rows of each global batch.
  return data_lib.DeviceBatches(dataset, sharding, replicated, **sizes), dataset.name, dataset.source, dataset.info


def setup(config, workdir: str) -> Run:
  """Validates ``config`` and the runs it starts from, loads the data, builds the method.

  Raises ``ConfigError``, ``DataUnavailableError`` or ``CheckpointError`` before any
  compute, leaving ``workdir`` as it was.
  """
  settings = config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  config_dict = json.loads(config.to_json_best_effort())
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    check_resumable(config_path, config_dict)
  mesh = make_mesh(settings.loop.devices)
  batches, name, source, info = load_batches(settings.loop, settings.run.seed, mesh)
  steps_per_epoch = batches.steps_per_epoch()
  if steps_per_epoch < 1:
    raise config_lib.ConfigError(
        f"config field batch_size={settings.loop.batch_size} is larger than the training split "
        f"({batches.num_train} examples); allowed: at most {batches.num_train}")
  task = Task(info.num_classes, tuple(np.shape(batches.sample)), steps_per_epoch)
  method = methods.get_method(settings.method_name)(settings.method, task)
  phase_starts = np.cumsum([0] + [p.num_epochs * steps_per_epoch for p in method.phases])
  return Run(settings, config_dict, workdir, method, batches, name, source, info, NamedSharding(mesh, P()),
             phase_starts, steps_per_epoch, {}, make_eval_step(method, info.mean, info.std))


def make_eval_step(method: Method, mean, std):
  """``(state, images, labels, mask, variant_index) -> (correct, count)``, jitted once for
  every variant (the index is traced)."""
  @jax.jit
  def eval_step(state, images, labels, mask, variant_index):
    logits = method.eval_logits(state, data_lib.normalize(images, mean, std), variant_index)
    return jnp.sum((jnp.argmax(logits, -1) == labels) & mask), jnp.sum(mask)
  return eval_step


def initial_state(run: Run, ckpt: Checkpoints) -> tuple[TrainState, dict]:
  """The latest checkpoint's state and metadata, or a fresh state started from the
  configured runs and prepared on ``prepare_batches`` training batches."""
  method = run.method
  state = jax.jit(method.init_state)(jax.random.fold_in(jax.random.key(run.config.run.seed), _INIT_STREAM))
  latest = ckpt.latest_step()
  if latest is not None:
    if latest > run.total_steps:
      raise CheckpointError(f"{ckpt.directory}/{latest} is beyond this run's {run.total_steps} steps: a checkpoint "
                            "of another config, or not a checkpoint at all; move it away or choose another --workdir")
    target_for = lambda step: jax.device_put(method.start_phase(state, run.phase_of(max(step - 1, 0))),
                                             run.replicated)
    _, state, meta = ckpt.restore_latest_good(target_for)
    return state, meta
  for start in run.config.method.starts:
    state = method.load_start(state, start, start_variables(start))
  if method.prepare_batches:
    info = run.info
    batches = [data_lib.normalize(images, info.mean, info.std)
               for images, _ in itertools.islice(run.batches.train_epoch(0, 0), method.prepare_batches)]
    state = method.prepare(state, batches)
  if jax.process_index() == 0:
    write_task(run.workdir, method.task, run.info, run.batches.fingerprint())
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      json.dump(run.config_dict, f, indent=2)
  meta = {"best_accuracy": -1.0, "best_step": None, "train_seconds": 0.0, "train_images": 0, "timed_seconds": 0.0,
          "timed_images": 0, "phase_accuracy": {}}
  return jax.device_put(state, run.replicated), meta


def evaluate_variants(eval_step, variants, batches, state: TrainState) -> dict[str, float]:
  """Top-1 accuracy of every variant on the evaluation split of ``batches``."""
  accuracies = {}
  for k, variant in enumerate(variants):
    correct = count = 0
    for images, labels, mask in batches.eval_batches():
      c, n = eval_step(state, images, labels, mask, jnp.int32(k))
      correct, count = correct + c, count + n
    accuracies[variant.name] = float(correct) / max(float(count), 1.0)
  return accuracies


def evaluate(run: Run, state: TrainState) -> dict[str, float]:
  return evaluate_variants(run.eval_step, run.method.variants, run.batches, state)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class _NullLog:
  """The metrics log of processes other than 0."""

  def write(self, *args, **kwargs):
    pass

  def close(self):
    pass


class _Session:
  """The mutable parts of a run while it trains: outputs, timing, metadata."""

  def __init__(self, run: Run, ckpt: Checkpoints, meta: dict, resume_step: int | None, stop: _SignalFlag,
               step_hook):
    self.run, self.ckpt, self.meta, self.stop, self.step_hook = run, ckpt, meta, stop, step_hook
    self.resume_step = resume_step
    # Process 0 writes the logs and results; every process trains and checkpoints.
    self.writer = jax.process_index() == 0
    self.log = MetricsLog(run.workdir, resume_step=resume_step) if self.writer else _NullLog()
    self.progress = Progress(run.total_steps)
    self.health = HealthMonitor(run.method, self.progress.message) if run.config.run.quant.monitor else None
    self.timed_phases: set[int] = set()   # phases whose first (compiling) window this process has run

  def save(self, step: int, state: TrainState, *, accuracy: float | None = None):
    """Checkpoints ``state`` unless it holds a NaN or infinity (then stops the run)."""
    if not bool(_all_finite(state.params)) or not bool(_all_finite(state.opt_state)):
      raise self._stopped("the training state became non-finite", step)
    self.ckpt.save(step, state, dict(self.meta), accuracy=accuracy)

  def check_loss(self, metrics, step: int) -> float:
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise self._stopped(f"loss became {loss}", step)
    return loss

  def _stopped(self, what: str, step: int) -> NonFiniteLossError:
    kept = self.ckpt.latest_step()
    where = (f"The last good checkpoint (step {kept}) is kept in {self.ckpt.directory}." if kept is not None
             else "No checkpoint had been written yet.")
    return NonFiniteLossError(f"{what} at step {step}; training stopped. {where} "
                              "Lower optimizer.learning_rate or check the data.")

  def record_window(self, phase_index: int, steps: int, seconds: float):
    """Records a window of ``steps`` steps; returns its images per second. The run's
    throughput, kept in ``meta`` across resumed sessions, excludes each session's first
    (compiling) window of a phase."""
    images, meta = steps * self.run.config.loop.batch_size, self.meta
    meta["train_seconds"] += seconds
    meta["train_images"] = meta.get("train_images", 0) + images
    if phase_index in self.timed_phases:
      meta["timed_seconds"] = meta.get("timed_seconds", 0.0) + seconds
      meta["timed_images"] = meta.get("timed_images", 0) + images
    self.timed_phases.add(phase_index)
    return images / seconds if seconds > 0 else 0.0

  def images_per_second(self) -> float:
    meta = self.meta
    if meta.get("timed_images"):
      return meta["timed_images"] / meta["timed_seconds"]
    return meta.get("train_images", 0) / meta["train_seconds"] if meta["train_seconds"] else 0.0

  def evaluation(self, step: int, state: TrainState, phase, epoch: int, phase_ended: bool):
    """Evaluates, records, then checkpoints with the updated metadata (and ``best``)."""
    accuracies = evaluate(self.run, state)
    if phase_ended:
      self.meta["phase_accuracy"][phase.name] = accuracies
    self.log.write(step, "eval", {f"accuracy/{k}": v for k, v in accuracies.items()}, epoch=epoch, phase=phase.name)
    self.progress.message(f"epoch {epoch + 1}: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in accuracies.items()))
    mean_accuracy = float(np.mean(list(accuracies.values())))
    if mean_accuracy > self.meta["best_accuracy"]:
      self.meta.update(best_accuracy=mean_accuracy, best_step=step)
    self.save(step, state, accuracy=mean_accuracy)

  def log_train(self, step: int, state: TrainState, images, metrics, phase, epoch: int, rate: float):
    """Logs the step's metrics (and quantizer health); ``rate`` is the window's images per second."""
    loss = self.check_loss(metrics, step)
    learning_rate = float(phase.learning_rate(step - int(self.run.phase_starts[self.run.phase_of(step - 1)])))
    self.log.write(step, "train", {**jax.device_get(metrics), "learning_rate": learning_rate}, epoch=epoch,
                   phase=phase.name)
    if self.health is not None:
      info = self.run.info
      self.log.write(step, "quant", self.health.observe(step, state, data_lib.normalize(images, info.mean, info.std)),
                     epoch=epoch, phase=phase.name)
    self.progress.update(step, phase=phase.name, epoch=epoch, epochs=self.run.total_steps // self.run.steps_per_epoch,
                         loss=loss, accuracy=float(metrics["accuracy"]),
                         images_per_second=rate, steps_per_second=rate / self.run.config.loop.batch_size)

  def check_signal(self, step: int, state: TrainState, *, sync: bool = True):
    """Checkpoints and stops if a signal arrived (``sync``: see :meth:`_SignalFlag.agreed`)."""
    signum = self.stop.agreed(sync)
    if signum is not None:
      if self.ckpt.latest_step() != step:
        self.save(step, state)
      self.ckpt.wait()
      raise TrainingInterrupted(signum, step, self.ckpt.directory)


def run_phase(session: _Session, state: TrainState, phase_index: int) -> TrainState:
  """Trains phase ``phase_index`` from ``state.step`` to its end, evaluating at epoch
  ends (every ``eval_every_epochs`` and at the phase end) and checkpointing every
  ``checkpoint_every_steps``, at evaluations and at the end."""
  run, loop = session.run, session.run.config.loop
  phase = run.method.phases[phase_index]
  start, end = int(run.phase_starts[phase_index]), int(run.phase_starts[phase_index + 1])
  step = int(state.step)
  if step == start:
    before = f"before_{phase.name}"
    if phase.evaluate_before and before not in session.meta["phase_accuracy"]:
      session.meta["phase_accuracy"][before] = accuracies = evaluate(run, state)
      session.progress.message(f"{before}: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in accuracies.items()))
    state = jax.device_put(run.method.start_phase(state, phase_index), run.replicated)
  train_step = run.train_step(phase_index)
  while step < end:
    epoch, offset = divmod(step, run.steps_per_epoch)
    window_start, window_steps = time.perf_counter(), 0
    for images, labels in run.batches.train_epoch(epoch, offset):
      state, metrics = train_step(state, images, labels)
      step, offset, window_steps = step + 1, offset + 1, window_steps + 1
      if session.step_hook is not None:
        session.step_hook(step)
      epoch_ended = offset == run.steps_per_epoch
      logged = step % loop.log_every_steps == 0 or epoch_ended
      if logged:
        jax.block_until_ready((state, metrics))   # dispatch is asynchronous: time the finished steps
        rate = session.record_window(phase_index, window_steps, time.perf_counter() - window_start)
        session.log_train(step, state, images, metrics, phase, epoch, rate)
        window_start, window_steps = time.perf_counter(), 0
      session.check_signal(step, state, sync=logged or step % _SIGNAL_SYNC_STEPS == 0)
      if epoch_ended and ((epoch + 1) % loop.eval_every_epochs == 0 or step == end):
        session.evaluation(step, state, phase, epoch, phase_ended=step == end)
      elif step % loop.checkpoint_every_steps == 0 or step == end:
        session.save(step, state)
      if step == end:
        break
    if window_steps:
      jax.block_until_ready(state)
      session.record_window(phase_index, window_steps, time.perf_counter() - window_start)
  return state


def finish(session: _Session, state: TrainState) -> dict:
  """Writes ``results.json``/``.md`` and the plot; returns the results. A run that had
  already finished keeps the results it wrote then (its throughput and quantizer health
  were measured by the session that trained)."""
  run = session.run
  method = run.method
  written = os.path.join(run.workdir, "results.json")
  if session.writer and session.resume_step == run.total_steps and os.path.exists(written):
    try:
      with open(written) as f:
        return _announce(session, json.load(f))
    except (ValueError, KeyError, TypeError):
      pass   # a damaged results.json is written again
  stored = session.meta["phase_accuracy"].get(method.phases[-1].name) or {}
  # A checkpoint from before a variant was renamed lacks the new name: evaluate again.
  accuracies = stored if all(v.name in stored for v in method.variants) else evaluate(run, state)
  if not session.writer:
    return {"variants": [{"name": v.name, "accuracy": accuracies[v.name]} for v in method.variants]}
  extra = method.finalize(state, run.workdir)
  model_bytes = extra.pop("model_bytes")
  results = {
      "method": run.config.method_name, "model": run.config.run.model.name, "dataset": run.dataset,
      "variants": [{"name": v.name, "w_bits": v.w_bits, "a_bits": v.a_bits, "accuracy": accuracies[v.name],
                    "model_bytes": int(model_bytes[v.name])} for v in method.variants],
      "epochs": run.total_steps // run.steps_per_epoch, "train_seconds": float(session.meta["train_seconds"]),
      "images_per_second": session.images_per_second(), **extra}
  if len(session.meta["phase_accuracy"]) > 1:
    results["phase_accuracy"] = session.meta["phase_accuracy"]
  if session.health is not None:
    results["quantizer_health"] = session.health.summary()
  write_results(run.workdir, results)
  return _announce(session, results)


def _announce(session: _Session, results: dict) -> dict:
  session.progress.message("results: " + ", ".join(f"{v['name']} {100 * v['accuracy']:.2f}%"
                                                   for v in results["variants"])
                           + f" -> {os.path.join(session.run.workdir, 'results.md')}")
  return results


def train_and_evaluate(config, workdir: str, *, step_hook: Callable[[int], None] | None = None) -> dict:
  """Trains and evaluates ``config.method`` in ``workdir``; returns the results dict.

  Re-running with the same config and workdir resumes from the latest checkpoint.

  Raises:
    ConfigError, DataUnavailableError, CheckpointError: before any compute.
    NonFiniteLossError: the loss or the state became NaN/inf (the last good checkpoint stays).
    TrainingInterrupted: SIGTERM/SIGINT (a checkpoint was saved first).
  """
  if config.get("distributed") and not jax.distributed.is_initialized():
    jax.distributed.initialize()   # must come before anything that touches the devices
  run = setup(config, workdir)
  os.makedirs(run.workdir, exist_ok=True)
  with WorkdirLock(run.workdir) if jax.process_index() == 0 else _NoLock():
    return _train(run, step_hook)


class _NoLock:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _train(run: Run, step_hook) -> dict:
  with Checkpoints(run.workdir, warn=lambda m: print(m, file=sys.stderr)) as ckpt:
    return _train_with(run, ckpt, step_hook)


def _train_with(run: Run, ckpt: Checkpoints, step_hook) -> dict:
  if ckpt.latest_step() is not None:
    if not os.path.exists(os.path.join(run.workdir, "config.json")):
      raise CheckpointError(f"{ckpt.directory} holds checkpoints but {run.workdir}/config.json is missing; "
                            "choose another --workdir")
    check_same_data(run.workdir, run.batches.fingerprint())
  resuming = ckpt.latest_step() is not None
  state, meta = initial_state(run, ckpt)
  resume_step = int(state.step) if resuming else None
  with _SignalFlag() as stop:
    session = _Session(run, ckpt, meta, resume_step, stop, step_hook)
    session.progress.message(
        f"qflax: {run.config.method_name} / {run.config.run.model.name} / {run.dataset} ({run.source}) on "
        f"{run.config.loop.devices} {jax.default_backend()} device(s); {run.total_steps} steps "
        f"({run.steps_per_epoch}/epoch)" + (f"; resuming at step {int(state.step)}" if resume_step else ""))
    try:
      for phase_index in range(run.phase_of(int(state.step)), len(run.method.phases)):
        if int(state.step) < run.phase_starts[phase_index + 1]:
          state = run_phase(session, state, phase_index)
      session.check_signal(int(state.step), state)
      results = finish(session, state)
    finally:
      try:
        ckpt.wait()
      finally:
        session.log.close()
  return results
