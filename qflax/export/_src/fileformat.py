"""The integer-model file: a fixed header, a JSON manifest, the payload, a SHA-256.

Layout (little-endian)::

  magic      8 bytes   b"QFLAXINT"
  version    uint32    1
  manifest   uint64    length M of the manifest
  payload    uint64    length P of the payload
  manifest   M bytes   UTF-8 JSON (see ``manifest.py``); variants, layers and tensors in order
  payload    P bytes   the tensors, contiguous: float32 arrays and packed codes
  sha256     32 bytes  of everything before it
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

from qflax._files import write_atomically
from qflax.export._src import manifest as manifest_lib
from qflax.export._src import structure
from qflax.export._src.types import ExportFileError, FieldError, IntegerModel

MAGIC = b"QFLAXINT"
VERSION = 1
_HEADER = struct.Struct("<8sIQQ")
_DIGEST = hashlib.sha256().digest_size


def to_bytes(im: IntegerModel) -> bytes:
  """The file contents for ``im`` (deterministic: equal models give equal bytes)."""
  manifest, payload = manifest_lib.encode(im)
  text = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode("utf-8")
  body = _HEADER.pack(MAGIC, VERSION, len(text), len(payload)) + text + payload
  return body + hashlib.sha256(body).digest()


def save(path, im: IntegerModel) -> int:
  """Writes ``im`` to ``path`` atomically (a temporary file in the same folder, then ``os.replace``);
  returns the bytes written.

  Example:
    >>> n = save("resnet20_w4a4.qfx", im)
  """
  return write_atomically(path, to_bytes(im), sync=True)


def _no_constants(name):
  raise ValueError(f"{name} is not a finite number")


def _no_duplicates(pairs):
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    raise ValueError(f"duplicate key {sorted(k for k in keys if keys.count(k) > 1)[0]!r}")
  return dict(pairs)


def _container(data) -> tuple[memoryview, memoryview]:
  """``(manifest bytes, payload)`` after the header, size and checksum checks."""
  if len(data) < _HEADER.size + _DIGEST:
    raise FieldError("header", f"the file has {len(data)} bytes, fewer than the {_HEADER.size + _DIGEST} of an "
                     "empty container (truncated)")
  magic, version, m_len, p_len = _HEADER.unpack_from(data)
  if magic != MAGIC:
    raise FieldError("magic", f"{magic!r} is not {MAGIC!r}: not a qflax integer model")
  if version != VERSION:
    raise FieldError("version", f"{version} is not supported (this reader knows version {VERSION})")
  if _HEADER.size + m_len + p_len + _DIGEST != len(data):
    raise FieldError("header.lengths", f"manifest {m_len} + payload {p_len} bytes do not fit the file size "
                     f"{len(data)} (truncated or extended)")
  view = memoryview(data)
  if hashlib.sha256(view[:-_DIGEST]).digest() != bytes(view[-_DIGEST:]):
    raise FieldError("sha256", "checksum mismatch: the file was altered or truncated")
  start = _HEADER.size
  return view[start:start + m_len], view[start + m_len:start + m_len + p_len]


def _parse_json(text) -> dict:
  try:
    return json.loads(bytes(text).decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
  except (ValueError, RecursionError) as e:
    raise FieldError("manifest", f"is not valid JSON: {type(e).__name__}: {e}") from None


def _decode(data) -> IntegerModel:
  text, payload = _container(data)
  meta = manifest_lib.decode(_parse_json(text), len(payload))
  table = meta.tensors

  def info(tensor, field):
    if tensor not in table:
      raise FieldError(field, f"names the unknown tensor {tensor!r}")
    return table[tensor][:2]

  structure.check(meta, info)   # shapes and dtypes against the model, before any array is read
  variants = {}
  for name, v in meta.variants.items():   # layers in call order
    variants[name] = v._replace(layers={p: v.layers[p] for p in structure.expected_layers(meta, v)})
  tensors = {t: manifest_lib.read_tensor(payload, *table[t]) for t in sorted(table, key=lambda t: table[t][2])}
  im = meta._replace(variants=variants, tensors=tensors)
  structure.check_values(im)
  return im


def from_bytes(data, source: str = "<bytes>") -> IntegerModel:
  """Parses and validates a file's contents; raises :class:`ExportFileError` naming the field.

  Nothing is allocated from a header value before it is checked against the file size, and
  no array is read before the manifest has been checked against the model it names.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"from_bytes takes the file's bytes, not {type(data).__name__}")
  try:
    return _decode(data)
  except FieldError as e:
    raise ExportFileError(f"{source}: {e}") from None


def load(path) -> IntegerModel:
  """Reads an integer model written by :func:`save`.

  Raises:
    ExportFileError: for a truncated, altered or forged file, with a one-line message naming
      the field (``header``, ``sha256``, ``tensors.t3.length``, ``variants.w4a4.layers...``).
    OSError: the file cannot be read (``FileNotFoundError``, ``IsADirectoryError``, ...).

  Example:
    >>> im = load("resnet20_w4a4.qfx")
    >>> model, variables, plan = rebuild(im, "w4a4")
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  return from_bytes(data, path)
