"""Damaged, truncated or wrong-kind IDX files fail with one-line IdxFormatError messages naming the file."""

from __future__ import annotations

import gzip
import time
import tracemalloc

import numpy as np
import pytest

from qflax.data import idx
from qflax.data.idx import IdxFormatError


def _idx_bytes(code: int, shape, data: bytes = b"") -> bytes:
  return bytes([0, 0, code, len(shape)]) + np.asarray(shape, ">u4").tobytes() + data


def _fails(path, match: str):
  with pytest.raises(IdxFormatError, match=match) as info:
    idx.read_idx(path)
  message = str(info.value)
  assert str(path) in message and "\n" not in message
  return message


def test_idx_format_error_is_a_value_error():
  assert issubclass(IdxFormatError, ValueError)


@pytest.mark.parametrize("gz", [False, True])
def test_valid_files_round_trip(tmp_path, gz):
  array = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
  path = tmp_path / ("a.gz" if gz else "a")
  idx.write_idx(path, array)
  got = idx.read_idx(path)
  assert got.dtype == np.uint8 and got.shape == array.shape
  np.testing.assert_array_equal(got, array)
  empty = tmp_path / ("e.gz" if gz else "e")
  idx.write_idx(empty, np.zeros((0, 4), np.uint8))
  assert idx.read_idx(empty).shape == (0, 4)


@pytest.mark.parametrize("gz", [False, True])
def test_bad_headers(tmp_path, gz):
  def write(name, content):
    path = tmp_path / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(content) if gz else content)
    return path

  _fails(write("magic", b"\x01\x02\x03\x04garbage"), r"not an IDX file \(bad magic number 01020304")
  _fails(write("empty", b""), "not an IDX file .*empty file")
  _fails(write("tiny", b"\x00\x00"), "not an IDX file")
  _fails(write("dtype", _idx_bytes(0x07, (2,), b"\0\0")), "unknown data type code 0x07")
  _fails(write("dims", bytes([0, 0, 8, 3]) + b"\0\0\0\2"), "file ends inside its header .*3 dimensions need 12")
  _fails(write("short", _idx_bytes(8, (4, 3), bytes(10))), r"header says \(4, 3\) \(12 bytes of data\), file has 10")
  _fails(write("long", _idx_bytes(8, (4, 3), bytes(13))), r"header says \(4, 3\) \(12 bytes of data\), file has 1")
  _fails(write("wide", _idx_bytes(0x0C, (4,), bytes(15))), r"header says \(4,\) \(16 bytes of data\)")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape,match", [((2 ** 32 - 1,) * 3, "more than the .*-byte limit"),
                                         ((10 ** 6, 100), r"\(800000000 bytes of data\), file has 1000$")])
def test_header_claiming_huge_data_fails_fast_without_allocating(tmp_path, gz, shape, match):
  content = _idx_bytes(0x0E, shape, bytes(1000))
  path = tmp_path / ("huge.gz" if gz else "huge")
  path.write_bytes(gzip.compress(content) if gz else content)
  tracemalloc.start()
  start = time.perf_counter()
  try:
    _fails(path, "header says .*" + match)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert elapsed < 1.0 and peak < 20 * 2 ** 20


def test_max_bytes_limit(tmp_path):
  idx.write_idx(tmp_path / "a.gz", np.zeros((10, 10), np.uint8))
  with pytest.raises(IdxFormatError, match=r"\(100 bytes of data\), more than the 99-byte limit"):
    idx.read_idx(tmp_path / "a.gz", max_bytes=99)
  assert idx.read_idx(tmp_path / "a.gz", max_bytes=100).shape == (10, 10)


def test_damaged_gzip_files(tmp_path):
  array = np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8)
  good = tmp_path / "good.gz"
  idx.write_idx(good, array)
  data = good.read_bytes()
  bare = gzip.compress(gzip.decompress(data), mtime=0)    # no file name: the deflate stream starts at byte 10
  plain = tmp_path / "plain.gz"                   # an uncompressed IDX file named .gz
  idx.write_idx(tmp_path / "plain", array)
  plain.write_bytes((tmp_path / "plain").read_bytes())
  _fails(plain, "is not a valid gzip file")
  for name, damaged, match in (("cut-middle.gz", data[:len(data) // 2], "gzip data is truncated"),
                               ("cut-trailer.gz", data[:-3], "gzip data is truncated"),
                               ("cut-header.gz", data[:5], "truncated|not a valid gzip"),
                               ("crc.gz", data[:-8] + bytes([data[-8] ^ 1]) + data[-7:], "not a valid gzip.*CRC"),
                               ("flipped.gz", data[:999] + b"\xff" * 200 + data[1199:], "not a valid gzip|corrupt"),
                               ("deflate.gz", bare[:10] + b"\x07" + bare[11:], "gzip data is corrupt"),
                               ("zeros.gz", data[:20] + bytes(200) + data[220:], "IDX|gzip")):
    (tmp_path / name).write_bytes(damaged)
    _fails(tmp_path / name, match)


def test_unreadable_file(tmp_path):
  _fails(tmp_path / "missing", "cannot read IDX file")
  (tmp_path / "dir.gz").mkdir()
  _fails(tmp_path / "dir.gz", "cannot read IDX file")


def _split_dir(tmp_path, images, labels, images_code=0x08, labels_code=0x08):
  for stem, array, code in (("train-images-idx3-ubyte", images, images_code),
                            ("train-labels-idx1-ubyte", labels, labels_code)):
    (tmp_path / stem).write_bytes(_idx_bytes(code, array.shape, array.astype(idx._DTYPES[code]).tobytes()))
  return tmp_path


def _split_fails(directory, match: str):
  with pytest.raises(IdxFormatError, match=match) as info:
    idx.load_idx_split(directory, "train")
  assert "\n" not in str(info.value)


def test_split_files_that_disagree_or_are_the_wrong_kind(tmp_path):
  images, labels = np.zeros((12, 28, 28), np.uint8), np.arange(12) % 10
  _split_fails(_split_dir(tmp_path, images, labels[:11]), "holds 12 images but .*train-labels.* holds 11 labels")
  _split_fails(_split_dir(tmp_path, labels, labels), r"train-images-idx3-ubyte: expected images .*\(a labels file\?\)")
  _split_fails(_split_dir(tmp_path, images, images), r"train-labels-idx1-ubyte: expected labels .*\(an images file")
  _split_fails(_split_dir(tmp_path, images[..., None], labels), "expected images .*shape \\(12, 28, 28, 1\\)")
  _split_fails(_split_dir(tmp_path, images, labels, images_code=0x0D), "expected unsigned-byte images")
  _split_fails(_split_dir(tmp_path, images, labels, labels_code=0x0D), "expected non-negative integer labels")
  _split_fails(_split_dir(tmp_path, images, -labels, labels_code=0x09), "expected non-negative integer labels")
  out_images, out_labels = idx.load_idx_split(_split_dir(tmp_path, images, labels, labels_code=0x0C), "train")
  assert out_images.shape == (12, 28, 28, 1) and out_labels.dtype == np.int32
  np.testing.assert_array_equal(out_labels, labels)


@pytest.mark.parametrize("gz", [False, True])
def test_random_damage_gives_an_array_or_idx_format_error(tmp_path, gz):
  rng = np.random.default_rng(2)
  path = tmp_path / ("x.gz" if gz else "x")
  idx.write_idx(path, rng.integers(0, 256, (6, 4, 4), dtype=np.uint8))
  data = path.read_bytes()
  for trial in range(150):
    damaged = bytearray(data)
    if trial % 3 == 0:
      damaged = damaged[:rng.integers(len(damaged))]
    for _ in range(rng.integers(0 if trial % 3 == 0 else 1, 4)):
      if damaged:
        damaged[rng.integers(len(damaged))] = rng.integers(256)
    path.write_bytes(bytes(damaged))
    try:
      array = idx.read_idx(path)
    except IdxFormatError as e:
      assert str(path) in str(e) and "\n" not in str(e)
    else:
      assert isinstance(array, np.ndarray)
