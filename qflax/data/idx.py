"""Reader for MNIST-format IDX files (``train-images-idx3-ubyte.gz`` and friends)."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class IdxFormatError(ValueError):
  """An IDX file is unreadable, truncated, corrupt or not the kind expected; the one-line message names it."""


_CHUNK = 1 << 22     # gzip data is read in 4 MiB pieces, never in one piece sized by the header
MAX_IDX_BYTES = 1 << 33   # data a header may announce (8 GiB): bounds what a gzip bomb can make us hold


def _header(f, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
  """``(shape, dtype, header bytes)`` from the start of an open IDX file."""
  magic = f.read(4)
  if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
    raise IdxFormatError(f"{path} is not an IDX file (bad magic number {magic.hex() or 'none: empty file'})")
  if magic[2] not in _DTYPES:
    known = ", ".join(f"0x{code:02x}" for code in _DTYPES)
    raise IdxFormatError(f"{path} is not an IDX file (unknown data type code 0x{magic[2]:02x}; known: {known})")
  ndim = magic[3]
  sizes = f.read(4 * ndim)
  if len(sizes) < 4 * ndim:
    raise IdxFormatError(f"{path}: file ends inside its header ({ndim} dimensions need {4 * ndim} bytes of sizes, "
                         f"found {len(sizes)})")
  shape = tuple(int(d) for d in np.frombuffer(sizes, ">u4"))
  return shape, np.dtype(_DTYPES[magic[2]]), 4 + 4 * ndim


def _read_capped(f, limit: int) -> bytes:
  """Up to ``limit`` bytes from ``f``, read piecewise (memory follows what the file holds, not ``limit``)."""
  chunks, total = [], 0
  while total < limit:
    chunk = f.read(min(_CHUNK, limit - total))
    if not chunk:
      break
    chunks.append(chunk)
    total += len(chunk)
  return b"".join(chunks)


def _read_data(f, path: Path, compressed: bool, max_bytes: int) -> tuple[bytes, tuple[int, ...], np.dtype]:
  """The header's shape and dtype and exactly the data bytes it announces, checked before they are read."""
  shape, dtype, header = _header(f, path)
  expected = math.prod(shape) * dtype.itemsize
  if expected > max_bytes:
    raise IdxFormatError(f"{path}: header says {shape} ({expected} bytes of data), more than the {max_bytes}-byte "
                         "limit (max_bytes)")
  if compressed:                       # the decompressed size is unknown: read at most one byte too many
    raw = _read_capped(f, expected + 1)
    have = f"{expected}+" if len(raw) > expected else str(len(raw))
  else:                                # the file size is known: compare before reading anything
    size = os.fstat(f.fileno()).st_size - header
    raw = f.read(expected) if size == expected else b""
    have = str(size if size != expected else len(raw))
  if len(raw) != expected:
    raise IdxFormatError(f"{path}: header says {shape} ({expected} bytes of data), file has {have}")
  return raw, shape, dtype


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
  """Reads one IDX file, gzip-compressed (``.gz``) or raw.

  Format: two zero bytes, a type byte, a dimension count ``n``, ``n`` big-endian
  uint32 sizes, then the data. The sizes are checked against the file (or, for
  gzip, against the data as it is decompressed) before any memory is sized by them;
  headers announcing more than ``max_bytes`` of data are refused outright.

  Raises:
    IdxFormatError (a ValueError): naming the file and the cause, when it cannot be read,
      is not (valid) gzip, is truncated, or its header or size is wrong.
  """
  path = Path(path)
  compressed = path.suffix == ".gz"
  opener = gzip.open if compressed else open
  try:
    with opener(path, "rb") as f:
      raw, shape, dtype = _read_data(f, path, compressed, max_bytes)
  except gzip.BadGzipFile as e:
    raise IdxFormatError(f"{path} is not a valid gzip file ({e})") from None
  except EOFError as e:
    raise IdxFormatError(f"{path}: gzip data is truncated ({e})") from None
  except zlib.error as e:
    raise IdxFormatError(f"{path}: gzip data is corrupt ({e})") from None
  except OSError as e:
    raise IdxFormatError(f"cannot read IDX file {path}: {e}") from e
  return np.frombuffer(raw, dtype).reshape(shape)


def find_idx_file(directory: str | os.PathLike, stem: str) -> Path | None:
  """``stem.gz`` or ``stem`` in ``directory``, whichever exists."""
  for name in (f"{stem}.gz", stem):
    candidate = Path(directory) / name
    if candidate.is_file():
      return candidate
  return None


def has_idx_dataset(directory: str | os.PathLike) -> bool:
  return all(find_idx_file(directory, stem) for files in SPLIT_FILES.values() for stem in files)


def load_idx_split(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """``(images (N, H, W, 1) uint8, labels (N,) int32)`` for ``split`` in train/test.

  Raises:
    ValueError: unknown split. FileNotFoundError: a file is missing. IdxFormatError: a file is damaged or
      of the wrong kind (labels where images belong, ...), or the two files hold different counts.
  """
  if split not in SPLIT_FILES:
    raise ValueError(f"split={split!r} is unknown; allowed: {tuple(SPLIT_FILES)}")
  paths = []
  for stem in SPLIT_FILES[split]:
    path = find_idx_file(directory, stem)
    if path is None:
      raise FileNotFoundError(f"{Path(directory) / stem}[.gz] not found")
    paths.append(path)
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  _check_split(images, labels, *paths)
  return images[..., None].astype(np.uint8), labels.astype(np.int32)


def _check_split(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path) -> None:
  """Images must be ``(N, H, W)`` unsigned bytes and labels ``(N,)`` non-negative integers."""
  if images.ndim != 3:
    hint = " (a labels file?)" if images.ndim == 1 else ""
    raise IdxFormatError(f"{images_path}: expected images (3 dimensions: count, rows, columns), found shape "
                         f"{images.shape}{hint}")
  if images.dtype != np.uint8:
    raise IdxFormatError(f"{images_path}: expected unsigned-byte images (type 0x08), found {images.dtype}")
  if labels.ndim != 1:
    hint = " (an images file?)" if labels.ndim == 3 else ""
    raise IdxFormatError(f"{labels_path}: expected labels (1 dimension: count), found shape {labels.shape}{hint}")
  if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
    raise IdxFormatError(f"{labels_path}: expected non-negative integer labels, found {labels.dtype} labels")
  if len(images) != len(labels):
    raise IdxFormatError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes ``array`` (uint8) as an IDX file, gzip-compressed if ``path`` ends in ``.gz``."""
  array = np.ascontiguousarray(array, np.uint8)
  data = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)
