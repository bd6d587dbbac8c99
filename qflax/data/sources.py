"""Dataset sources: ``tfds:<name>``, ``idx:<dir>``, ``synthetic``, and known names.

``fashion_mnist`` resolves as ``data.md`` says: prepared TFDS data in
``data_dir``; local IDX files (the configured directory, then
``$QFLAX_FASHION_MNIST_DIR``, then ``/usr/share/datasets/fashion-mnist``); a
TFDS download. When none works the error lists these three ways, before any
compute.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import numpy as np

from qflax.data import idx as idx_lib
from qflax.data.synthetic import synthetic_images

SYSTEM_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "QFLAX_FASHION_MNIST_DIR"


class Augmentation(NamedTuple):
  """On-device training augmentation: zero-pad by ``pad``, random crop back, optional flip."""
  pad: int = 0
  flip: bool = False


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Per-dataset constants: classes, normalisation, training augmentation."""
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augmentation: Augmentation


KNOWN = {
    "mnist": DatasetInfo(10, (0.1307,), (0.3081,), Augmentation(2, False)),
    "fashion_mnist": DatasetInfo(10, (0.2860,), (0.3530,), Augmentation(2, False)),
    "cifar10": DatasetInfo(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), Augmentation(4, True)),
    "cifar100": DatasetInfo(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), Augmentation(4, True)),
    "svhn_cropped": DatasetInfo(10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), Augmentation(4, True)),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Large datasets read through StreamingPipeline: (info, record key of the image or clip).
STREAMED = {
    "imagenet2012": (DatasetInfo(1000, IMAGENET_MEAN, IMAGENET_STD, Augmentation()), "image"),
    "imagenette": (DatasetInfo(10, IMAGENET_MEAN, IMAGENET_STD, Augmentation()), "image"),
    "ucf101": (DatasetInfo(101, IMAGENET_MEAN, IMAGENET_STD, Augmentation()), "video"),
}


class Split(NamedTuple):
  images: np.ndarray   # (N, H, W, C) or (N, T, H, W, C), uint8
  labels: np.ndarray   # (N,), int32


class Dataset(NamedTuple):
  """An in-memory dataset (small datasets: CIFAR, MNIST-like, SVHN, synthetic)."""
  name: str
  source: str          # where it was read from, for the run log
  train: Split
  test: Split
  info: DatasetInfo


class DataUnavailableError(FileNotFoundError):
  """No source could provide the dataset; the message says how to provide it."""


def dataset_names() -> tuple[str, ...]:
  return tuple(KNOWN) + ("synthetic", "tfds:<name>", "idx:<dir>")


def _tfds_splits(name: str, data_dir: str | None, download: bool):
  import tensorflow_datasets as tfds  # only TFDS paths need it
  sources = {split: tfds.data_source(name, split=split, data_dir=data_dir, download=download)
             for split in ("train", "test")}

  def read(source):
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records]) if records else np.zeros((0,))
    labels = np.asarray([r["label"] for r in records], np.int32)
    return Split(images, labels)

  num_classes = None
  info = getattr(sources["train"], "dataset_info", None)
  if info is not None and "label" in info.features:
    num_classes = int(info.features["label"].num_classes)
  return read(sources["train"]), read(sources["test"]), num_classes


def _info_for(name, train: Split, num_classes=None) -> DatasetInfo:
  if name in KNOWN:
    return KNOWN[name]
  pixels = train.images.reshape(-1, train.images.shape[-1]).astype(np.float64) / 255.0
  flip = train.images.shape[-3] >= 32 if train.images.ndim >= 4 else False
  return DatasetInfo(int(num_classes or (train.labels.max() + 1)), tuple(pixels.mean(0)),
                     tuple(np.maximum(pixels.std(0), 1e-3)), Augmentation(4 if flip else 2, flip))


def _fashion_mnist(data_dir, idx_dir, download):
  tried = []
  try:
    train, test, _ = _tfds_splits("fashion_mnist", data_dir, download=False)
    return "tfds:fashion_mnist", train, test
  except Exception as e:  # noqa: BLE001 - any failure means "not prepared here"
    tried.append(f"prepared TFDS data in data_dir={data_dir!r}: {type(e).__name__}")
  for label, directory in (("dataset.idx_dir", idx_dir), (f"${FASHION_MNIST_ENV}", os.environ.get(FASHION_MNIST_ENV)),
                           ("system path", SYSTEM_FASHION_MNIST_DIR)):
    if directory and idx_lib.has_idx_dataset(directory):
      return (f"idx:{directory}", Split(*idx_lib.load_idx_split(directory, "train")),
              Split(*idx_lib.load_idx_split(directory, "test")))
    tried.append(f"IDX files in {label}={directory!r}: not found")
  if download:
    try:
      train, test, _ = _tfds_splits("fashion_mnist", data_dir, download=True)
      return "tfds:fashion_mnist", train, test
    except Exception as e:  # noqa: BLE001
      tried.append(f"TFDS download: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
  raise DataUnavailableError(
      "dataset fashion_mnist is not available. Provide it in one of three ways:\n"
      "  1. prepared TFDS data: set dataset.data_dir to a TFDS data directory holding fashion_mnist;\n"
      f"  2. local IDX files (train-images-idx3-ubyte.gz, ...): set dataset.idx_dir, or ${FASHION_MNIST_ENV},\n"
      f"     or install them at {SYSTEM_FASHION_MNIST_DIR} (Debian: apt-get install dataset-fashion-mnist);\n"
      "  3. a TFDS download (needs internet and tensorflow: pip install 'qflax[tf]').\n"
      "Tried: " + "; ".join(tried))


class Records:
  """A random-access view of in-memory arrays as ``{key: image, "label": int}`` records."""

  def __init__(self, split: Split, key: str = "image"):
    self.split, self.key = split, key

  def __len__(self):
    return len(self.split.labels)

  def __getitem__(self, index):
    return {self.key: self.split.images[index], "label": int(self.split.labels[index])}


class StreamSource(NamedTuple):
  """What the streaming path needs: random-access train/test records and constants."""
  name: str
  source: str
  train: object
  test: object
  info: DatasetInfo
  image_key: str


def is_streamed(name: str) -> bool:
  return (name[5:] if name.startswith("tfds:") else name) in STREAMED


def open_stream(name: str, *, data_dir: str | None = None, synthetic: dict | None = None,
                download: bool = True) -> StreamSource:
  """Random-access sources for :class:`StreamingPipeline`.

  ``imagenet2012``, ``imagenette`` and ``ucf101`` (or ``tfds:`` + one of them) come from
  ``tfds.data_source`` (prepared data in ``data_dir``); ``synthetic`` streams the
  synthetic generator (for tests and dry runs).
  """
  if name == "synthetic":
    ds = load_dataset("synthetic", synthetic=synthetic)
    key = "video" if ds.train.images.ndim == 5 else "image"
    info = DatasetInfo(ds.info.num_classes, ds.info.mean, ds.info.std, Augmentation())
    return StreamSource(name, "synthetic", Records(ds.train, key), Records(ds.test, key), info, key)
  tfds_name = name[5:] if name.startswith("tfds:") else name
  if tfds_name not in STREAMED:
    raise ValueError(f"dataset {name!r} has no streaming source; allowed: {tuple(STREAMED)} and synthetic")
  info, key = STREAMED[tfds_name]
  try:
    import tensorflow_datasets as tfds
    train = tfds.data_source(tfds_name, split="train", data_dir=data_dir, download=download)
    test_split = "validation" if tfds_name.startswith("imagenet") else "test"
    test = tfds.data_source(tfds_name, split=test_split, data_dir=data_dir, download=download)
  except Exception as e:  # noqa: BLE001
    raise DataUnavailableError(
        f"TFDS dataset {tfds_name!r} is not prepared in data_dir={data_dir!r} and could not be downloaded "
        f"({type(e).__name__}). Prepare it with TFDS (needs tensorflow: pip install 'qflax[tf]') "
        "or point dataset.data_dir at a prepared copy.") from e
  return StreamSource(tfds_name, f"tfds:{tfds_name}", train, test, info, key)


def _limit(split: Split, limit: int) -> Split:
  return split if not limit else Split(split.images[:limit], split.labels[:limit])


def _shard(split: Split, index: int, count: int) -> Split:
  return split if count == 1 else Split(split.images[index::count], split.labels[index::count])


def load_dataset(name: str, *, data_dir: str | None = None, idx_dir: str | None = None, train_limit: int = 0,
                 eval_limit: int = 0, shard_index: int = 0, num_shards: int = 1, download: bool = True,
                 synthetic: dict | None = None) -> Dataset:
  """Loads a small dataset into host memory.

  Args:
    name: ``fashion_mnist`` (resolved as the module says), another name from
      ``KNOWN`` (read from TFDS), ``tfds:<name>``, ``idx:<dir>`` or ``synthetic``.
    data_dir: TFDS data directory.
    idx_dir: a directory of IDX files for ``fashion_mnist``.
    train_limit, eval_limit: keep only the first examples (0 = all).
    shard_index, num_shards: this process's share (examples ``i::n``), for multi-host.
    download: allow a TFDS download as the last resort.
    synthetic: options of :func:`synthetic_images` (``num_train``, ``num_test``,
      ``image_size``, ``channels``, ``num_classes``, ``num_frames``, ``seed``).

  Raises:
    ValueError: unknown name or bad options. DataUnavailableError: no source works.
  """
  if name == "synthetic":
    opts = dict(synthetic or {})
    num_train, num_test = opts.pop("num_train", 2048), opts.pop("num_test", 512)
    try:
      train = Split(*synthetic_images(num_train, split_seed=0, **opts))
      test = Split(*synthetic_images(num_test, split_seed=1, **opts))
    except TypeError as e:
      raise ValueError(f"bad synthetic dataset options {synthetic}: {e}") from None
    source, num_classes = "synthetic", opts.get("num_classes", 10)
    info = DatasetInfo(num_classes, (0.5,) * train.images.shape[-1], (0.25,) * train.images.shape[-1],
                       Augmentation(0, False))
  elif name == "fashion_mnist":
    source, train, test = _fashion_mnist(data_dir, idx_dir, download)
    info = KNOWN[name]
  elif name.startswith("idx:"):
    directory = name[4:]
    if not idx_lib.has_idx_dataset(directory):
      raise DataUnavailableError(f"dataset.name={name!r}: no IDX train/test files (train-images-idx3-ubyte[.gz], "
                                 f"train-labels-idx1-ubyte[.gz], t10k-...) in {directory!r}")
    source = name
    train, test = (Split(*idx_lib.load_idx_split(directory, s)) for s in ("train", "test"))
    info = _info_for(name, train)
  elif name.startswith("tfds:") or name in KNOWN:
    tfds_name = name[5:] if name.startswith("tfds:") else name
    if tfds_name in STREAMED:
      raise ValueError(f"{tfds_name} is too large for memory; use qflax.data.StreamingPipeline")
    try:
      train, test, num_classes = _tfds_splits(tfds_name, data_dir, download)
    except Exception as e:  # noqa: BLE001
      raise DataUnavailableError(
          f"TFDS dataset {tfds_name!r} is not prepared in data_dir={data_dir!r} and could not be downloaded "
          f"({type(e).__name__}). Prepare it with TFDS (needs tensorflow: pip install 'qflax[tf]') "
          "or point dataset.data_dir at a prepared copy.") from e
    source = f"tfds:{tfds_name}"
    info = _info_for(tfds_name, train, num_classes)
  else:
    raise ValueError(f"dataset {name!r} is unknown; allowed: {dataset_names()}")
  train = _shard(_limit(train, train_limit), shard_index, num_shards)
  test = _shard(_limit(test, eval_limit), shard_index, num_shards)
  return Dataset(name, source, train, test, info)
