"""Consistency of an integer model with the network it names: layer paths, shapes, bits, dtypes.

The expected structure comes from one abstract trace of the named model's ``init``
(:func:`trace.probe`: nothing is allocated or compiled), so a file whose layers do not fit
its model is rejected before any array is read.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from qflax import models, quant
from qflax.export._src import trace
from qflax.export._src.types import (FieldError, IntegerModel, LinearLayer, NormLayer, PackedCodes, Variant,
                                     short_repr, tensor_info)

Info = Callable[[str, str], tuple[str, tuple[int, ...]]]   # (tensor name, field) -> (dtype, shape)


class Expected(NamedTuple):
  """What one layer of a variant must look like."""
  kind: str                      # "linear" or "norm"
  shape: tuple[int, ...]         # kernel shape, or (channels,) for a BatchNorm
  code_bits: int | None          # weight bits when the kernel is stored as codes
  act_quantizer: str | None
  a_bits: int | None
  use_bias: bool


def as_tuples(value):
  """JSON lists back into tuples (model builders take tuples, e.g. ``widths``)."""
  return trace.as_tuples(value)


def build_model(im: IntegerModel, spec: models.QuantSpec | None = None) -> models.Network:
  """``models.get_model`` for the model an integer model names (with ``spec``, default its own)."""
  try:
    return models.get_model(im.model_name, im.num_classes, spec or im.spec, **as_tuples(dict(im.model_options)))
  except Exception as e:   # any builder error: the stored name/options do not describe a model
    raise FieldError("model", f"{im.model_name!r} with options {short_repr(dict(im.model_options))} cannot be "
                     f"built: {type(e).__name__}: {e}") from None


def sites(im: IntegerModel, variant: Variant) -> dict[str, trace.Site]:
  """The layers of the model ``im`` names (:func:`trace.probe`, cached), for ``variant``'s plan length."""
  build_model(im)
  try:
    return trace.probe_named(im.model_name, im.model_options, im.num_classes, im.spec, im.input_shape,
                             len(variant.w_bits))
  except Exception as e:   # the plan length or input shape does not fit the model
    raise FieldError("plan", f"the model cannot run input shape {list(im.input_shape)} with {len(variant.w_bits)} "
                     f"blocks: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def expected_layers(im: IntegerModel, variant: Variant) -> dict[str, Expected]:
  """Layer path -> :class:`Expected` for one variant, in call order."""
  out = {}
  for path, site in sites(im, variant).items():
    if site.kind == "norm":
      out[path] = Expected("norm", site.shape, None, None, None, False)
      continue
    w_bits, a_bits, _ = site.precision(variant.w_bits, variant.a_bits, variant.slots)
    quantized = site.weight_quantizer != "none" and w_bits < quant.FULL_PRECISION
    out[path] = Expected("linear", site.shape, w_bits if quantized else None, site.act_quantizer, a_bits,
                         site.use_bias)
  return out


def _tensor(info: Info, name, field: str, dtype: str | None = "float32", shape=None):
  got_dtype, got_shape = info(name, field)
  if dtype is not None and got_dtype != dtype:
    raise FieldError(field, f"tensor {name!r} has dtype {got_dtype}, expected {dtype}")
  if shape is not None and tuple(got_shape) != tuple(shape):
    raise FieldError(field, f"tensor {name!r} has shape {list(got_shape)}, expected {list(shape)}")
  return got_dtype, tuple(got_shape)


def _broadcasts(field: str, info: Info, name, kernel_shape) -> None:
  _, shape = _tensor(info, name, field)
  try:
    ok = len(shape) <= len(kernel_shape) and np.broadcast_shapes(shape, kernel_shape) == tuple(kernel_shape)
  except ValueError:
    ok = False
  if not ok:
    raise FieldError(field, f"shape {list(shape)} does not broadcast to the kernel shape {list(kernel_shape)}")


def _check_linear(field: str, layer, exp: Expected, info: Info) -> None:
  if not isinstance(layer, LinearLayer):
    raise FieldError(f"{field}.type", "expected a linear layer (QuantConv / QuantDense)")
  if exp.code_bits is None:
    _tensor(info, layer.kernel, f"{field}.kernel", "float32", exp.shape)
    for key in ("scale", "zero_point"):
      if getattr(layer, key) is not None:
        raise FieldError(f"{field}.{key}", "must be null for a full-precision kernel")
  else:
    _tensor(info, layer.kernel, f"{field}.kernel", f"u{exp.code_bits}", exp.shape)
    for key in ("scale", "zero_point"):
      if getattr(layer, key) is None:
        raise FieldError(f"{field}.{key}", "missing for a kernel stored as codes")
      _broadcasts(f"{field}.{key}", info, getattr(layer, key), exp.shape)
  if (layer.bias is not None) != exp.use_bias:
    raise FieldError(f"{field}.bias", "present for a layer without bias" if layer.bias else "missing")
  if layer.bias is not None:
    _tensor(info, layer.bias, f"{field}.bias", "float32", exp.shape[-1:])
  act = layer.activation
  if act.quantizer != exp.act_quantizer:
    raise FieldError(f"{field}.activation.quantizer", f"{act.quantizer!r}, the model uses {exp.act_quantizer!r}")
  if act.bits != exp.a_bits:
    raise FieldError(f"{field}.activation.bits", f"{act.bits}, the plan gives {exp.a_bits}")
  names = quant.get_quantizer(act.quantizer, "activation").param_names
  if sorted(act.params) != sorted(names):
    raise FieldError(f"{field}.activation.params", f"keys {sorted(act.params)}, expected {sorted(names)}")


def _check_norm(field: str, layer, exp: Expected, info: Info) -> None:
  if not isinstance(layer, NormLayer):
    raise FieldError(f"{field}.type", "expected a BatchNorm layer")
  for key in NormLayer._fields:
    _tensor(info, getattr(layer, key), f"{field}.{key}", "float32", exp.shape)


def _references(variant: Variant):
  for layer in variant.layers.values():
    yield from (v for v in layer if isinstance(v, str))


def check(im: IntegerModel, info: Info | None = None) -> None:
  """Raises :class:`FieldError` unless every variant's layers are exactly those its model calls at
  its plan, with the stored dtypes and shapes, bits and activation quantizers the model implies.

  ``info(name, field) -> (dtype, shape)`` describes the tensors (default: from ``im.tensors``), so a
  file can be checked from its manifest before its arrays are read.
  """
  if info is None:
    def info(name, field):
      if name not in im.tensors:
        raise FieldError(field, f"names the unknown tensor {short_repr(name)}")
      return tensor_info(im.tensors[name])
  for vname, variant in im.variants.items():
    field = f"variants.{vname}.layers"
    try:
      expected = expected_layers(im, variant)
    except FieldError as e:
      raise (FieldError(f"variants.{vname}.plan", e.why) if e.field == "plan" else e) from None
    missing, extra = expected.keys() - variant.layers.keys(), variant.layers.keys() - expected.keys()
    if missing or extra:
      raise FieldError(field, f"missing {sorted(missing)[:3]}, unexpected {short_repr(sorted(extra)[:3])}")
    for path, exp in expected.items():
      (_check_norm if exp.kind == "norm" else _check_linear)(f"{field}.{path}", variant.layers[path], exp, info)
  unused = set(im.tensors) - {name for v in im.variants.values() for name in _references(v)}
  if unused:
    raise FieldError("tensors", f"{len(unused)} tensor(s) no layer uses, e.g. {short_repr(sorted(unused)[0])}")


def _check_codes(name: str, codes: PackedCodes) -> None:
  count = math.prod(codes.shape)
  if codes.bits > 4:
    if codes.data.size and int(codes.data.max()) >= 1 << codes.bits:
      raise FieldError(f"tensors.{name}", f"holds a code >= 2^{codes.bits}")
  elif count * codes.bits % 8 and int(codes.data[-1]) >> (count * codes.bits % 8):
    raise FieldError(f"tensors.{name}", "padding bits after the last code are not zero")


def check_values(im: IntegerModel) -> None:
  """Raises :class:`FieldError` for non-finite floats, codes out of range, scales <= 0, zero points
  outside ``[0, 2^bits - 1]`` or not multiples of 1/2, or negative BatchNorm variances."""
  for name, value in im.tensors.items():
    if isinstance(value, PackedCodes):
      _check_codes(name, value)
    elif not np.all(np.isfinite(value)):
      raise FieldError(f"tensors.{name}", "holds a value that is not finite")
  for vname, variant in im.variants.items():
    for path, layer in variant.layers.items():
      field = f"variants.{vname}.layers.{path}"
      if isinstance(layer, NormLayer):
        if np.any(im.tensors[layer.var] < 0):
          raise FieldError(f"{field}.var", "holds a negative variance")
      elif layer.scale is not None:
        top = (1 << im.tensors[layer.kernel].bits) - 1
        zero_point = im.tensors[layer.zero_point]
        if not np.all(im.tensors[layer.scale] > 0):
          raise FieldError(f"{field}.scale", "holds a scale <= 0")
        if not np.all((zero_point >= 0) & (zero_point <= top) & (np.mod(2 * zero_point, 1) == 0)):
          raise FieldError(f"{field}.zero_point", f"must be multiples of 1/2 in [0, {top}]")
