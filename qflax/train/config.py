"""Shared config fields, their defaults, and validation before any compute.

Every field gets one clear error naming it and the allowed values
(:class:`ConfigError`). Method-specific fields live under ``method.*`` and are
checked by the method's ``validate_config``.
"""

from __future__ import annotations

import importlib.util
import numbers
import os

import jax
import ml_collections

from qflax import data, methods, models, quant
from qflax.methods import optim
from qflax.methods.common import BIT_AXIS_MODES


class ConfigError(ValueError):
  """A config field has a bad value."""


def default_config() -> ml_collections.ConfigDict:
  """The shared fields with their defaults; config files start from this."""
  c = ml_collections.ConfigDict()
  # bit_axis: how per-bit-width computations run in one step: "loop" (unrolled), "vmap",
  # or "auto" (loop on CPU, vmap on GPU/TPU: the faster of the two in BENCHMARKS.md).
  c.method = ml_collections.ConfigDict({"name": "qat", "bit_axis": "auto"})
  c.model = ml_collections.ConfigDict({"name": "resnet20", "options": ml_collections.ConfigDict()})
  c.dataset = ml_collections.ConfigDict({
      "name": "cifar100", "data_dir": "", "idx_dir": "", "train_limit": 0, "eval_limit": 0, "download": True,
      # Streaming (large datasets, or stream=True): host transforms to image_size
      # (evaluation: resize the shorter side to resize_size, centre crop); clips of
      # num_frames consecutive frames for video.
      "stream": False, "image_size": 224, "resize_size": 256, "num_frames": 0, "num_workers": 8,
      "synthetic": ml_collections.ConfigDict({"num_train": 2048, "num_test": 512, "image_size": 32,
                                              "channels": 3, "num_classes": 10, "num_frames": 0})})
  c.bits = (4,)
  c.num_epochs = 200
  c.batch_size = 128
  c.eval_batch_size = 0          # 0: same as batch_size
  c.seed = 0
  c.quant = ml_collections.ConfigDict({
      "weight_quantizer": "sat", "act_quantizer": "pact", "signed_act_quantizer": "lsq_signed",
      "first_last": "fp", "act_param_init": ml_collections.ConfigDict(), "calibrate_batches": 0})
  c.optimizer = ml_collections.ConfigDict({
      "name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
      "schedule": "cosine", "warmup_epochs": 0.0, "step_milestones": (0.5, 0.75),
      "quantizer_lr_multiplier": 1.0})
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.num_devices = 0              # 0: every local device
  c.distributed = False          # call jax.distributed.initialize() first (multi-host)
  return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a Python config file (configs build on each other with this)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _fail(field, value, allowed):
  raise ConfigError(f"config field {field}={value!r} is invalid; allowed: {allowed}")


def _int(config, field, minimum, allowed=None):
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    _fail(field, value, allowed or f"an integer >= {minimum}")
  return int(value)


def _number(config, field, minimum, allowed=None, strict=False):
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < minimum or (strict and value == minimum):
    _fail(field, value, allowed or f"a number {'>' if strict else '>='} {minimum}")
  return float(value)


def _choice(config, field, allowed):
  value = _get(config, field)
  if value not in allowed:
    _fail(field, value, tuple(allowed))
  return value


def _get(config, field):
  node = config
  for part in field.split("."):
    if part not in node:
      raise ConfigError(f"config field {field} is missing")
    node = node[part]
  return node


def num_devices(config) -> int:
  return config.num_devices or jax.device_count()


def validate(config) -> None:
  """Checks every shared field (and the method's own); raises :class:`ConfigError`."""
  method_cls = methods.get_method(_choice(config, "method.name", methods.method_names()))
  _choice(config, "method.bit_axis", BIT_AXIS_MODES)
  _choice(config, "model.name", models.model_names())
  name = _get(config, "dataset.name")
  if not (name in data.KNOWN or name == "synthetic" or name.startswith(("tfds:", "idx:"))):
    _fail("dataset.name", name, data.dataset_names())
  bits = _get(config, "bits")
  if not isinstance(bits, (tuple, list)) or not bits:
    _fail("bits", bits, "a non-empty tuple of bit-widths, each 1..8 or 32")
  for b in bits:
    if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not (1 <= b <= 8 or b == 32):
      _fail("bits", tuple(bits), "bit-widths 1..8 and 32")
  if len(set(bits)) != len(bits):
    _fail("bits", tuple(bits), "distinct bit-widths")
  _int(config, "num_epochs", 1)
  batch = _int(config, "batch_size", 1)
  _int(config, "eval_batch_size", 0, "0 (same as batch_size) or a positive integer")
  _int(config, "seed", 0)
  for field in ("dataset.train_limit", "dataset.eval_limit", "dataset.num_frames"):
    _int(config, field, 0, "0 (all / images) or a positive integer")
  for field in ("dataset.image_size", "dataset.resize_size", "dataset.num_workers"):
    _int(config, field, 1)
  model_frames = dict(config.model.options).get("num_frames", 0)
  if model_frames and config.dataset.num_frames and model_frames != config.dataset.num_frames:
    _fail("dataset.num_frames", config.dataset.num_frames, f"the model's num_frames ({model_frames})")
  if not isinstance(_get(config, "dataset.stream"), bool):
    _fail("dataset.stream", config.dataset.stream, "True or False")
  available = jax.device_count()
  devices = _int(config, "num_devices", 0, f"0 (all) or 1..{available}")
  if devices > available:
    _fail("num_devices", devices, f"0 (all) or 1..{available}")
  devices = devices or available
  if batch % devices:
    _fail("batch_size", batch, f"a multiple of the device count ({devices})")
  if config.eval_batch_size and config.eval_batch_size % devices:
    _fail("eval_batch_size", config.eval_batch_size, f"0 or a multiple of the device count ({devices})")
  _choice(config, "quant.weight_quantizer", quant.quantizer_names("weight"))
  _choice(config, "quant.act_quantizer", quant.quantizer_names("activation"))
  _choice(config, "quant.signed_act_quantizer", quant.quantizer_names("activation"))
  _choice(config, "quant.first_last", models.FIRST_LAST)
  _int(config, "quant.calibrate_batches", 0)
  for key, value in dict(_get(config, "quant.act_param_init")).items():
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      _fail(f"quant.act_param_init.{key}", value, "a number")
  _choice(config, "optimizer.name", optim.OPTIMIZERS)
  _choice(config, "optimizer.schedule", optim.SCHEDULES)
  _number(config, "optimizer.learning_rate", 0.0, strict=True)
  _number(config, "optimizer.weight_decay", 0.0)
  momentum = _number(config, "optimizer.momentum", 0.0)
  if momentum >= 1:
    _fail("optimizer.momentum", momentum, "0 <= momentum < 1")
  _number(config, "optimizer.warmup_epochs", 0.0)
  _number(config, "optimizer.quantizer_lr_multiplier", 0.0, strict=True)
  for f in _get(config, "optimizer.step_milestones"):
    if not 0 < f < 1:
      _fail("optimizer.step_milestones", tuple(config.optimizer.step_milestones), "fractions in (0, 1)")
  _int(config, "checkpoint_every_steps", 1)
  _int(config, "log_every_steps", 1)
  _int(config, "eval_every_epochs", 1)
  method_cls.validate_config(config, ConfigError)
