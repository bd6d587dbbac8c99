"""Data sources: IDX files, Fashion-MNIST resolution, TFDS (mocked), synthetic."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from qflax import data
from qflax.data import sources

REAL_FASHION_MNIST = sources.SYSTEM_FASHION_MNIST_DIR


def _write_tiny_idx(directory, n_train=12, n_test=5, gz=True):
  rng = np.random.default_rng(0)
  suffix = ".gz" if gz else ""
  arrays = {}
  for split, n, stems in (("train", n_train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                          ("test", n_test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    data.write_idx(os.path.join(directory, stems[0] + suffix), images)
    data.write_idx(os.path.join(directory, stems[1] + suffix), labels)
    arrays[split] = (images, labels)
  return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_reads_generated_files(tmp_path, gz):
  arrays = _write_tiny_idx(tmp_path, gz=gz)
  images, labels = data.load_idx_split(tmp_path, "train")
  assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(images[..., 0], arrays["train"][0])
  np.testing.assert_array_equal(labels, arrays["train"][1])
  ds = data.load_dataset(f"idx:{tmp_path}")
  assert ds.test.images.shape == (5, 28, 28, 1)


def test_idx_reader_rejects_bad_files(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04garbage")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(tmp_path / "bad")
  data.write_idx(tmp_path / "short", np.zeros((4, 3), np.uint8))
  (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
  with pytest.raises(ValueError, match="header says"):
    data.read_idx(tmp_path / "short")
  with pytest.raises(data.DataUnavailableError, match="no IDX"):
    data.load_dataset(f"idx:{tmp_path}")


@pytest.mark.skipif(not os.path.isdir(REAL_FASHION_MNIST), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_files():
  images, labels = data.load_idx_split(REAL_FASHION_MNIST, "train")
  assert images.shape == (60000, 28, 28, 1)
  assert np.bincount(labels).tolist() == [6000] * 10
  images, labels = data.load_idx_split(REAL_FASHION_MNIST, "test")
  assert images.shape == (10000, 28, 28, 1) and np.bincount(labels).tolist() == [1000] * 10
  assert 0.27 < images.mean() / 255 < 0.30   # the published mean 0.286


def test_fashion_mnist_resolution_order(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
  env_dir, cfg_dir = tmp_path / "env", tmp_path / "cfg"
  env_dir.mkdir()
  cfg_dir.mkdir()
  _write_tiny_idx(env_dir, n_train=7)
  _write_tiny_idx(cfg_dir, n_train=9)
  monkeypatch.setenv(sources.FASHION_MNIST_ENV, str(env_dir))
  empty_tfds = str(tmp_path / "tfds")
  assert data.load_dataset("fashion_mnist", data_dir=empty_tfds, idx_dir=str(cfg_dir), download=False
                           ).train.labels.size == 9
  ds = data.load_dataset("fashion_mnist", data_dir=empty_tfds, download=False)
  assert ds.train.labels.size == 7 and ds.source == f"idx:{env_dir}"
  monkeypatch.delenv(sources.FASHION_MNIST_ENV)
  with pytest.raises(data.DataUnavailableError) as err:
    data.load_dataset("fashion_mnist", data_dir=empty_tfds, download=False)
  message = str(err.value)
  assert "1. prepared TFDS data" in message and "2. local IDX files" in message and "3. a TFDS download" in message
  with tfds.testing.mock_data(num_examples=6):   # prepared TFDS data comes first
    ds = data.load_dataset("fashion_mnist", data_dir=empty_tfds, idx_dir=str(cfg_dir), download=False)
  assert ds.source == "tfds:fashion_mnist" and ds.train.images.shape == (6, 28, 28, 1)


def test_looking_for_prepared_tfds_data_leaves_nothing_in_the_temp_directory(tmp_path, monkeypatch):
  """Reported: every run left two empty ``tmp*tfds`` directories in /tmp (TFDS looks for the dataset's
  metadata online and, offline, does not remove the directory it made for it)."""
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  idx_dir = tmp_path / "idx"
  idx_dir.mkdir()
  _write_tiny_idx(idx_dir)
  ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "tfds"), idx_dir=str(idx_dir), download=False)
  assert ds.source == f"idx:{idx_dir}"
  assert os.listdir(temp) == [] and tempfile.gettempdir() == str(temp)

def test_tfds_source_under_mock_data():
  with tfds.testing.mock_data(num_examples=10):
    ds = data.load_dataset("tfds:cifar10", train_limit=8)
    ds100 = data.load_dataset("cifar100", num_shards=2, shard_index=1)
  assert ds.train.images.shape == (8, 32, 32, 3) and ds.train.images.dtype == np.uint8
  assert ds.test.images.shape == (10, 32, 32, 3)
  assert ds.info.num_classes == 10 and ds.info.augmentation == data.Augmentation(4, True)
  assert ds100.info.num_classes == 100 and ds100.train.labels.size == 5


def test_synthetic_is_deterministic_and_learnable():
  opts = {"num_train": 400, "num_test": 100, "image_size": 16, "channels": 3, "num_classes": 4}
  a, b = data.load_dataset("synthetic", synthetic=opts), data.load_dataset("synthetic", synthetic=opts)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  assert not np.array_equal(a.train.images[:100], a.test.images)
  # Nearest class mean classifies well above chance: there is class structure.
  x, y = a.train.images.reshape(400, -1).astype(float), a.train.labels
  means = np.stack([x[y == c].mean(0) for c in range(4)])
  xt = a.test.images.reshape(100, -1).astype(float)
  pred = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(pred == a.test.labels) > 0.5   # chance is 0.25
  clips = data.load_dataset("synthetic", synthetic={**opts, "num_frames": 3})
  assert clips.train.images.shape == (400, 3, 16, 16, 3)
  assert not np.array_equal(clips.train.images[:, 0], clips.train.images[:, 1])


def test_unknown_dataset_and_bad_options():
  with pytest.raises(ValueError, match="allowed"):
    data.load_dataset("cifar1000")
  with pytest.raises(ValueError, match="synthetic"):
    data.load_dataset("synthetic", synthetic={"colour": True})
  with pytest.raises(ValueError, match="StreamingPipeline"):
    data.load_dataset("tfds:imagenet2012")
