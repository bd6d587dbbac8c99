"""Reader for MNIST-format IDX files (``train-images-idx3-ubyte.gz`` and friends)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file, gzip-compressed (``.gz``) or raw.

  Format: two zero bytes, a type byte, a dimension count ``n``, ``n`` big-endian
  uint32 sizes, then the data.

  Raises:
    ValueError: naming the file when the header or the size is wrong.
  """
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"cannot read IDX file {path}: {e}") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4"))
  dtype = np.dtype(_DTYPES[raw[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(f"{path}: header says {shape} ({expected} bytes of data), file has {len(raw) - header}")
  return np.frombuffer(raw[header:], dtype).reshape(shape)


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
  """``(images (N, H, W, 1) uint8, labels (N,) int32)`` for ``split`` in train/test."""
  if split not in SPLIT_FILES:
    raise ValueError(f"split={split!r} is unknown; allowed: {tuple(SPLIT_FILES)}")
  paths = []
  for stem in SPLIT_FILES[split]:
    path = find_idx_file(directory, stem)
    if path is None:
      raise FileNotFoundError(f"{Path(directory) / stem}[.gz] not found")
    paths.append(path)
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"IDX files in {directory} disagree: images {images.shape}, labels {labels.shape}")
  return images[..., None].astype(np.uint8), labels.astype(np.int32)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes ``array`` (uint8) as an IDX file, gzip-compressed if ``path`` ends in ``.gz``."""
  array = np.ascontiguousarray(array, np.uint8)
  data = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)
