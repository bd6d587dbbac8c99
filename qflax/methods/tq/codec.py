"""The compressed model file: packed integer codes per block, steps, bases, allocation.

Layout: ``b"QFTQ"``, a format version byte, the header length (8 bytes, little
endian), a JSON header, the payload, and the CRC-32 of everything before it
(4 bytes). The header lists every compressed layer (path, kernel shape, mode,
block bounds, per-block rates and steps) and every other parameter (name, shape);
the payload holds, per layer and block, T's codes then S's codes (``R``-bit codes
offset by ``2^(R-1)``, packed several per byte for ``R <= 4``; no S codes where S
is the identity), then the other
parameters as float32. A truncated or altered file fails its checks with
:class:`CompressedFileError` before anything is decoded.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import flax
import numpy as np
from flax import traverse_util

from qflax import quant
from qflax.methods.tq.compress import QuantizedLayer

MAGIC = b"QFTQ"
VERSION = 1


class CompressedFileError(ValueError):
  """A compressed model file is truncated, altered or not one at all."""


def _codes(values: np.ndarray, rate: int, step: float) -> np.ndarray:
  if rate == 0:
    return np.zeros(values.size, np.int64)
  half = 2 ** (rate - 1)
  return (np.clip(np.round(values / step), -half, half - 1) + half).astype(np.int64).reshape(-1)


def _values(codes: np.ndarray, rate: int, step: float, shape) -> np.ndarray:
  if rate == 0:
    return np.zeros(shape)
  return ((codes.astype(np.float64) - 2 ** (rate - 1)) * step).reshape(shape)


def encode(layers: list[QuantizedLayer], other_params) -> bytes:
  """The file's bytes for quantized ``layers`` and the remaining parameters."""
  header = {"layers": [], "params": []}
  payload = bytearray()
  for layer in layers:
    header["layers"].append({"path": list(layer.path), "shape": list(layer.shape), "mode": layer.mode,
                             "rows": list(layer.T.shape), "bounds": [list(b) for b in layer.bounds],
                             "t_rates": layer.t_rates, "t_steps": layer.t_steps, "s_rates": layer.s_rates,
                             "s_steps": layer.s_steps})
    for b, ((lo, hi), rt, st) in enumerate(zip(layer.bounds, layer.t_rates, layer.t_steps)):
      payload += quant.pack_codes(_codes(layer.T[lo:hi], rt, st), rt).tobytes()
      if layer.s_rates:
        rs, ss = layer.s_rates[b], layer.s_steps[b]
        payload += quant.pack_codes(_codes(layer.S[:, lo:hi], rs, ss), rs).tobytes()
  for path, value in traverse_util.flatten_dict(flax.core.unfreeze(other_params)).items():
    value = np.asarray(value, np.float32)
    header["params"].append({"path": list(path), "shape": list(value.shape)})
    payload += value.tobytes()
  head = json.dumps(header).encode()
  body = MAGIC + bytes([VERSION]) + struct.pack("<Q", len(head)) + head + bytes(payload)
  return body + struct.pack("<I", zlib.crc32(body))


def decode(data: bytes) -> tuple[list[QuantizedLayer], dict]:
  """``(layers, other parameters)`` from :func:`encode`'s bytes, after checking them."""
  if len(data) < 17 or data[:4] != MAGIC:
    raise CompressedFileError("not a qflax compressed model file (bad magic number or too short)")
  if data[4] != VERSION:
    raise CompressedFileError(f"compressed model format version {data[4]} is not supported (this is {VERSION})")
  (crc,) = struct.unpack("<I", data[-4:])
  if zlib.crc32(data[:-4]) != crc:
    raise CompressedFileError("compressed model file is truncated or altered (checksum mismatch)")
  (head_len,) = struct.unpack("<Q", data[5:13])
  header = json.loads(data[13:13 + head_len])
  payload = memoryview(data[13 + head_len:-4])
  offset = 0

  def take(n):
    nonlocal offset
    if offset + n > len(payload):
      raise CompressedFileError("compressed model file is shorter than its header says")
    chunk = payload[offset:offset + n]
    offset += n
    return chunk

  layers = []
  for entry in header["layers"]:
    rows, cols = entry["rows"]
    t = np.zeros((rows, cols))
    s = np.zeros((rows, rows)) if entry["s_rates"] else np.eye(rows)
    for b, ((lo, hi), rt, st) in enumerate(zip(entry["bounds"], entry["t_rates"], entry["t_steps"])):
      n_t, n_s = (hi - lo) * cols, rows * (hi - lo)
      t[lo:hi] = _values(quant.unpack_codes(take(quant.packed_size_bytes(n_t, rt) if rt else 0), rt, n_t), rt, st,
                         (hi - lo, cols))
      if entry["s_rates"]:
        rs, ss = entry["s_rates"][b], entry["s_steps"][b]
        s[:, lo:hi] = _values(quant.unpack_codes(take(quant.packed_size_bytes(n_s, rs) if rs else 0), rs, n_s),
                              rs, ss, (rows, hi - lo))
    layers.append(QuantizedLayer(tuple(entry["path"]), tuple(entry["shape"]), entry["mode"],
                                 [tuple(b) for b in entry["bounds"]], entry["t_rates"], entry["t_steps"],
                                 entry["s_rates"], entry["s_steps"], s, t))
  params = {}
  for entry in header["params"]:
    n = int(np.prod(entry["shape"])) * 4
    params[tuple(entry["path"])] = np.frombuffer(bytes(take(n)), np.float32).reshape(entry["shape"])
  if offset != len(payload):
    raise CompressedFileError("compressed model file has trailing data its header does not describe")
  return layers, traverse_util.unflatten_dict(params) if params else {}


def save(path: str, layers: list[QuantizedLayer], other_params) -> int:
  """Writes the file (atomically) and returns its size in bytes."""
  data = encode(layers, other_params)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
  return len(data)


def load(path: str) -> tuple[list[QuantizedLayer], dict]:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise CompressedFileError(f"cannot read compressed model file {path}: {e}") from e
  try:
    return decode(data)
  except CompressedFileError as e:
    raise CompressedFileError(f"{path}: {e}") from None
