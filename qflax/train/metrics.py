"""Run outputs that stream during training: JSONL log, TensorBoard events, console progress."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Mapping

# --- TensorBoard event files, written without TensorFlow ---------------------
# An event file is a sequence of TFRecords (length, masked CRC-32C of the length,
# data, masked CRC-32C of the data) holding serialized ``tensorflow.Event``
# protos. Scalars use Event{wall_time=1, step=2, summary=5{value=1{tag=1,
# simple_value=2}}}; the first record carries file_version=3 "brain.Event:2".


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
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits, value = value & 0x7F, value >> 7
    out.append(bits | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  key = _varint((number << 3) | wire)
  if wire == 2:
    return key + _varint(len(payload)) + payload
  return key + payload


def _event(wall_time: float, step: int | None = None, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
  out = _field(1, 1, struct.pack("<d", wall_time))
  if step is not None:
    out += _field(2, 0, _varint(step))
  if file_version is not None:
    out += _field(3, 2, file_version.encode())
  if scalars:
    values = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
                      for tag, value in scalars.items())
    out += _field(5, 2, values)
  return out


def _record(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class TensorBoardWriter:
  """Scalar summaries in a TensorBoard event file (``tensorboard --logdir <dir>``)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._file.write(_record(_event(time.time(), file_version="brain.Event:2")))
    self._file.flush()

  def scalars(self, step: int, values: Mapping[str, float]):
    self._file.write(_record(_event(time.time(), step=step, scalars=values)))
    self._file.flush()

  def close(self):
    self._file.close()


def read_event_scalars(path: str) -> list[tuple[int, str, float]]:
  """Reads back ``(step, tag, value)`` triples, checking every CRC (for tests and tools)."""
  out = []
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
    out.extend(_parse_scalars(payload))
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


def _parse_scalars(event: bytes):
  fields = list(_parse_fields(event))
  step = next((v for n, v in fields if n == 2), 0)
  for number, summary in fields:
    if number == 5:
      for _, value in _parse_fields(summary):
        parts = dict(_parse_fields(value))
        yield step, parts[1].decode(), struct.unpack("<f", parts[2])[0]


# --- JSONL and console ----------------------------------------------------------


class MetricsLog:
  """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a")
    self._tb = TensorBoardWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: Mapping[str, float], **context):
    record = {"step": step, "split": split, **context, **{k: float(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    self._tb.scalars(step, {f"{split}/{k}": float(v) for k, v in values.items()})

  def close(self):
    self._file.close()
    self._tb.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "--:--"
  seconds = int(seconds)
  h, rest = divmod(seconds, 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
  """A console progress bar: phase, epoch, step, loss, accuracy, images/s, ETA.

  On a terminal it redraws one line; otherwise (CI, logs) it prints a line per update.
  """

  def __init__(self, total_steps: int, stream=None):
    self.total_steps = total_steps
    self.stream = stream or sys.stderr
    self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()

  def update(self, step: int, *, phase: str, epoch: int, epochs: int, loss: float, accuracy: float,
             images_per_second: float, steps_per_second: float):
    done = step / max(self.total_steps, 1)
    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
    eta = _duration((self.total_steps - step) / steps_per_second) if steps_per_second else "--:--"
    line = (f"[{bar}] {phase} epoch {epoch + 1}/{epochs} step {step}/{self.total_steps} "
            f"loss {loss:.4f} acc {accuracy:.4f} {images_per_second:,.0f} img/s ETA {eta}")
    self.stream.write("\r" + line.ljust(120) if self.interactive else line + "\n")
    self.stream.flush()

  def message(self, text: str):
    self.stream.write(("\n" if self.interactive else "") + text + "\n")
    self.stream.flush()
