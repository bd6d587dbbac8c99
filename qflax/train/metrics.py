"""Run outputs that stream during training: JSONL log, TensorBoard events, console progress.

:class:`MetricsLog` appends to ``metrics.jsonl`` and mirrors scalars, histograms, text and hparams to
TensorBoard event files through ``tensorboardX`` (no TensorFlow needed); TensorBoard's
``EventAccumulator`` reads them back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from typing import Mapping

import numpy as np

from qflax._files import write_atomically


def _truncate_jsonl(path: str, resume_step: int) -> int:
  """Drops records with ``step > resume_step`` (and a torn last line), rewriting atomically; returns how many."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue   # a line torn by the kill
    if not isinstance(record, dict) or record.get("step", 0) <= resume_step:
      kept.append(line)
  if len(kept) == len(lines):
    return 0
  write_atomically(path, "".join(line + "\n" for line in kept))
  return len(lines) - len(kept)


@contextlib.contextmanager
def _naming(path: str):
  """Re-raises an ``OSError`` with ``path`` as its file name (a full disk's error does not name the file)."""
  try:
    yield
  except OSError as e:
    raise OSError(e.errno, e.strerror, path) from None


# TensorBoard's own bucket edges (tensorboardX's default too): +-1e-12 * 1.1^k up to 1e20, and 0.
_POSITIVE_EDGES = 1e-12 * 1.1 ** np.arange(int(np.ceil(np.log(1e32) / np.log(1.1))))
_HISTOGRAM_BINS = np.concatenate([-_POSITIVE_EDGES[::-1], [0.0], _POSITIVE_EDGES])


class _EventFile:
  """One TensorBoard event file, written synchronously.

  tensorboardX's ``SummaryWriter`` writes from a thread and flushes again at exit, so a write that fails
  (a full disk) surfaces as tracebacks from that thread and from ``atexit`` after the run has stopped.
  Here every write and flush happens in the caller and raises there, naming the file.
  """

  def __init__(self, logdir: str, purge_step: int | None):
    from tensorboardX import summary
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.record_writer import RecordWriter
    self._event, self._summary = Event, summary
    os.makedirs(logdir, exist_ok=True)
    # Nanoseconds in the name keep files of one host and second distinct and in creation order.
    self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
                                     f".{time.time_ns()}.{os.getpid()}")
    with _naming(self.path):
      self._records = RecordWriter(self.path)
    try:
      self._add(Event(file_version="brain.Event:2"))
      if purge_step is not None:   # TensorBoard drops the events of earlier files with a step >= purge_step
        self._add(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
      self.flush()
    except OSError:
      with contextlib.suppress(OSError):
        self._records.close()
      raise

  def _add(self, event):
    event.wall_time = time.time()
    with _naming(self.path):
      self._records.write(event.SerializeToString())

  def _add_summary(self, summary, step: int):
    self._add(self._event(summary=summary, step=int(step)))

  def scalar(self, tag: str, value: float, step: int):
    self._add_summary(self._summary.scalar(tag, value), step)

  def histogram(self, tag: str, values: np.ndarray, step: int):
    self._add_summary(self._summary.histogram(tag, values, bins=_HISTOGRAM_BINS), step)

  def text(self, tag: str, string: str, step: int):
    self._add_summary(self._summary.text(tag, string), step)

  def hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float], step: int):
    for summary in self._summary.hparams(hparams, metrics):
      self._add_summary(summary, step)

  def flush(self):
    with _naming(self.path):
      self._records.flush()

  def close(self):
    with _naming(self.path):
      self._records.close()   # closes the file even when its last flush fails


def _event_file(logdir: str, purge_step: int | None) -> _EventFile | None:
  """An :class:`_EventFile`, or ``None`` (with a warning) when tensorboardX is not installed."""
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    warnings.warn("tensorboardX is not installed: no TensorBoard logs (metrics.jsonl is still written); "
                  "pip install tensorboardX", stacklevel=3)
    return None
  return _EventFile(logdir, purge_step)


def _hparam_value(value):
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  return str(value)


class MetricsLog:
  """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

  Args:
    workdir: the run directory (``metrics.jsonl`` and ``tensorboard/`` go there).
    resume_step: the step of the checkpoint a resumed run restarts from. Records a killed run logged after
      it are dropped from ``metrics.jsonl``, and TensorBoard discards its events with later steps
      (``purge_step=resume_step + 1``), so no step appears twice.
  """

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.dropped = _truncate_jsonl(self.path, resume_step) if resume_step is not None else 0
    self._file = open(self.path, "a")
    try:
      self._tb = _event_file(os.path.join(workdir, "tensorboard"), None if resume_step is None else resume_step + 1)
    except BaseException:
      self._file.close()
      raise

  def write(self, step: int, split: str, values: Mapping[str, float], **context):
    """One JSONL record ``{step, split, **context, **values}``; each value also as scalar ``split/name``."""
    record = {"step": step, "split": split, **context, **{k: float(v) for k, v in values.items()}}
    with _naming(self.path):
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.scalar(f"{split}/{k}", float(v), step)
      self._tb.flush()

  def histograms(self, step: int, arrays: Mapping[str, object]):
    """A TensorBoard histogram per ``{tag: array}`` (non-finite entries are left out; empty arrays skipped)."""
    if self._tb is None:
      return
    for tag, array in arrays.items():
      values = np.asarray(array, np.float64).ravel()
      values = values[np.isfinite(values)]
      if values.size:
        self._tb.histogram(tag, values, step)
    self._tb.flush()

  def text(self, tag: str, string: str, step: int = 0):
    """A TensorBoard text entry (Markdown), shown under ``tag`` in the Text tab."""
    if self._tb is not None:
      self._tb.text(tag, string, step)
      self._tb.flush()

  def hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float], step: int | None = None):
    """Records the run's hyperparameters and final metrics for TensorBoard's HParams tab.

    ``hparams`` values that are not bool/int/float/str are stored as strings. Each ``metrics`` key is
    written as a scalar of that tag (at ``step``), so use tags no other scalar has (e.g. ``hparams/...``).
    """
    if self._tb is None:
      return
    hparams = {k: _hparam_value(v) for k, v in hparams.items()}
    metrics = {k: float(v) for k, v in metrics.items()}
    step = step or 0
    self._tb.hparams(hparams, metrics, step)
    for tag, value in metrics.items():
      self._tb.scalar(tag, value, step)
    self._tb.flush()

  def close(self):
    """Closes ``metrics.jsonl`` and the event file, both even when one fails (the first failure is raised)."""
    try:
      with _naming(self.path):
        self._file.close()    # flushes what a failed write left in the buffer: fails again on a full disk
    except OSError:
      if self._tb is not None:
        with contextlib.suppress(OSError):
          self._tb.close()
      raise
    if self._tb is not None:
      self._tb.close()


# --- Console ------------------------------------------------------------------------


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "--:--"
  seconds = int(seconds)
  h, rest = divmod(seconds, 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def _known(rate) -> bool:
  """``None``, 0 and non-finite rates mean "not measured yet"."""
  return rate is not None and math.isfinite(rate) and rate > 0


def _rate(images_per_second) -> str:
  if not _known(images_per_second):
    return "-- img/s"
  return f"{images_per_second:,.0f} img/s" if images_per_second >= 100 else f"{images_per_second:.1f} img/s"


def _columns(stream) -> int:
  """The width of the terminal ``stream`` writes to (``$COLUMNS`` wins, as in :func:`shutil.get_terminal_size`)."""
  if not os.environ.get("COLUMNS"):
    try:
      columns = os.get_terminal_size(stream.fileno()).columns
      if columns > 0:
        return columns
    except (AttributeError, OSError, ValueError):
      pass
  return shutil.get_terminal_size().columns


# What a narrow terminal gives up first: the bar (shrunk to 5, then dropped), then these fields.
_DROP_ORDER = ((), ("phase",), ("phase", "epoch"), ("phase", "epoch", "rate"))
_MIN_BAR = 5


def _bar(done: float, width: int) -> str:
  filled = min(width, max(0, int(width * done)))
  return "[" + "#" * filled + "." * (width - filled) + "]"


def _fit(done: float, fields: Mapping[str, str], compact: str, width: int) -> str:
  """The longest form of the progress line that fits in ``width`` columns (``compact``, cut, as the last)."""
  for dropped in _DROP_ORDER:
    text = " ".join(v for k, v in fields.items() if k not in dropped)
    room = width - len(text) - 3
    if not dropped and room >= _MIN_BAR:
      return f"{_bar(done, min(room, 20))} {text}"
    if len(text) <= width:
      return text
  return compact[:width]


class Progress:
  """A console progress bar: phase, epoch, step, loss, accuracy, images/s, ETA.

  On a terminal it redraws one line, fitted to the terminal's width (read at every update; ``width``
  overrides it); otherwise (CI, logs) it prints a full line per update.
  """

  def __init__(self, total_steps: int, stream=None, *, width: int | None = None):
    self.total_steps = total_steps
    self.stream = stream or sys.stderr
    self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.width = width
    self._shown = 0   # length of the progress line on screen

  def update(self, step: int, *, phase: str, epoch: int, epochs: int, loss: float, accuracy: float,
             images_per_second: float | None, steps_per_second: float | None):
    """Shows the state at ``step``; a rate of ``None`` or 0 means "unknown" (shown as ``--``)."""
    done = step / max(self.total_steps, 1)
    eta = _duration((self.total_steps - step) / steps_per_second) if _known(steps_per_second) else "--:--"
    fields = {"phase": phase, "epoch": f"epoch {epoch + 1}/{epochs}", "step": f"step {step}/{self.total_steps}",
              "loss": f"loss {loss:.4f}", "acc": f"acc {accuracy:.4f}", "rate": _rate(images_per_second),
              "eta": f"ETA {eta}"}
    if not self.interactive:
      self.stream.write(f"{_bar(done, 20)} " + " ".join(fields.values()) + "\n")
    else:
      width = max((self.width or _columns(self.stream)) - 1, 1)   # the last column would wrap on some terminals
      compact = f"{step}/{self.total_steps} loss {loss:.3f} acc {accuracy:.3f} {eta}"
      line = _fit(done, fields, compact, width)
      self.stream.write("\r" + line + " " * max(0, min(self._shown, width) - len(line)))
      self._shown = len(line)
    self.stream.flush()

  def message(self, text: str):
    """A line of its own; on a terminal the progress line stays above it."""
    self.stream.write(("\n" if self.interactive and self._shown else "") + text + "\n")
    self._shown = 0
    self.stream.flush()
