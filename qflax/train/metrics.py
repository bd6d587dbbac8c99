"""Run outputs that stream during training: JSONL log, TensorBoard events, console progress.

:class:`MetricsLog` appends to ``metrics.jsonl`` and mirrors scalars, histograms, text and hparams to
TensorBoard event files through ``tensorboardX`` (no TensorFlow needed). :func:`read_event_scalars` is a small
dependency-free reader of those files' scalars, for tests and tools.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import warnings
from typing import Mapping

import numpy as np

# --- Reading TensorBoard event files -------------------------------------------
# An event file is a sequence of TFRecords (length, masked CRC-32C of the length,
# data, masked CRC-32C of the data) holding serialized ``tensorflow.Event``
# protos: wall_time=1, step=2, summary=5{value=1{tag=1, simple_value=2}},
# session_log=7{status=1, START=1}.


def _crc32c_table():
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord framing uses it."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _event_files(path: str) -> list[str]:
  if not os.path.isdir(path):
    return [path]
  names = sorted(n for n in os.listdir(path) if "tfevents" in n and os.path.isfile(os.path.join(path, n)))
  return [os.path.join(path, n) for n in names]


def _records(path: str):
  """Yields each record's payload, checking both CRCs."""
  with open(path, "rb") as f:
    raw = f.read()
  pos = 0
  while pos < len(raw):
    header = raw[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    if struct.unpack("<I", raw[pos + 8:pos + 12])[0] != masked_crc32c(header):
      raise ValueError(f"{path}: bad length CRC at byte {pos}")
    payload = raw[pos + 12:pos + 12 + length]
    if struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])[0] != masked_crc32c(payload):
      raise ValueError(f"{path}: bad data CRC at byte {pos}")
    pos += 16 + length
    yield payload


def read_event_scalars(path: str) -> list[tuple[int, str, float]]:
  """Reads back ``(step, tag, value)`` scalar triples from an event file or a directory of them.

  Files are read in name (= creation time) order. Like TensorBoard, a ``SessionLog.START`` event at step
  ``s`` (written by a writer opened with ``purge_step=s``) discards the triples read so far with step >= s.
  Non-scalar summaries (histograms, text, hparams) are skipped. Every CRC is checked.
  """
  out = []
  for file in _event_files(path):
    for payload in _records(file):
      fields = list(_parse_fields(payload))
      step = next((v for n, v in fields if n == 2), 0)
      if any(n == 7 and dict(_parse_fields(v)).get(1) == 1 for n, v in fields):
        out = [t for t in out if t[0] < step]
      out.extend(_parse_scalars(step, fields))
  return out


def _read_varint(buf, pos):
  result = shift = 0
  while True:
    byte = buf[pos]
    result |= (byte & 0x7F) << shift
    pos += 1
    if not byte & 0x80:
      return result, pos
    shift += 7


def _parse_fields(buf):
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      length, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + length], pos + length
    yield number, value


def _parse_scalars(step, fields):
  for number, summary in fields:
    if number == 5:
      for _, value in _parse_fields(summary):
        parts = dict(_parse_fields(value))
        if 2 in parts:   # simple_value
          yield step, parts[1].decode(), struct.unpack("<f", parts[2])[0]


# --- metrics.jsonl and TensorBoard -------------------------------------------------


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
  fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".jsonl", dir=os.path.dirname(path) or ".")
  with os.fdopen(fd, "w") as f:
    f.write("".join(line + "\n" for line in kept))
  os.replace(tmp, path)
  return len(lines) - len(kept)


def _summary_writer(logdir: str, purge_step: int | None):
  """A tensorboardX ``SummaryWriter``, or ``None`` (with a warning) when tensorboardX is not installed."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    warnings.warn("tensorboardX is not installed: no TensorBoard logs (metrics.jsonl is still written); "
                  "pip install tensorboardX", stacklevel=3)
    return None
  # Nanoseconds in the name keep files of one host and second distinct and in creation order.
  return SummaryWriter(logdir, purge_step=purge_step, filename_suffix=f".{time.time_ns()}.{os.getpid()}")


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
    self._tb = _summary_writer(os.path.join(workdir, "tensorboard"),
                               None if resume_step is None else resume_step + 1)

  def write(self, step: int, split: str, values: Mapping[str, float], **context):
    """One JSONL record ``{step, split, **context, **values}``; each value also as scalar ``split/name``."""
    record = {"step": step, "split": split, **context, **{k: float(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), step)
      self._tb.flush()

  def histograms(self, step: int, arrays: Mapping[str, object]):
    """A TensorBoard histogram per ``{tag: array}`` (non-finite entries are left out; empty arrays skipped)."""
    if self._tb is None:
      return
    for tag, array in arrays.items():
      values = np.asarray(array, np.float64).ravel()
      values = values[np.isfinite(values)]
      if values.size:
        self._tb.add_histogram(tag, values, step)
    self._tb.flush()

  def text(self, tag: str, string: str, step: int = 0):
    """A TensorBoard text entry (Markdown), shown under ``tag`` in the Text tab."""
    if self._tb is not None:
      self._tb.add_text(tag, string, step)
      self._tb.flush()

  def hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float], step: int | None = None):
    """Records the run's hyperparameters and final metrics for TensorBoard's HParams tab.

    ``hparams`` values that are not bool/int/float/str are stored as strings. Each ``metrics`` key is
    written as a scalar of that tag (at ``step``), so use tags no other scalar has (e.g. ``hparams/...``).
    """
    if self._tb is None:
      return
    from tensorboardX.summary import hparams as hparams_summary
    hparams = {k: _hparam_value(v) for k, v in hparams.items()}
    metrics = {k: float(v) for k, v in metrics.items()}
    writer = self._tb.file_writer   # this run's file, not the subdirectory add_hparams would make
    for summary in hparams_summary(hparams, metrics):
      writer.add_summary(summary, step)
    for tag, value in metrics.items():
      self._tb.add_scalar(tag, value, step)
    self._tb.flush()

  def close(self):
    self._file.close()
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
