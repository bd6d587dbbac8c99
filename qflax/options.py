"""Settings as frozen dataclasses, validated once when built.

A config file is an ``ml_collections.ConfigDict``; :meth:`Settings.from_node` turns
one section of it into a frozen dataclass. Every field declares its check
(:func:`integer`, :func:`number`, :func:`choice`, ...), and the checks run in
``__post_init__``: a settings object is valid as soon as it exists, however it was
built, and every failure is one :class:`ConfigError` naming the field and the
allowed values. A field the dataclass does not declare is an error too, with a
"did you mean" when a declared one is close.

Example:
  >>> @dataclasses.dataclass(frozen=True)
  ... class Sampling(Settings):
  ...   section = "sampling"
  ...   temperature: float = number(1.0, minimum=0.0, strict=True, doc="softmax temperature")
  >>> Sampling.from_node({"temperature": 2.0}).temperature
  2.0
  >>> Sampling.from_node({"temprature": 2.0})
  Traceback (most recent call last):
  ConfigError: config field sampling.temprature is unknown (did you mean sampling.temperature?); ...

The settings every method reads (bit-widths, model, quantizers, optimizer) are
:class:`RunSettings`; methods add their own under ``method.*`` (see
``qflax.methods.base.MethodOptions``) and the loop its own (``qflax.train.config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
from typing import Any, Callable, ClassVar, Mapping

import ml_collections

from qflax import models, quant
from qflax import nn as qnn

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


class ConfigError(ValueError):
  """A config field has a bad value; the message names it and the allowed values."""


class Check:
  """A field's validation: ``convert(value)`` returns the normalised value or raises
  ``ValueError`` (whose text, if any, adds detail); ``allowed`` describes good values."""

  def __init__(self, convert: Callable[[Any], Any], allowed: str):
    self.convert, self.allowed = convert, allowed

  def __call__(self, path: str, value):
    try:
      return self.convert(value)
    except (ValueError, TypeError) as e:
      detail = f" ({e})" if str(e) else ""
      raise ConfigError(f"config field {path}={_show(value)} is invalid{detail}; allowed: {self.allowed}") from None


def invalid(path: str, value, allowed: str):
  """Raises the :class:`ConfigError` for ``path=value`` (for rules across sections)."""
  raise ConfigError(f"config field {path}={_show(value)} is invalid; allowed: {allowed}")


def _show(value) -> str:
  return repr(tuple(value) if isinstance(value, list) else value)


def _plain(value):
  """ConfigDicts as dicts and lists as tuples, recursively (values read from a config)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_plain(v) for v in value)
  return value


def _field(default, check: Check, doc: str, **kw):
  factory = (lambda: dict(default)) if isinstance(default, dict) else None
  metadata = {"check": check, "doc": doc, **kw}
  if factory is not None:
    return dataclasses.field(default_factory=factory, metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def _integer(value, minimum, maximum):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum or (
      maximum is not None and value > maximum):
    raise ValueError
  return int(value)


def _number(value, minimum, maximum, strict, below):
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError
  if minimum is not None and (value < minimum or (strict and value == minimum)):
    raise ValueError
  if (maximum is not None and value > maximum) or (below is not None and value >= below):
    raise ValueError
  return float(value)


def _range_text(minimum, maximum, strict, below) -> str:
  parts = []
  if minimum is not None:
    parts.append(f"{'>' if strict else '>='} {minimum:g}")
  if maximum is not None:
    parts.append(f"<= {maximum:g}")
  if below is not None:
    parts.append(f"< {below:g}")
  return " and ".join(parts)


def integer(default: int, minimum: int = 0, maximum: int | None = None, *, doc: str = "", allowed: str = ""):
  """An integer field in ``[minimum, maximum]``."""
  text = allowed or f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
  return _field(default, Check(lambda v: _integer(v, minimum, maximum), text), doc)


def number(default: float, minimum: float | None = None, maximum: float | None = None, *, strict: bool = False,
           below: float | None = None, doc: str = ""):
  """A finite real field (NaN and infinities are refused), optionally bounded."""
  bounds = _range_text(minimum, maximum, strict, below)
  check = Check(lambda v: _number(v, minimum, maximum, strict, below), "a finite number" + (f" {bounds}" * bool(bounds)))
  return _field(default, check, doc)


def _choice(value, allowed):
  if not isinstance(value, str) or value not in allowed:
    raise ValueError
  return value


def choice(default: str, allowed, *, doc: str = ""):
  """One of ``allowed`` (strings)."""
  allowed = tuple(allowed)
  return _field(default, Check(lambda v: _choice(v, allowed), str(allowed)), doc)


def _boolean(value):
  if not isinstance(value, bool):
    raise ValueError
  return value


def boolean(default: bool, *, doc: str = ""):
  return _field(default, Check(_boolean, "True or False"), doc)


def _text(value):
  if not isinstance(value, str):
    raise ValueError
  return value


def text(default: str, *, doc: str = "", allowed: str = "a string"):
  return _field(default, Check(_text, allowed), doc)


def _sequence(value, item: Callable, length, min_length, order):
  if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
    raise ValueError
  items = tuple(item(v) for v in value)
  if (length is not None and len(items) != length) or len(items) < min_length:
    raise ValueError
  if order == "increasing" and any(a >= b for a, b in zip(items, items[1:])):
    raise ValueError
  if order == "decreasing" and any(a <= b for a, b in zip(items, items[1:])):
    raise ValueError
  return items


def integers(default: tuple, minimum: int = 0, *, length: int | None = None, min_length: int = 0,
             order: str | None = None, doc: str = "", allowed: str = ""):
  """A tuple of integers ``>= minimum`` (``order``: ``"increasing"``, ``"decreasing"`` or None)."""
  text = allowed or (f"a tuple of integers >= {minimum}" + (f", {length} of them" if length is not None else "")
                     + (f", {order}" if order else ""))
  check = Check(lambda v: _sequence(v, lambda i: _integer(i, minimum, None), length, min_length, order), text)
  return _field(tuple(default), check, doc)


def numbers_field(default: tuple, minimum: float | None = None, maximum: float | None = None, *,
                  strict: bool = False, below: float | None = None, min_length: int = 0, order: str | None = None,
                  doc: str = ""):
  """A tuple of finite reals, each bounded like :func:`number`."""
  bounds = _range_text(minimum, maximum, strict, below)
  text = "a tuple of finite numbers" + (f" {bounds}" * bool(bounds)) + (f", {order}" if order else "")
  check = Check(lambda v: _sequence(v, lambda i: _number(i, minimum, maximum, strict, below), None, min_length,
                                    order), text)
  return _field(tuple(default), check, doc)


def _bit_widths(value, allow_full_precision: bool, min_count: int, order):
  if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) < min_count:
    raise ValueError
  if any(isinstance(b, bool) or not isinstance(b, numbers.Integral) for b in value):
    raise ValueError
  bits = qnn.check_bit_set(tuple(int(b) for b in value)) if value else ()
  if not allow_full_precision and any(b >= quant.FULL_PRECISION for b in bits):
    raise ValueError
  if order == "decreasing" and list(bits) != sorted(bits, reverse=True):
    raise ValueError
  return bits


def bit_widths(default: tuple, *, allow_full_precision: bool = True, min_count: int = 1, order: str | None = None,
               doc: str = ""):
  """Distinct bit-widths, each 1..8 (or 32 with ``allow_full_precision``): the one rule
  for every bit-width field (``qflax.nn.check_bit_set``)."""
  allowed = ("distinct bit-widths in 1..8" + (" and 32" if allow_full_precision else "")
             + (f", at least {min_count}" if min_count > 1 else "") + (f", {order}" if order else ""))
  return _field(tuple(default), Check(lambda v: _bit_widths(v, allow_full_precision, min_count, order), allowed), doc)


def _precision_entry(value):
  """One ``bits`` entry normalised: an int (uniform, W = A), ``"w<W>a<A>"`` (W != A),
  or a per-block tuple of those (given as a list, or as a ``.json`` file holding one)."""
  if isinstance(value, str) and value.endswith(".json"):
    path = value
    try:
      with open(path) as f:
        value = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"the plan file {path} cannot be read: {e}") from None
    if not isinstance(value, list) or not value:
      raise ValueError(f"the plan file {path} must hold a non-empty JSON list of per-block bit-widths")
  if isinstance(value, (tuple, list)):
    if not value or any(isinstance(v, (tuple, list)) for v in value):
      raise ValueError("a per-block plan is a non-empty list of bit-widths such as 4 or 'w4a8'")
    return tuple(_precision_entry(v) for v in value)
  w, a = qnn.parse_precision(value)
  return w if w == a else qnn.precision_name(w, a)


def _precisions(value):
  if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or not value:
    raise ValueError
  if all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in value):
    return _bit_widths(value, True, 1, None)
  entries = tuple(_precision_entry(v) for v in value)
  if is_uniform(entries):
    return _bit_widths(entries, True, 1, None)
  if len(set(entries)) != len(entries):
    raise ValueError("an entry is repeated")
  return entries


def precisions(default: tuple, *, doc: str = ""):
  """``bits``: distinct precision entries, each an integer bit-width (1..8 or 32),
  ``"w<W>a<A>"`` (weights and activations apart), or a per-block plan (a list of such
  entries, one per block, or a ``.json`` file holding that list). Methods other than
  those declaring ``mixed_precision`` accept integers only."""
  allowed = ("distinct bit-widths in 1..8 and 32; with method qat also 'w<W>a<A>' entries and per-block plans "
             "(a list, or a .json file holding one)")
  return _field(tuple(default), Check(_precisions, allowed), doc)


def is_uniform(bits) -> bool:
  """True when every ``bits`` entry is a plain integer bit-width."""
  return all(isinstance(b, int) for b in bits)


def _mapping(value):
  value = _plain(value)
  if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
    raise ValueError
  return value


def mapping(default: dict, *, doc: str = "", allowed: str = "a dict of options"):
  """A free-form dict (e.g. a model builder's keyword arguments), checked as a whole
  by the settings' :meth:`Settings.check`."""
  return _field(dict(default), Check(_mapping, allowed), doc)


def nested(cls: type[Settings], *, doc: str = ""):
  """A sub-section (another :class:`Settings`)."""
  return dataclasses.field(default_factory=cls, metadata={"nested": cls, "doc": doc})


@dataclasses.dataclass(frozen=True)
class Settings:
  """Base of every settings dataclass: field checks on construction, then :meth:`check`."""
  section: ClassVar[str] = ""

  def __post_init__(self):
    for f in dataclasses.fields(self):
      check = f.metadata.get("check")
      if check is not None:
        object.__setattr__(self, f.name, check(self.path(f.name), _plain(getattr(self, f.name))))
      elif "nested" in f.metadata and not isinstance(getattr(self, f.name), f.metadata["nested"]):
        raise ConfigError(f"config field {self.path(f.name)} must be a {f.metadata['nested'].__name__}")
    self.check()

  def check(self) -> None:
    """Rules across fields; raise with :meth:`fail`."""

  @classmethod
  def path(cls, name: str) -> str:
    return f"{cls.section}.{name}" if cls.section else name

  def fail(self, name: str, allowed: str, value: Any = dataclasses.MISSING) -> None:
    invalid(self.path(name), getattr(self, name) if value is dataclasses.MISSING else value, allowed)

  @classmethod
  def declared(cls) -> list[dataclasses.Field]:
    """Fields read from the config section (``from_config=False`` ones are supplied by code)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("from_config", True)]

  @classmethod
  def from_node(cls, node, *, ignore: tuple[str, ...] = (), **supplied):
    """The settings from a config section (a ConfigDict or dict); unknown fields raise."""
    given = _plain(node) if node is not None else {}
    if not isinstance(given, dict):
      raise ConfigError(f"config field {cls.section} must be a section of fields, got {_show(given)}")
    known = {f.name: f for f in cls.declared()}
    unknown = sorted(set(given) - set(known) - set(ignore))
    if unknown:
      raise ConfigError(unknown_fields_message(cls.section, unknown, list(known)))
    values = {}
    for name, value in given.items():
      if name in ignore:
        continue
      sub = known[name].metadata.get("nested")
      values[name] = sub.from_node(value) if sub is not None else value
    return cls(**values, **supplied)

  @classmethod
  def describe(cls) -> list[tuple[str, str, str]]:
    """``(field path, default, doc)`` for every declared field, nested sections flattened."""
    rows = []
    for f in cls.declared():
      sub = f.metadata.get("nested")
      if sub is not None:
        rows.extend(sub.describe())
        continue
      default = f.default if f.default is not dataclasses.MISSING else (
          f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
      doc = f.metadata.get("doc", "")
      check = f.metadata.get("check")
      if check is not None and check.allowed:
        doc = f"{doc} [{check.allowed}]" if doc else f"[{check.allowed}]"
      rows.append((cls.path(f.name), repr(default), doc))
    return rows


def unknown_fields_message(section: str, unknown, known) -> str:
  prefix = f"{section}." if section else ""
  hints = []
  for name in unknown:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6) or [
        k for k in known if "".join(t[:1] for t in k.split("_")) == name][:1]
    hints.append(f"{prefix}{name}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
  return (f"config field{'s' if len(unknown) > 1 else ''} {', '.join(hints)} "
          f"{'are' if len(unknown) > 1 else 'is'} unknown; allowed: {sorted(known)}")


def scale_epochs(epochs, total: int) -> tuple[int, ...]:
  """Phase lengths ``epochs`` scaled to add up to ``total`` (unchanged when they do).

  Each phase gets ``epochs_i * total / sum(epochs)`` rounded by largest remainder, and
  at least one epoch unless it had none, so ``--config.num_epochs=3`` shortens a
  phased recipe instead of being refused. Raises ``ValueError`` when ``total`` is
  below the number of non-empty phases.

  Example:
    >>> scale_epochs((30, 100, 70), 20)
    (3, 10, 7)
  """
  epochs = tuple(int(e) for e in epochs)
  if sum(epochs) == total:
    return epochs
  live = [i for i, e in enumerate(epochs) if e > 0]
  if total < len(live):
    raise ValueError(f"{total} epochs cannot hold {len(live)} non-empty phases")
  ideal = {i: epochs[i] * total / sum(epochs) for i in live}
  out = {i: max(1, math.floor(ideal[i])) for i in live}
  while sum(out.values()) > total:          # the minimum of 1 overshot: take from the longest
    j = max((i for i in live if out[i] > 1), key=lambda i: (out[i] - ideal[i], out[i]))
    out[j] -= 1
  for i in sorted(live, key=lambda i: ideal[i] - out[i], reverse=True)[:total - sum(out.values())]:
    out[i] += 1
  return tuple(out.get(i, 0) for i in range(len(epochs)))


# --- the shared settings every method reads --------------------------------------


def model_options_error(name: str, model_options: dict) -> str | None:
  """Why the registered model ``name`` cannot be built with ``model_options`` (None if it can)."""
  try:
    models.get_model(name, 10, models.QuantSpec(), **model_options)
  except (TypeError, ValueError) as e:
    return str(e)
  return None


@dataclasses.dataclass(frozen=True)
class ModelSettings(Settings):
  section = "model"
  name: str = choice("resnet20", models.model_names(), doc="registered model name")
  options: dict = mapping({}, doc="the model builder's keyword arguments (e.g. width, widths)")

  def check(self):
    why = model_options_error(self.name, self.options)
    if why:
      self.fail("options", f"options of model {self.name!r} ({why})")

  def build(self, num_classes: int, spec: models.QuantSpec) -> models.Network:
    return models.get_model(self.name, num_classes, spec, **self.options)


@dataclasses.dataclass(frozen=True)
class QuantSettings(Settings):
  section = "quant"
  weight_quantizer: str = choice("sat", quant.quantizer_names("weight"), doc="weight quantizer of block layers")
  act_quantizer: str = choice("pact", quant.quantizer_names("activation"),
                              doc="quantizer of non-negative layer inputs")
  signed_act_quantizer: str = choice("lsq_signed", quant.quantizer_names("activation"),
                                     doc="quantizer of inputs that can be negative (MobileNetV2 block inputs)")
  first_last: str = choice("fp", models.FIRST_LAST, doc="first conv and classifier: full precision or 8-bit")
  act_param_init: dict = mapping({}, doc="initial activation-quantizer scalars, e.g. {'alpha': 8.0}",
                                 allowed="a dict of positive finite numbers by parameter name")
  calibrate_batches: int = integer(0, doc="training batches that set quantizer scalars before the first step")
  monitor: bool = boolean(True, doc="report quantizer health every log_every_steps and warn on degeneration")

  def check(self):
    names = set()
    for role_name in (self.act_quantizer, self.signed_act_quantizer):
      names |= set(quant.get_quantizer(role_name, "activation").param_names)
    for key, value in self.act_param_init.items():
      if key not in names:
        self.fail("act_param_init", f"parameters of the activation quantizers: {sorted(names) or 'none'}, not "
                  f"{key!r} (after switching quantizers, clear it: --config.quant.act_param_init='{{}}')")
      try:
        _number(value, 0.0, None, True, None)
      except ValueError:
        raise ConfigError(f"config field quant.act_param_init.{key}={value!r} is invalid; allowed: a finite "
                          "number > 0") from None

  def spec(self, bit_set, compute_dtype: str = "float32") -> models.QuantSpec:
    """The models' quantization settings for layers serving ``bit_set``."""
    return models.QuantSpec(bit_set=tuple(bit_set), weight_quantizer=self.weight_quantizer,
                            act_quantizer=self.act_quantizer, signed_act_quantizer=self.signed_act_quantizer,
                            act_param_init=tuple(sorted(self.act_param_init.items())), first_last=self.first_last,
                            compute_dtype=compute_dtype)


@dataclasses.dataclass(frozen=True)
class OptimizerSettings(Settings):
  section = "optimizer"
  name: str = choice("sgd", OPTIMIZERS)
  learning_rate: float = number(0.1, minimum=0.0, strict=True)
  momentum: float = number(0.9, minimum=0.0, below=1.0, doc="SGD momentum (0: none)")
  nesterov: bool = boolean(True)
  weight_decay: float = number(5e-4, minimum=0.0, doc="on convolution and dense kernels only")
  schedule: str = choice("cosine", SCHEDULES, doc="per phase: cosine to 0, x0.1 steps, or constant")
  warmup_epochs: float = number(0.0, minimum=0.0,
                                 doc="linear warm-up at the start of each phase (below num_epochs; a shorter "
                                     "phase warms up over all but its last step)")
  step_milestones: tuple = numbers_field((0.5, 0.75), minimum=0.0, strict=True, below=1.0, order="increasing",
                                         doc="fractions of the phase where the step schedule multiplies by 0.1")
  quantizer_lr_multiplier: float = number(1.0, minimum=0.0, strict=True,
                                          doc="learning rate of quantizer scalars relative to the weights'")
  weight_quantizer_lr_multiplier: float = number(
      0.0, minimum=0.0, doc="weight-quantizer scalars (e.g. QIL weight intervals); 0: quantizer_lr_multiplier")
  clip_weight_decay: float = number(0.0, minimum=0.0, doc="L2 penalty on activation clip values (PACT's alpha)")

  @property
  def kernel_quantizer_lr_multiplier(self) -> float:
    return self.weight_quantizer_lr_multiplier or self.quantizer_lr_multiplier


@dataclasses.dataclass(frozen=True)
class RunSettings(Settings):
  """The config fields every method reads (the loop reads more, see ``qflax.train.config``)."""
  bits: tuple = precisions((4,), doc="bit-widths trained and evaluated")
  num_epochs: int = integer(200, 1, doc="total epochs (phased methods split them)")
  seed: int = integer(0, 0, 2**32 - 1, doc="one seed for initialisation, data order and sampling")
  compute_dtype: str = choice("float32", qnn.COMPUTE_DTYPES,
                              doc="convolutions and activations (bfloat16: on the integer codes up to 8 bits); "
                                  "parameters, optimizer state and BatchNorm statistics stay float32")
  model: ModelSettings = nested(ModelSettings)
  quant: QuantSettings = nested(QuantSettings)
  optimizer: OptimizerSettings = nested(OptimizerSettings)

  def check(self):
    if self.optimizer.warmup_epochs >= self.num_epochs:
      invalid("optimizer.warmup_epochs", self.optimizer.warmup_epochs,
              f"a number of epochs below num_epochs ({self.num_epochs})")

  def spec(self, bit_set=None) -> models.QuantSpec:
    """The models' settings: quantizers serving ``bit_set`` (``None``: full precision, no
    quantizers), in the run's ``compute_dtype``."""
    if bit_set is None:
      return models.QuantSpec(compute_dtype=self.compute_dtype)
    return self.quant.spec(bit_set, self.compute_dtype)

  @classmethod
  def from_config(cls, config) -> RunSettings:
    """The run settings from a whole config (other top-level fields are the loop's)."""
    names = [f.name for f in cls.declared()]
    return cls.from_node({n: config[n] for n in names if n in config})
