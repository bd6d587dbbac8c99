"""The JSON manifest of an integer-model file: encoding, and validation of every field.

Decoding never trusts a value before checking it: types (``bool`` is not an integer),
finite numbers, bits in 1..8 (32 for full-precision activations), positive shapes, and a
tensor table whose offsets and lengths tile the payload exactly and agree with
``shape x bits`` -- all before one array is read from the payload.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qflax import models, quant
from qflax.export._src.types import (Activation, FieldError, IntegerModel, LinearLayer, NormLayer, PackedCodes,
                                     Variant, short_repr, tensor_info, tensor_nbytes)

DTYPES = ("float32",) + tuple(f"u{b}" for b in range(1, quant.MAX_BITS + 1))
MAX_NAME, MAX_ITEMS, MAX_DIMS, MAX_DIM = 256, 1_000_000, 8, 2**31 - 1


# ---------------------------------------------------------------------------------------------- field checks

def _fail(field, why):
  raise FieldError(field, why)


def _dict(value, field, keys=None) -> dict:
  if not isinstance(value, dict):
    _fail(field, f"expected an object, got {short_repr(value)}")
  if len(value) > MAX_ITEMS:
    _fail(field, f"has {len(value)} entries (at most {MAX_ITEMS})")
  if keys is not None and set(value) != set(keys):
    _fail(field, f"keys {short_repr(sorted(value))}, expected {sorted(keys)}")
  return value


def _list(value, field, max_len=MAX_ITEMS, min_len=0) -> list:
  if not isinstance(value, list) or not min_len <= len(value) <= max_len:
    _fail(field, f"expected a list of {min_len}..{max_len} items, got {short_repr(value)}")
  return value


def _int(value, field, lo, hi) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
    _fail(field, f"expected an integer in {lo}..{hi}, got {short_repr(value)}")
  return value


def _number(value, field) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    _fail(field, f"expected a finite number, got {short_repr(value)}")
  return float(value)


def _string(value, field, allowed=None) -> str:
  if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
    _fail(field, f"expected a string of 1..{MAX_NAME} characters, got {short_repr(value)}")
  if allowed is not None and value not in allowed:
    _fail(field, f"{value!r} is not one of {short_repr(tuple(allowed), 200)}")
  return value


def _optional_string(value, field):
  return None if value is None else _string(value, field)


def _bits(value, field, full_precision=False) -> int:
  if full_precision and value == quant.FULL_PRECISION and not isinstance(value, bool):
    return quant.FULL_PRECISION
  return _int(value, field, 1, quant.MAX_BITS)


def _json_value(value, field, depth=0):
  if depth > 8:
    _fail(field, "nests deeper than 8 levels")
  if isinstance(value, dict):
    for k, v in value.items():
      _json_value(v, f"{field}.{k}", depth + 1)
  elif isinstance(value, list):
    for i, v in enumerate(_list(value, field, 4096)):
      _json_value(v, f"{field}[{i}]", depth + 1)
  elif isinstance(value, float) and not math.isfinite(value):
    _fail(field, f"expected a finite number, got {value!r}")
  elif value is not None and not isinstance(value, (str, int, float, bool)):
    _fail(field, f"unexpected value {short_repr(value)}")
  return value


# ---------------------------------------------------------------------------------------------- sections

def decode_tensors(value, payload_length: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
  """``name -> (dtype, shape, offset, length)``; the tensors must tile the payload in offset order."""
  table = {}
  for name, entry in _dict(value, "tensors").items():
    field = f"tensors.{_string(name, 'tensors')}"
    entry = _dict(entry, field, ("dtype", "shape", "offset", "length"))
    dtype = _string(entry["dtype"], f"{field}.dtype", DTYPES)
    shape = tuple(_int(d, f"{field}.shape", 1, MAX_DIM) for d in _list(entry["shape"], f"{field}.shape", MAX_DIMS))
    offset = _int(entry["offset"], f"{field}.offset", 0, payload_length)
    length = _int(entry["length"], f"{field}.length", 0, 2**63)
    if length != tensor_nbytes(dtype, shape):
      _fail(f"{field}.length", f"{length} bytes do not match shape {list(shape)} of {dtype} "
            f"({tensor_nbytes(dtype, shape)} bytes)")
    if offset + length > payload_length:
      _fail(f"{field}.length", f"{offset} + {length} exceeds the payload ({payload_length} bytes)")
    table[name] = (dtype, shape, offset, length)
  end = 0
  for name, (_, _, offset, length) in sorted(table.items(), key=lambda kv: (kv[1][2], kv[0])):
    if offset != end:
      _fail(f"tensors.{name}.offset", f"{offset}, expected {end} (tensors must tile the payload in order)")
    end += length
  if end != payload_length:
    _fail("tensors", f"cover {end} of the {payload_length} payload bytes")
  return table


def decode_model(value) -> tuple[str, dict, int, tuple[int, ...]]:
  value = _dict(value, "model", ("name", "options", "num_classes", "input_shape"))
  name = _string(value["name"], "model.name", models.model_names())
  options = _json_value(_dict(value["options"], "model.options"), "model.options")
  num_classes = _int(value["num_classes"], "model.num_classes", 1, 2**24)
  shape = tuple(_int(d, "model.input_shape", 1, 65536) for d in _list(value["input_shape"], "model.input_shape", 4, 1))
  return name, options, num_classes, shape


def decode_spec(value) -> models.QuantSpec:
  fields = ("bit_set", "weight_quantizer", "act_quantizer", "signed_act_quantizer", "act_param_init", "first_last")
  value = _dict(value, "spec", fields)
  bit_set = tuple(_bits(b, "spec.bit_set", True) for b in _list(value["bit_set"], "spec.bit_set", 16, 1))
  init = []
  for i, pair in enumerate(_list(value["act_param_init"], "spec.act_param_init", 16)):
    name, number = _list(pair, f"spec.act_param_init[{i}]", 2, 2)
    init.append((_string(name, f"spec.act_param_init[{i}]"), _number(number, f"spec.act_param_init[{i}]")))
  kwargs = dict(
      weight_quantizer=_string(value["weight_quantizer"], "spec.weight_quantizer", quant.quantizer_names("weight")),
      act_quantizer=_string(value["act_quantizer"], "spec.act_quantizer", quant.quantizer_names("activation")),
      signed_act_quantizer=_string(value["signed_act_quantizer"], "spec.signed_act_quantizer",
                                   quant.quantizer_names("activation")),
      first_last=_string(value["first_last"], "spec.first_last", models.FIRST_LAST))
  try:
    return models.QuantSpec(bit_set=bit_set, act_param_init=tuple(init), **kwargs)
  except ValueError as e:
    _fail("spec", e)


def _decode_activation(value, field) -> Activation:
  value = _dict(value, field, ("quantizer", "bits", "params"))
  params = {_string(k, f"{field}.params"): _number(v, f"{field}.params.{k}")
            for k, v in _dict(value["params"], f"{field}.params").items()}
  return Activation(_string(value["quantizer"], f"{field}.quantizer", quant.quantizer_names("activation")),
                    _bits(value["bits"], f"{field}.bits", True), params)


def _decode_layer(value, field):
  kind = _dict(value, field).get("type")
  if kind == "norm":
    value = _dict(value, field, ("type",) + NormLayer._fields)
    return NormLayer(*(_string(value[k], f"{field}.{k}") for k in NormLayer._fields))
  if kind != "linear":
    _fail(f"{field}.type", f"expected 'linear' or 'norm', got {short_repr(kind)}")
  value = _dict(value, field, ("type",) + LinearLayer._fields)
  return LinearLayer(_string(value["kernel"], f"{field}.kernel"),
                     *(_optional_string(value[k], f"{field}.{k}") for k in ("scale", "zero_point", "bias")),
                     _decode_activation(value["activation"], f"{field}.activation"))


def decode_variant(value, field, num_slots: int) -> Variant:
  value = _dict(value, field, ("plan", "layers"))
  plan = _dict(value["plan"], f"{field}.plan", ("w_bits", "a_bits", "slots"))
  lists = [_list(plan[k], f"{field}.plan.{k}", 4096, 1) for k in ("w_bits", "a_bits", "slots")]
  if len({len(v) for v in lists}) != 1:
    _fail(f"{field}.plan", f"w_bits, a_bits and slots differ in length: {[len(v) for v in lists]}")
  w_bits = tuple(_bits(b, f"{field}.plan.w_bits", True) for b in lists[0])
  a_bits = tuple(_bits(b, f"{field}.plan.a_bits", True) for b in lists[1])
  slots = tuple(_int(s, f"{field}.plan.slots", 0, num_slots - 1) for s in lists[2])
  layers = {_string(path, f"{field}.layers"): _decode_layer(layer, f"{field}.layers.{path}")
            for path, layer in _dict(value["layers"], f"{field}.layers").items()}
  return Variant(w_bits, a_bits, slots, layers)


def decode(value, payload_length: int) -> IntegerModel:
  """A validated manifest as an :class:`IntegerModel` whose ``tensors`` still map each name to
  its ``(dtype, shape, offset, length)`` entry (nothing read from the payload yet)."""
  value = _dict(value, "manifest", ("model", "spec", "variants", "tensors"))
  table = decode_tensors(value["tensors"], payload_length)
  name, options, num_classes, input_shape = decode_model(value["model"])
  spec = decode_spec(value["spec"])
  variants = _dict(value["variants"], "variants")
  if not 1 <= len(variants) <= 256:
    _fail("variants", f"holds {len(variants)} variants (allowed 1..256)")
  variants = {_string(k, "variants"): decode_variant(v, f"variants.{k}", spec.num_slots) for k, v in variants.items()}
  return IntegerModel(name, options, num_classes, spec, input_shape, variants, table)


def read_tensor(payload, dtype: str, shape, offset: int, length: int):
  """One tensor from the payload (already checked to lie inside it)."""
  if dtype == "float32":
    return np.frombuffer(payload, "<f4", length // 4, offset).reshape(shape).astype(np.float32)
  return PackedCodes(np.frombuffer(payload, np.uint8, length, offset).copy(), tuple(shape), int(dtype[1:]))


# ---------------------------------------------------------------------------------------------- encoding

def _encode_layer(layer) -> dict:
  if isinstance(layer, NormLayer):
    return {"type": "norm", **layer._asdict()}
  act = layer.activation
  return {"type": "linear", "kernel": layer.kernel, "scale": layer.scale, "zero_point": layer.zero_point,
          "bias": layer.bias, "activation": {"quantizer": act.quantizer, "bits": int(act.bits),
                                             "params": {k: float(v) for k, v in act.params.items()}}}


def _tensor_bytes(value) -> bytes:
  return value.data.tobytes() if isinstance(value, PackedCodes) else np.asarray(value, "<f4").tobytes()


def encode(im: IntegerModel) -> tuple[dict[str, Any], bytes]:
  """``(manifest, payload)``: tensors in pool order, contiguous."""
  chunks, table, offset = [], {}, 0
  for name, value in im.tensors.items():
    data = _tensor_bytes(value)
    dtype, shape = tensor_info(value)
    table[name] = {"dtype": dtype, "shape": list(shape), "offset": offset, "length": len(data)}
    chunks.append(data)
    offset += len(data)
  spec = im.spec
  manifest = {
      "model": {"name": im.model_name, "options": dict(im.model_options), "num_classes": im.num_classes,
                "input_shape": list(im.input_shape)},
      "spec": {"bit_set": list(spec.bit_set), "weight_quantizer": spec.weight_quantizer,
               "act_quantizer": spec.act_quantizer, "signed_act_quantizer": spec.signed_act_quantizer,
               "act_param_init": [[k, float(v)] for k, v in spec.act_param_init], "first_last": spec.first_last},
      "variants": {name: {"plan": {"w_bits": list(v.w_bits), "a_bits": list(v.a_bits), "slots": list(v.slots)},
                          "layers": {p: _encode_layer(layer) for p, layer in v.layers.items()}}
                   for name, v in im.variants.items()},
      "tensors": table}
  return manifest, b"".join(chunks)
