"""What the data layer says when a dataset is missing, and which names it accepts."""

from __future__ import annotations

import logging
import socket
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from qflax import data
from qflax.data import sources


@pytest.fixture
def offline(monkeypatch):
  """No proxy and no route anywhere; records every host a connection was tried to."""
  tried = []

  def refuse(address, *args, **kwargs):
    tried.append(address)
    raise OSError(101, "Network is unreachable")

  monkeypatch.setattr(sources.urllib.request, "getproxies", lambda: {})
  monkeypatch.setattr(socket, "create_connection", refuse)
  return tried


@pytest.fixture
def data_source_calls(monkeypatch):
  """``tfds.data_source`` that finds nothing prepared; records the ``download`` flag of each call."""
  calls = []

  def not_prepared(name, split, data_dir=None, download=True, **kwargs):
    calls.append(download)
    raise KeyError("Trying to access `splits['train']` but `splits` is empty.")

  monkeypatch.setattr(tfds, "data_source", not_prepared)
  return calls


def _write_tiny_idx(directory):
  rng = np.random.default_rng(0)
  for stem, n in (("train", 6), ("t10k", 3)):
    data.write_idx(directory / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    data.write_idx(directory / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, n).astype(np.uint8))


def test_fashion_mnist_lookup_is_silent(tmp_path, monkeypatch, caplog, capfd):
  monkeypatch.delenv(sources.FASHION_MNIST_ENV, raising=False)
  idx_dir = None
  if not sources.idx_lib.has_idx_dataset(sources.SYSTEM_FASHION_MNIST_DIR):   # the Debian files, else tiny ones
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    _write_tiny_idx(idx_dir)
  caplog.set_level(logging.DEBUG)
  ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "tfds"), idx_dir=idx_dir and str(idx_dir),
                         download=False)
  assert ds.source.startswith("idx:")
  out, err = capfd.readouterr()
  assert "dataset_info.json" not in caplog.text + out + err
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


def test_not_prepared_names_the_dataset_the_directory_and_the_fix(tmp_path):
  with pytest.raises(data.DataUnavailableError) as error:
    data.load_dataset("tfds:cifar10", data_dir=str(tmp_path), download=False)
  message = _one_line(error)
  assert "'cifar10' is not prepared" in message and str(tmp_path) in message
  assert "tfds build cifar10" in message and "dataset.data_dir" in message


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_missing_module_is_named_with_its_pip_command(tmp_path, monkeypatch, wrapped):
  def broken(*args, **kwargs):
    missing = ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources")
    if not wrapped:
      raise missing
    raise RuntimeError("builder failed") from missing

  monkeypatch.setattr(tfds, "data_source", broken)
  for load in (lambda: data.load_dataset("cifar100", data_dir=str(tmp_path)),
               lambda: data.open_stream("imagenette", data_dir=str(tmp_path))):
    with pytest.raises(data.DataUnavailableError) as error:
      load()
    message = _one_line(error)
    assert "module 'importlib_resources' is missing" in message and "pip install importlib_resources" in message
    assert "not prepared" not in message


def test_missing_pillow_maps_to_its_pip_name():
  error = sources._missing_module_error("mnist", "PIL", ModuleNotFoundError("No module named 'PIL'", name="PIL"))
  assert "pip install Pillow" in str(error)


def test_download_offline_fails_fast_and_says_no_network(tmp_path, offline, data_source_calls):
  start = time.monotonic()
  with pytest.raises(data.DataUnavailableError) as error:
    data.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
  assert time.monotonic() - start < 5
  message = _one_line(error)
  assert "no network" in message and "storage.googleapis.com" in message and "tfds build cifar100" in message
  assert True not in data_source_calls   # TFDS was never asked to download
  assert offline == [sources.DOWNLOAD_HOST]


def test_fashion_mnist_lists_no_network_among_what_it_tried(tmp_path, monkeypatch, offline, data_source_calls):
  monkeypatch.delenv(sources.FASHION_MNIST_ENV, raising=False)
  monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
  with pytest.raises(data.DataUnavailableError) as error:
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path), download=True)
  message = str(error.value)
  assert "1. prepared TFDS data" in message and "3. a TFDS download" in message
  assert "TFDS download: no network" in message and True not in data_source_calls


def test_network_check_times_out_and_uses_the_proxy(monkeypatch):
  hosts = []

  def hang(address, *args, **kwargs):
    hosts.append(address)
    time.sleep(2)
    raise OSError("timed out")

  monkeypatch.setattr(socket, "create_connection", hang)
  monkeypatch.setattr(sources.urllib.request, "getproxies", lambda: {"https": "http://proxy.example:3128"})
  start = time.monotonic()
  problem = sources.network_problem(timeout=0.2)
  assert time.monotonic() - start < 1.5 and "no answer within 0.2 s" in problem
  assert hosts == [("proxy.example", 3128)]
  monkeypatch.setattr(socket, "create_connection", lambda *a, **k: socket.socket())
  assert sources.network_problem(timeout=0.2) is None


def test_an_unknown_tfds_name_says_so_in_one_line():
  with pytest.raises(data.DataUnavailableError) as error:
    data.load_dataset("tfds:no_such_dataset_xyz", download=False)
  assert "TFDS knows no dataset 'no_such_dataset_xyz'" in _one_line(error)


ACCEPTED = ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped", "imagenet2012", "imagenette",
            "ucf101", "synthetic", "tfds:cifar10", "tfds:imagenette", "tfds:anything", "idx:/some/dir"]
REJECTED = ["cifar1000", "imagenet", "", "tfds:", "idx:", "Synthetic", None]


def test_is_known_dataset_accepts_exactly_the_names_the_loaders_take():
  assert all(sources.is_known_dataset(n) for n in ACCEPTED)
  assert not any(sources.is_known_dataset(n) for n in REJECTED)
  names = data.dataset_names()
  assert set(data.KNOWN) | set(sources.STREAMED) | {"synthetic"} <= set(names)
  assert all(sources.is_known_dataset(n) for n in names if "<" not in n)
  for name in REJECTED[:2]:
    with pytest.raises(ValueError, match="allowed"):
      data.load_dataset(name)
    with pytest.raises(ValueError, match="allowed"):
      data.open_stream(name)


def test_imagenette_is_streamed_under_its_bare_name():
  assert data.is_streamed("imagenette") and data.is_streamed("tfds:imagenette")
  with pytest.raises(ValueError, match="StreamingPipeline"):   # known, but not for in-memory loading
    data.load_dataset("imagenette")
  with tfds.testing.mock_data(num_examples=3):
    stream = data.open_stream("imagenette")
  assert stream.source == "tfds:imagenette" and len(stream.train) == 3 and stream.info.num_classes == 10


def _idx_dataset(directory, train_labels, test_labels):
  for stem, labels in (("train", train_labels), ("t10k", test_labels)):
    labels = np.asarray(labels, np.uint8)
    data.write_idx(directory / f"{stem}-images-idx3-ubyte", np.zeros((labels.size, 28, 28), np.uint8))
    data.write_idx(directory / f"{stem}-labels-idx1-ubyte", labels)
  return f"idx:{directory}"


@pytest.mark.parametrize("train_labels,test_labels,match", [
    ([0] * 6, [0] * 3, "name 1 class; a classifier needs at least 2"),
    ([3] * 6, [3] * 3, "name 1 class; a classifier needs at least 2"),
    ([0, 1, 2] * 2, [1, 11, 12], r"2 test labels \(e.g. 11\) are outside its 3 classes 0..2"),
])
def test_labels_that_no_classifier_can_learn_are_refused(tmp_path, train_labels, test_labels, match):
  """Reported: one class trained a 1-class model that reported 100 %, and test labels outside the
  training classes gave 0 %, both with exit code 0."""
  with pytest.raises(data.DataUnavailableError, match=match):
    data.load_dataset(_idx_dataset(tmp_path, train_labels, test_labels))
