"""Dataset sources: ``tfds:<name>``, ``idx:<dir>``, ``synthetic``, and known names.

``fashion_mnist`` resolves as ``data.md`` says: prepared TFDS data in
``data_dir``; local IDX files (the configured directory, then
``$QFLAX_FASHION_MNIST_DIR``, then ``/usr/share/datasets/fashion-mnist``); a
TFDS download. When none works the error lists these three ways, before any
compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
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
  """Every name :func:`load_dataset` or :func:`open_stream` accepts (the last two are patterns)."""
  return tuple(KNOWN) + tuple(STREAMED) + ("synthetic", "tfds:<name>", "idx:<dir>")


def is_known_dataset(name: str) -> bool:
  """Whether :func:`load_dataset` or :func:`open_stream` accepts ``name`` (config validation uses this)."""
  if not isinstance(name, str):
    return False
  if name.startswith("tfds:"):
    return len(name) > len("tfds:")
  if name.startswith("idx:"):
    return len(name) > len("idx:")
  return name in KNOWN or name in STREAMED or name == "synthetic"


# --- TFDS: one-line errors that name the cause and the fix -----------------------

DOWNLOAD_HOST = ("storage.googleapis.com", 443)   # TFDS tries its GCS mirror before the dataset's own URLs
NETWORK_TIMEOUT_S = 3.0
# Import names whose pip package is called differently.
_PIP_NAMES = {"PIL": "Pillow", "tensorflow": "tensorflow-cpu", "tensorflow_datasets": "tensorflow-datasets",
              "array_record": "array-record", "apache_beam": "apache-beam", "cv2": "opencv-python-headless",
              "importlib_resources": "importlib_resources"}


def _unavailable(message: str, cause: str) -> DataUnavailableError:
  """A :class:`DataUnavailableError` carrying a short ``cause`` (for lists of what was tried)."""
  error = DataUnavailableError(message)
  error.cause = cause
  return error


def _first_line(error: BaseException, limit: int = 160) -> str:
  text = str(error).strip()
  line = text.splitlines()[0] if text else ""
  return f"{type(error).__name__}: {line[:limit]}" if line else type(error).__name__


def _missing_module(error: BaseException) -> str | None:
  """The top-level name of the module whose import failed, anywhere in ``error``'s cause chain."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, ImportError):
      name = error.name or (str(error).split("'")[1] if str(error).count("'") >= 2 else None)
      return name.split(".")[0] if name else "?"
    error = error.__cause__ or error.__context__
  return None


def _missing_module_error(name: str, module: str, error: BaseException) -> DataUnavailableError:
  pip = _PIP_NAMES.get(module, module)
  return _unavailable(f"TFDS dataset {name!r} cannot be read: Python module {module!r} is missing "
                      f"({_first_line(error)}); install it with `pip install {pip}`.",
                      f"module {module!r} missing (pip install {pip})")


class _DropTfdsProbeWarnings(logging.Filter):
  """Drops TFDS's "Variant folder ... has no dataset_info.json" warning, expected while probing."""

  def filter(self, record):
    return not str(record.msg).startswith("Variant folder ")


def _tfds_leftovers() -> set[str]:
  """The empty ``tmp*tfds`` directories in the system's temp directory."""
  root = tempfile.gettempdir()
  try:
    names = os.listdir(root)
  except OSError:
    return set()
  paths = (os.path.join(root, n) for n in names if n.startswith("tmp") and n.endswith("tfds"))
  return {p for p in paths if os.path.isdir(p) and not os.listdir(p)}


@contextlib.contextmanager
def _tfds_probe():
  """A TFDS lookup, kept quiet and tidy for the ``with`` body.

  Drops only the probe warning above (on the ``absl`` logger TFDS logs to). TFDS makes a temporary
  directory for the metadata it looks for online and, offline, leaves it behind empty: one in the
  system's temp directory per lookup, two per run. The empty ones the body left are removed
  (``rmdir`` refuses a directory another thread has since filled).
  """
  logger, dropper = logging.getLogger("absl"), _DropTfdsProbeWarnings()
  before = _tfds_leftovers()
  logger.addFilter(dropper)
  try:
    yield
  finally:
    logger.removeFilter(dropper)
    for path in _tfds_leftovers() - before:
      with contextlib.suppress(OSError):
        os.rmdir(path)


def network_problem(host: tuple[str, int] = DOWNLOAD_HOST, timeout: float = NETWORK_TIMEOUT_S) -> str | None:
  """``None`` if ``host`` (or the configured HTTPS proxy) accepts a TCP connection within ``timeout`` s.

  Otherwise a short reason. Name resolution counts towards the timeout (the probe runs in a daemon thread).
  """
  proxies = urllib.request.getproxies()
  proxy = proxies.get("https") or proxies.get("all")
  if proxy:
    parsed = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    host = (parsed.hostname or proxy, parsed.port or 80)
  failures = []

  def connect():
    try:
      socket.create_connection(host, timeout=timeout).close()
      failures.append("")
    except OSError as e:
      failures.append(f"{type(e).__name__}: {e}")

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  if failures and not failures[0]:
    return None
  return f"cannot reach {host[0]}:{host[1]}: {failures[0] if failures else f'no answer within {timeout:g} s'}"


def _tfds_root(tfds, data_dir: str | None) -> str:
  return str(data_dir or getattr(getattr(tfds.core, "constants", None), "DATA_DIR", "~/tensorflow_datasets"))


def _prepared_dir(tfds, name: str, data_dir: str | None) -> tuple[bool, str]:
  """Whether TFDS finds ``name`` prepared, and the variant directory it looked in."""
  try:
    with _tfds_probe():
      builder = tfds.builder(name, data_dir=data_dir)
      return bool(builder.is_prepared()), str(builder.data_dir)
  except Exception:  # noqa: BLE001 - the caller reports the original failure
    return False, _tfds_root(tfds, data_dir)


def _prepare_hint(name: str, root: str) -> str:
  return (f"prepare it where there is internet and tensorflow (pip install 'qflax[tf]'): "
          f"`tfds build {name} --data_dir={root} --file_format=array_record`, or set dataset.data_dir to a "
          "directory holding a prepared copy")


def _read_prepared(tfds, name: str, splits, data_dir: str | None) -> dict:
  with _tfds_probe():
    return {split: tfds.data_source(name, split=split, data_dir=data_dir, download=False) for split in splits}


def _download(tfds, name: str, splits, data_dir: str | None) -> dict:
  with _tfds_probe():
    return {split: tfds.data_source(name, split=split, data_dir=data_dir, download=True) for split in splits}


def tfds_sources(name: str, splits, data_dir: str | None, download: bool) -> dict:
  """``{split: tfds.data_source}`` of prepared data; downloads (when allowed and online) otherwise.

  Raises:
    DataUnavailableError: a one-line message naming the cause (missing module, not prepared, no network,
      unknown name, failed download) and the fix; ``.cause`` holds a short form.
  """
  try:
    import tensorflow_datasets as tfds  # only TFDS paths need it
  except ImportError as e:
    raise _missing_module_error(name, _missing_module(e) or "tensorflow_datasets", e) from e
  try:
    return _read_prepared(tfds, name, splits, data_dir)
  except Exception as e:  # noqa: BLE001 - classified below
    first = e
  root = _tfds_root(tfds, data_dir)
  if (module := _missing_module(first)) is not None:
    raise _missing_module_error(name, module, first) from first
  if any(c.__name__ == "DatasetNotFoundError" for c in type(first).__mro__):
    raise _unavailable(f"TFDS knows no dataset {name!r} ({_first_line(first, 80)}); check the name against "
                       "tfds.list_builders() (some, e.g. ucf101, register only when tensorflow is installed: "
                       "pip install 'qflax[tf]').", "unknown to TFDS") from first
  prepared, searched = _prepared_dir(tfds, name, data_dir)
  if prepared:
    raise _unavailable(f"TFDS dataset {name!r} is prepared in {searched} but cannot be read "
                       f"({_first_line(first)}); rebuild it with --file_format=array_record or fix the files.",
                       f"prepared but unreadable ({type(first).__name__})") from first
  if not download:
    raise _unavailable(f"TFDS dataset {name!r} is not prepared in data_dir={root!r} (searched {searched}) and "
                       f"downloads are off (dataset.download=False); {_prepare_hint(name, root)}.",
                       f"not prepared in {root}") from first
  if (problem := network_problem()) is not None:
    raise _unavailable(f"TFDS dataset {name!r} is not prepared in data_dir={root!r} and cannot be downloaded: "
                       f"no network ({problem}); {_prepare_hint(name, root)}.", f"no network ({problem})") from first
  try:
    return _download(tfds, name, splits, data_dir)
  except Exception as e:  # noqa: BLE001
    if (module := _missing_module(e)) is not None:
      raise _missing_module_error(name, module, e) from e
    raise _unavailable(f"TFDS dataset {name!r} is not prepared in data_dir={root!r} and its download failed "
                       f"({_first_line(e)}); {_prepare_hint(name, root)}.", f"download failed ({_first_line(e, 80)})"
                       ) from e


def _tfds_splits(name: str, data_dir: str | None, download: bool):
  """Reads a small TFDS dataset's train and test splits into memory; also returns its class count."""
  sources = tfds_sources(name, ("train", "test"), data_dir, download)

  def read(source):
    try:
      records = [source[i] for i in range(len(source))]
    except ImportError as e:   # decoding images needs Pillow
      raise _missing_module_error(name, _missing_module(e) or "?", e) from e
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records]) if records else np.zeros((0,))
    labels = np.asarray([r["label"] for r in records], np.int32)
    return Split(images, labels)

  num_classes = None
  info = getattr(sources["train"], "dataset_info", None)
  if info is not None and "label" in info.features:
    num_classes = int(info.features["label"].num_classes)
  return read(sources["train"]), read(sources["test"]), num_classes


def _check_labels(name: str, train: Split, test: Split, num_classes: int):
  """At least two classes in training, and every label one of the dataset's ``0 .. num_classes - 1``."""
  present = np.unique(train.labels).size
  if num_classes < 2 or present < 2:
    raise DataUnavailableError(f"dataset {name!r}: its training labels name {min(present, num_classes)} class; "
                               "a classifier needs at least 2")
  for split, labels in (("training", train.labels), ("test", test.labels)):
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
      raise DataUnavailableError(f"dataset {name!r}: {outside.size} {split} labels (e.g. {int(outside[0])}) are "
                                 f"outside its {num_classes} classes 0..{num_classes - 1}")


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
  except DataUnavailableError as e:
    tried.append(f"prepared TFDS data: {getattr(e, 'cause', e)}")
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
    except DataUnavailableError as e:
      tried.append(f"TFDS download: {getattr(e, 'cause', e)}")
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
  """Whether ``name`` (bare or ``tfds:``) is read through :class:`StreamingPipeline`."""
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
  test_split = "validation" if tfds_name.startswith("imagenet") else "test"
  sources = tfds_sources(tfds_name, ("train", test_split), data_dir, download)
  train, test = sources["train"], sources[test_split]
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
  if not is_known_dataset(name):
    raise ValueError(f"dataset {name!r} is unknown; allowed: {dataset_names()}")
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
  elif name.startswith("tfds:") or name in KNOWN or name in STREAMED:
    tfds_name = name[5:] if name.startswith("tfds:") else name
    if tfds_name in STREAMED:
      raise ValueError(f"{tfds_name} is too large for memory; use qflax.data.StreamingPipeline")
    train, test, num_classes = _tfds_splits(tfds_name, data_dir, download)
    source = f"tfds:{tfds_name}"
    info = _info_for(tfds_name, train, num_classes)
  else:
    raise ValueError(f"dataset {name!r} is unknown; allowed: {dataset_names()}")
  _check_labels(name, train, test, info.num_classes)
  train = _shard(_limit(train, train_limit), shard_index, num_shards)
  test = _shard(_limit(test, eval_limit), shard_index, num_shards)
  return Dataset(name, source, train, test, info)
