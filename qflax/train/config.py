"""The config a run reads: defaults, loading config files, validation before any compute.

A config is an ``ml_collections.ConfigDict`` with three kinds of fields: the run
settings every method reads (:class:`qflax.options.RunSettings`: ``bits``,
``num_epochs``, ``seed``, ``model.*``, ``quant.*``, ``optimizer.*``), the method's own
``method.*`` (its options dataclass), and the loop's (:class:`LoopSettings`:
``dataset.*``, ``batch_size``, checkpoint and logging intervals, devices).
:func:`load` turns a config into these frozen, validated settings; any unknown or
bad field is one :class:`ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import os
from typing import NamedTuple

import jax
import ml_collections

from qflax import data, methods, options
from qflax.methods.base import MethodOptions
from qflax.options import ConfigError, RunSettings, Settings
from qflax.train.checkpoint import check_start

__all__ = ["Config", "ConfigError", "DatasetSettings", "LoopSettings", "default_config", "load", "load_config_file",
           "validate"]


def _dataset_name(value):
  if not isinstance(value, str) or not data.is_known_dataset(value):
    raise ValueError
  return value


MAX_SYNTHETIC_BYTES = 1 << 33   # synthetic images are made in host memory: refuse what cannot fit


@dataclasses.dataclass(frozen=True)
class SyntheticSettings(Settings):
  section = "dataset.synthetic"
  num_train: int = options.integer(2048, 1)
  num_test: int = options.integer(512, 1)
  image_size: int = options.integer(32, 8, doc="at least 8: what the shipped models downsample")
  channels: int = options.integer(3, 1)
  num_classes: int = options.integer(10, 2)
  num_frames: int = options.integer(0, doc="> 0: clips of this many frames")

  def check(self):
    image_bytes = self.image_size ** 2 * self.channels * max(self.num_frames, 1)
    if (self.num_train + self.num_test) * image_bytes > MAX_SYNTHETIC_BYTES:
      self.fail("num_train", f"images of at most {MAX_SYNTHETIC_BYTES >> 30} GiB with num_test (held in memory)")


@dataclasses.dataclass(frozen=True)
class DatasetSettings(Settings):
  section = "dataset"
  name: str = dataclasses.field(default="cifar100", metadata={
      "check": options.Check(_dataset_name, str(data.dataset_names())), "doc": "dataset name"})
  data_dir: str = options.text("", doc="TFDS data directory")
  idx_dir: str = options.text("", doc="IDX files for fashion_mnist")
  train_limit: int = options.integer(0, allowed="0 (all) or a positive integer")
  eval_limit: int = options.integer(0, allowed="0 (all) or a positive integer")
  download: bool = options.boolean(True, doc="allow a TFDS download as the last resort")
  stream: bool = options.boolean(False, doc="stream through the host pipeline (large datasets always do)")
  image_size: int = options.integer(224, 1, doc="streamed: training crop / evaluation centre crop")
  resize_size: int = options.integer(256, 1, doc="streamed evaluation: shorter side before the crop")
  num_frames: int = options.integer(0, allowed="0 (images) or a positive integer", doc="video: frames per clip")
  num_workers: int = options.integer(8, 1, doc="streaming host threads")
  synthetic: SyntheticSettings = options.nested(SyntheticSettings)

  def check(self):
    if self.stream and not (data.is_streamed(self.name) or self.name == "synthetic"):
      streaming = ", ".join((*data.sources.STREAMED, "synthetic"))
      self.fail("stream", f"False for {self.name!r} (streaming sources: {streaming})")

  @property
  def streamed(self) -> bool:
    return self.stream or data.is_streamed(self.name)


@dataclasses.dataclass(frozen=True)
class LoopSettings(Settings):
  """The top-level fields the loop reads."""
  dataset: DatasetSettings = options.nested(DatasetSettings)
  batch_size: int = options.integer(128, 1, doc="global batch size")
  eval_batch_size: int = options.integer(0, allowed="0 (same as batch_size) or a positive integer")
  checkpoint_every_steps: int = options.integer(1000, 1)
  log_every_steps: int = options.integer(50, 1)
  eval_every_epochs: int = options.integer(1, 1)
  num_devices: int = options.integer(0, allowed="0 (every local device) or a device count")
  distributed: bool = options.boolean(False, doc="call jax.distributed.initialize() first (multi-host)")

  def check(self):
    available = jax.device_count()
    if self.num_devices > available:
      self.fail("num_devices", f"0 (all) or 1..{available}")
    devices = self.devices
    if self.batch_size % devices:
      self.fail("batch_size", f"a multiple of the device count ({devices})")
    if self.eval_batch_size % devices:
      self.fail("eval_batch_size", f"0 or a multiple of the device count ({devices})")

  @property
  def devices(self) -> int:
    return self.num_devices or jax.device_count()

  @property
  def eval_batch(self) -> int:
    return self.eval_batch_size or self.batch_size


class Config(NamedTuple):
  """A validated config: the method's options (with the run settings) and the loop's."""
  method: MethodOptions
  loop: LoopSettings
  method_name: str

  @property
  def run(self) -> RunSettings:
    return self.method.run


def _to_config_dict(value):
  if isinstance(value, dict):
    return ml_collections.ConfigDict({k: _to_config_dict(v) for k, v in value.items()})
  return value


def _defaults(cls) -> dict:
  out = {}
  for f in cls.declared():
    sub = f.metadata.get("nested")
    out[f.name] = _defaults(sub) if sub is not None else (
        f.default if f.default is not dataclasses.MISSING else f.default_factory())
  return out


def default_config() -> ml_collections.ConfigDict:
  """The shared fields with their defaults (from the settings dataclasses); config
  files start from this and add ``method.*`` fields."""
  c = _to_config_dict({**_defaults(RunSettings), **_defaults(LoopSettings)})
  c.method = ml_collections.ConfigDict({"name": "qat", "bit_axis": "auto"})
  return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a Python config file (configs build on each other with this).

  Raises:
    ConfigError: the file is missing, fails to run, or has no ``get_config`` returning a ``ConfigDict``.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path} not found")
  name = os.path.splitext(os.path.basename(path))[0]
  loader = importlib.machinery.SourceFileLoader(name, path)   # whatever the file's suffix
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
  try:
    loader.exec_module(module)
    config = module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 - the user's code: name the file and the error
    raise ConfigError(f"config file {path} could not be loaded: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path}: get_config() returned {type(config).__name__}, not an "
                      "ml_collections.ConfigDict")
  return config


def load(config) -> Config:
  """Validates every field of ``config`` and returns the frozen settings.

  Raises:
    ConfigError: naming the first bad or unknown field and the allowed values.
  """
  if not isinstance(config.get("method"), ml_collections.ConfigDict) or "name" not in config.method:
    raise ConfigError("config field method.name is missing; allowed: " + str(methods.method_names()))
  name = config.method.name
  if name not in methods.method_names():
    options.invalid("method.name", name, str(methods.method_names()))
  run_fields = [f.name for f in RunSettings.declared()]
  loop_fields = [f.name for f in LoopSettings.declared()]
  unknown = sorted(set(config.keys()) - set(run_fields) - set(loop_fields) - {"method"})
  if unknown:
    raise ConfigError(options.unknown_fields_message("", unknown, run_fields + loop_fields + ["method"]))
  loop = LoopSettings.from_node({k: config[k] for k in loop_fields if k in config})
  method_options = methods.get_method(name).Options.from_config(config)
  model_frames = method_options.run.model.options.get("num_frames", 0)
  if model_frames and loop.dataset.num_frames and model_frames != loop.dataset.num_frames:
    options.invalid("dataset.num_frames", loop.dataset.num_frames, f"the model's num_frames ({model_frames})")
  return Config(method_options, loop, name)


def validate(config) -> Config:
  """:func:`load`, then checks that every run the method starts from (``options.starts``)
  is a finished ``fp`` run of the right model: everything a run needs before compute."""
  settings = load(config)
  for start in settings.method.starts:
    check_start(start)
  return settings


def describe(method_name: str | None = None) -> list[tuple[str, str, str]]:
  """``(field, default, doc)`` rows of the config tree (one method's ``method.*`` fields,
  or every method's), for ``launch.py --help_config``."""
  rows = [("method.name", "'qat'", f"{methods.method_names()}")]
  for name in ([method_name] if method_name else methods.method_names()):
    rows += [(field.replace("method.", f"method.{'' if method_name else name + ':'}"), default, doc)
             for field, default, doc in methods.get_method(name).Options.describe()]
  return rows + RunSettings.describe() + LoopSettings.describe()
