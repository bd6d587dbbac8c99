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

import collections
import json
import math
import struct
import zlib

import flax
import numpy as np
from flax import traverse_util

from qflax import quant
from qflax._files import write_atomically
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


# Limits a forged header cannot get past: JSON nesting (the real header nests 4 deep), and the
# weights a file may describe: rate-0 blocks and identity bases take no payload bytes, so their
# number is capped by the payload's size (256 per byte, about 1/32 bit per weight, plus a base).
MAX_HEADER_DEPTH = 8
BASE_ELEMENTS = 1 << 22
ELEMENTS_PER_BYTE = 256
MAX_RATE = 8
_LAYER_KEYS = frozenset({"path", "shape", "mode", "rows", "bounds", "t_rates", "t_steps", "s_rates", "s_steps"})
_PARAM_KEYS = frozenset({"path", "shape"})


def _show(value) -> str:
  """A short one-line rendering of a (possibly hostile) header value for error messages."""
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _count(n: int) -> str:
  """``n`` for a message; huge header-derived products (past Python's int-to-str limit) as a power of two."""
  return str(n) if n.bit_length() <= 256 else f"about 2^{n.bit_length() - 1}"


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value, where: str, length: int | None = None, low: int = 0, high: int | None = None) -> list[int]:
  """``value`` as a list of ints in ``[low, high]`` (of ``length`` items if given), else CompressedFileError."""
  if not isinstance(value, list) or not all(_is_int(v) for v in value):
    raise CompressedFileError(f"{where} must be a list of integers, got {_show(value)}")
  if length is not None and len(value) != length:
    raise CompressedFileError(f"{where} must have {length} entries, got {_show(value)}")
  if any(v < low or (high is not None and v > high) for v in value):
    bound = f"in {low}..{high}" if high is not None else f">= {low}"
    raise CompressedFileError(f"{where} must be integers {bound}, got {_show(value)}")
  return value


def _step_list(value, rates: list[int], where: str) -> list[float]:
  """Finite steps, one per rate, positive where the rate is."""
  if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
    raise CompressedFileError(f"{where} must be a list of numbers, got {_show(value)}")
  if len(value) != len(rates):
    raise CompressedFileError(f"{where} has {len(value)} entries for {len(rates)} blocks")
  steps = [float(v) for v in value]
  for b, (rate, step) in enumerate(zip(rates, steps)):
    if not math.isfinite(step * 2.0 ** max(rate - 1, 0)) or (rate > 0 and step <= 0):
      raise CompressedFileError(f"{where}[{b}] = {_show(value[b])} is not a finite positive step for rate {rate}")
  return steps


def _path(value, where: str) -> tuple[str, ...]:
  if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
    raise CompressedFileError(f"{where} must be a non-empty list of strings, got {_show(value)}")
  return tuple(value)


def _keys(entry, expected: frozenset, where: str) -> None:
  if not isinstance(entry, dict):
    raise CompressedFileError(f"{where} must be a JSON object, got {_show(entry)}")
  if set(entry) != expected:
    missing, extra = sorted(expected - set(entry)), sorted(set(entry) - expected)
    raise CompressedFileError(f"{where} has missing keys {_show(missing)} / unexpected keys {_show(extra)}")


def _bounds(value, rows: int, where: str) -> list[tuple[int, int]]:
  """Contiguous increasing ``[lo, hi)`` row ranges starting at 0 and ending at ``rows``."""
  if not isinstance(value, list) or not value:
    raise CompressedFileError(f"{where}: bounds must be a non-empty list of [lo, hi] pairs, got {_show(value)}")
  out, expect = [], 0
  for b, pair in enumerate(value):
    lo, hi = _int_list(pair, f"{where}: bounds[{b}]", length=2)
    if lo != expect or hi <= lo:
      raise CompressedFileError(f"{where}: bounds[{b}] = {_show(pair)} does not continue the blocks at row {expect}")
    out.append((lo, hi))
    expect = hi
  if expect != rows:
    raise CompressedFileError(f"{where}: bounds end at row {expect} but the layer has {rows} rows")
  return out


def _check_geometry(entry, where: str) -> tuple[tuple[int, ...], str, int, int]:
  """Kernel shape, mode and ``(rows, cols)``, consistent with each other."""
  shape = tuple(_int_list(entry["shape"], f"{where}: shape", low=1))
  if len(shape) not in (2, 4):
    raise CompressedFileError(f"{where}: shape {_show(list(shape))} is not a 2-D or 4-D kernel")
  mode = entry["mode"]
  if mode not in ("row", "column"):
    raise CompressedFileError(f"{where}: mode {_show(mode)} is not 'row' or 'column'")
  rows, cols = _int_list(entry["rows"], f"{where}: rows", length=2, low=1)
  expected_rows = shape[-2] if mode == "row" else shape[-1]
  if rows * cols != math.prod(shape) or rows != expected_rows:
    raise CompressedFileError(f"{where}: rows {_show([rows, cols])} do not match kernel shape {_show(list(shape))} "
                              f"in {mode} mode")
  return shape, mode, rows, cols


def _check_layer(entry, where: str) -> tuple[QuantizedLayer, int]:
  """The layer's header fields (S and T left as None) and the payload bytes they imply."""
  _keys(entry, _LAYER_KEYS, where)
  path = _path(entry["path"], f"{where}: path")
  shape, mode, rows, cols = _check_geometry(entry, where)
  bounds = _bounds(entry["bounds"], rows, where)
  t_rates = _int_list(entry["t_rates"], f"{where}: t_rates", length=len(bounds), high=MAX_RATE)
  t_steps = _step_list(entry["t_steps"], t_rates, f"{where}: t_steps")
  s_rates = _int_list(entry["s_rates"], f"{where}: s_rates", high=MAX_RATE)
  if s_rates and len(s_rates) != len(bounds):
    raise CompressedFileError(f"{where}: s_rates has {len(s_rates)} entries for {len(bounds)} blocks "
                              "(it must match them or be empty)")
  s_steps = _step_list(entry["s_steps"], s_rates, f"{where}: s_steps")
  size = 0
  for b, (lo, hi) in enumerate(bounds):
    size += quant.packed_size_bytes((hi - lo) * cols, t_rates[b])
    if s_rates:
      size += quant.packed_size_bytes(rows * (hi - lo), s_rates[b])
  layer = QuantizedLayer(path, shape, mode, bounds, t_rates, t_steps, s_rates, s_steps, None, None)
  return layer, size


def _check_params(entries) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
  """``(path, shape)`` of every other parameter; paths unique and none inside another."""
  if not isinstance(entries, list):
    raise CompressedFileError(f"header 'params' must be a list, got {_show(entries)}")
  out = []
  for i, entry in enumerate(entries):
    _keys(entry, _PARAM_KEYS, f"param {i}")
    out.append((_path(entry["path"], f"param {i}: path"), tuple(_int_list(entry["shape"], f"param {i}: shape"))))
  counts = collections.Counter(path for path, _ in out)
  for i, (path, _) in enumerate(out):
    if counts[path] > 1 or any(path[:k] in counts for k in range(1, len(path))):
      raise CompressedFileError(f"param {i}: path {_show(list(path))} is repeated or nested in another parameter")
  return out


def _check_header(header, payload_size: int):
  """Validated ``(layers without arrays, params)``; the sizes they imply are checked against the payload."""
  _keys(header, frozenset({"layers", "params"}), "header")
  if not isinstance(header["layers"], list):
    raise CompressedFileError(f"header 'layers' must be a list, got {_show(header['layers'])}")
  cap = BASE_ELEMENTS + ELEMENTS_PER_BYTE * payload_size
  layers, size, elements, seen = [], 0, 0, set()
  for i, entry in enumerate(header["layers"]):
    layer, layer_size = _check_layer(entry, f"layer {i}")
    if layer.path in seen:
      raise CompressedFileError(f"layer {i}: path {_show(list(layer.path))} appears twice")
    seen.add(layer.path)
    rows, cols = entry["rows"]
    size, elements = size + layer_size, elements + rows * cols + rows * rows
    if size > payload_size:
      raise CompressedFileError(f"layer {i}: rows {_show([rows, cols])} imply {_count(rows * cols)} weights but the "
                                f"payload holds {payload_size} bytes (compressed model file is shorter than its "
                                "header says)")
    if elements > cap:
      raise CompressedFileError(f"layer {i}: rows {_show([rows, cols])} bring the file to {_count(elements)} weights, "
                                f"more than a {payload_size}-byte payload may describe ({cap})")
    layers.append(layer)
  params = _check_params(header["params"])
  size += sum(4 * math.prod(shape) for _, shape in params)
  if size != payload_size:
    what = ("is shorter than its header says" if size > payload_size
            else "has trailing data its header does not describe")
    raise CompressedFileError(f"compressed model file {what}: header implies {_count(size)} payload bytes, file holds "
                              f"{payload_size}")
  return layers, params


def _parse_header(data: bytes):
  """The JSON header and the payload, after the magic, version, checksum and header-length checks."""
  if len(data) < 17 or data[:4] != MAGIC:
    raise CompressedFileError("not a qflax compressed model file (bad magic number or too short)")
  if data[4] != VERSION:
    raise CompressedFileError(f"compressed model format version {data[4]} is not supported (this is {VERSION})")
  (crc,) = struct.unpack("<I", data[-4:])
  if zlib.crc32(data[:-4]) != crc:
    raise CompressedFileError("compressed model file is truncated or altered (checksum mismatch)")
  (head_len,) = struct.unpack("<Q", data[5:13])
  if head_len > len(data) - 17:
    raise CompressedFileError(f"header length {head_len} points past the end of the {len(data)}-byte file")
  raw = bytes(data[13:13 + head_len])
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CompressedFileError(f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
  depth = _nesting_depth(raw)
  if depth > MAX_HEADER_DEPTH:
    raise CompressedFileError(f"header JSON nests {depth} deep (at most {MAX_HEADER_DEPTH} allowed)")
  try:
    header = json.loads(text)
  except (ValueError, RecursionError) as e:
    raise CompressedFileError(f"header is not valid JSON: {_show(str(e))}") from None
  return header, memoryview(data)[13 + head_len:-4]


def _nesting_depth(raw: bytes) -> int:
  """The deepest ``[``/``{`` nesting of JSON bytes, counted outside strings, in linear time without recursion."""
  b = np.frombuffer(raw, np.uint8)
  if not b.size:
    return 0
  index = np.arange(b.size)
  last_plain = np.maximum.accumulate(np.where(b != ord("\\"), index, -1))
  backslashes_before = np.concatenate(([0], index[:-1] - last_plain[:-1]))
  quotes = (b == ord('"')) & (backslashes_before % 2 == 0)
  outside = np.cumsum(quotes) % 2 == 0
  opens = outside & ((b == ord("[")) | (b == ord("{")))
  closes = outside & ((b == ord("]")) | (b == ord("}")))
  return int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))


def _block(take, count: int, rate: int, step: float, shape, where: str) -> np.ndarray:
  """One block's dequantized values from the next bytes of the payload."""
  codes = quant.unpack_codes(take(quant.packed_size_bytes(count, rate)), rate, count)
  if rate > 4 and codes.size and int(codes.max()) >= 1 << rate:
    raise CompressedFileError(f"{where}: a {rate}-bit code is {int(codes.max())}, out of range")
  return _values(codes, rate, step, shape)


def decode(data: bytes) -> tuple[list[QuantizedLayer], dict]:
  """``(layers, other parameters)`` from :func:`encode`'s bytes, after checking them.

  Every header field is checked (types, ranges, consistency, and the payload size it implies)
  before any array is allocated; any failure raises :class:`CompressedFileError`.
  """
  header, payload = _parse_header(data)
  specs, param_specs = _check_header(header, len(payload))
  offset = 0

  def take(n):
    nonlocal offset
    chunk = payload[offset:offset + n]
    offset += n
    return chunk

  layers = []
  for i, spec in enumerate(specs):
    rows = spec.shape[-2] if spec.mode == "row" else spec.shape[-1]
    cols = math.prod(spec.shape) // rows
    t = np.zeros((rows, cols))
    s = np.zeros((rows, rows)) if spec.s_rates else np.eye(rows)
    for b, ((lo, hi), rt, st) in enumerate(zip(spec.bounds, spec.t_rates, spec.t_steps)):
      t[lo:hi] = _block(take, (hi - lo) * cols, rt, st, (hi - lo, cols), f"layer {i} block {b} (T)")
      if spec.s_rates:
        s[:, lo:hi] = _block(take, rows * (hi - lo), spec.s_rates[b], spec.s_steps[b], (rows, hi - lo),
                             f"layer {i} block {b} (S)")
    layers.append(spec._replace(S=s, T=t))
  params = {}
  for path, shape in param_specs:
    params[path] = np.frombuffer(bytes(take(4 * math.prod(shape))), np.float32).reshape(shape)
  return layers, traverse_util.unflatten_dict(params) if params else {}


def save(path: str, layers: list[QuantizedLayer], other_params) -> int:
  """Writes the file (atomically) and returns its size in bytes."""
  return write_atomically(path, encode(layers, other_params))


def load(path: str) -> tuple[list[QuantizedLayer], dict]:
  """:func:`decode` of the file at ``path``; errors are :class:`CompressedFileError` prefixed with the path."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise CompressedFileError(f"cannot read compressed model file {path}: {e}") from e
  try:
    return decode(data)
  except CompressedFileError as e:
    raise CompressedFileError(f"{path}: {e}") from None
