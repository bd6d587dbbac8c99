"""Exporting trained variables at several precision plans into one :class:`IntegerModel`."""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from qflax import models, quant
from qflax import nn as qnn
from qflax.export._src import structure, trace
from qflax.export._src.types import Activation, IntegerModel, LinearLayer, NormLayer, PackedCodes, Tensor, Variant


class TensorPool:
  """Content-addressed tensors: adding an array equal (dtype, shape, bytes) to one already
  held returns the existing name, so variants share identical arrays."""

  def __init__(self):
    self.tensors: dict[str, Tensor] = {}
    self._names: dict[bytes, str] = {}

  def add(self, value: Tensor) -> str:
    if isinstance(value, PackedCodes):
      key = ("u", value.bits, value.shape, value.data.tobytes())
    else:
      value = np.ascontiguousarray(np.asarray(value, np.float32))
      key = ("f", value.shape, value.tobytes())
    digest = hashlib.sha256(repr(key[:-1]).encode() + key[-1]).digest()
    if digest not in self._names:
      self._names[digest] = f"t{len(self.tensors)}"
      self.tensors[self._names[digest]] = value
    return self._names[digest]


def _layer_variables(variables, path: str) -> tuple[dict, dict]:
  params, stats = variables["params"], variables.get("batch_stats", {})
  for key in path.split("/"):
    params, stats = params[key], stats.get(key, {})
  return params, stats


def _slot_params(params, quantizer: quant.Quantizer, role: str, slot: int) -> dict[str, jax.Array]:
  return {n: params[f"{role}_{n}"][slot] for n in quantizer.param_names}


def _kernel_task(site: trace.Site, plan) -> tuple[str, int, int]:
  """``(weight quantizer, w_bits, slot)`` of a linear layer under ``plan``."""
  w_bits, _, slot = site.precision(*plan)
  return site.weight_quantizer, w_bits, slot


def quantize_kernels(tasks: dict, params) -> dict:
  """All exported kernels in one jitted program: per ``key -> (quantizer, bits, slot)`` either
  ``(codes, scale, zero_point)`` (``quantizer.integer``, what :func:`qflax.nn.export_kernel` sows) or
  the effective float kernel ``quantizer.apply(kernel, bits)`` at full precision (a normalising
  quantizer such as ``sat_fp_normalized`` changes the kernel even at 32 bits)."""
  def run(params):
    out = {}
    for (variant, path), (name, bits, slot) in tasks.items():
      layer, _ = _layer_variables({"params": params}, path)
      wq = quant.get_quantizer(name, "weight")
      w_params = _slot_params(layer, wq, "kernel", slot)
      if name != "none" and bits < quant.FULL_PRECISION:
        encoded = wq.integer(layer["kernel"], bits, w_params)
        out[variant, path] = tuple(jnp.asarray(a) for a in encoded[:3])
      else:
        out[variant, path] = wq.apply(layer["kernel"], jnp.int32(bits), w_params)
    return out
  return jax.device_get(jax.jit(run)(params))


def _linear(site: trace.Site, params, precision, kernel, pool: TensorPool) -> LinearLayer:
  w_bits, a_bits, slot = precision
  aq = quant.get_quantizer(site.act_quantizer, "activation")
  activation = Activation(aq.name, a_bits, {n: float(v) for n, v in _slot_params(params, aq, "input", slot).items()})
  bias = pool.add(params["bias"]) if site.use_bias else None
  if isinstance(kernel, tuple):
    codes, scale, zero_point = kernel
    return LinearLayer(pool.add(PackedCodes.pack(codes, w_bits)), pool.add(scale), pool.add(zero_point), bias,
                       activation)
  return LinearLayer(pool.add(kernel), None, None, bias, activation)


def _norm(params, stats, slot: int, pool: TensorPool) -> NormLayer:
  row = lambda a: np.asarray(a)[slot]
  return NormLayer(pool.add(row(params["scale"])), pool.add(row(params["bias"])),
                   pool.add(row(stats["mean"])), pool.add(row(stats["var"])))


def export_variants(sites: dict[str, trace.Site], variables, plans: Mapping[str, tuple], pool: TensorPool
                    ) -> dict[str, Variant]:
  """Every variant's layers at their precision under its plan (concrete ``(w_bits, a_bits, slots)``)."""
  tasks = {(v, path): _kernel_task(site, plan) for v, plan in plans.items()
           for path, site in sites.items() if site.kind == "linear"}
  kernels = quantize_kernels(tasks, variables["params"])
  variants = {}
  for name, plan in plans.items():
    layers = {}
    for path, site in sites.items():
      params, stats = _layer_variables(variables, path)
      precision = site.precision(*plan)
      if site.kind == "norm":
        layers[path] = _norm(params, stats, precision[2], pool)
      else:
        layers[path] = _linear(site, params, precision, kernels[name, path], pool)
    variants[name] = Variant(*plan, layers)
  return variants


def json_options(options: Mapping | None) -> dict:
  """Model options as JSON values (tuples become lists); raises ``ValueError`` if not JSON-able."""
  try:
    return json.loads(json.dumps(dict(options or {}), allow_nan=False))
  except (TypeError, ValueError) as e:
    raise ValueError(f"model_options must be JSON values (numbers, strings, lists, dicts): {e}") from None


def integer_model(model: models.Network, variables, plans: Mapping[str, qnn.PrecisionPlan], *, model_name: str,
                  num_classes: int, spec: models.QuantSpec, input_shape, model_options: Mapping | None = None
                  ) -> IntegerModel:
  """Exports ``variables`` of ``model`` at each named plan (a switchable network's bit-widths).

  Per variant and layer: the weight codes packed (several per byte for <= 4 bits) with their
  scale and zero point (``w_q = (codes - zero_point) * scale``, exactly the fake-quantized
  kernel), or the effective float32 kernel where the layer runs at full precision; the
  activation quantizer's name, bits and slot parameters; biases; and the slot of each
  BatchNorm the variant uses, unfolded. Identical arrays are stored once across variants.
  ``model`` must be ``models.get_model(model_name, num_classes, spec, **model_options)``
  (checked by module equality); ``input_shape`` excludes the batch axis.

  Example:
    >>> plans = {f"w{b}a{b}": qnn.uniform_plan(model.num_blocks, b, spec.bit_set) for b in (4, 2)}
    >>> im = integer_model(model, variables, plans, model_name="resnet20", num_classes=10, spec=spec,
    ...                    input_shape=(32, 32, 3))
  """
  if not plans:
    raise ValueError("plans must name at least one variant")
  input_shape = tuple(int(d) for d in input_shape)
  plans = {str(name): tuple(tuple(int(b) for b in np.asarray(a)) for a in plan) for name, plan in plans.items()}
  for plan in plans.values():
    qnn.make_plan(*plan, num_slots=spec.num_slots)   # concrete and valid
  lengths = {name: len(plan[0]) for name, plan in plans.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"plans must all have one length (the model's blocks), got {lengths}")
  options = json_options(model_options)
  named = structure.build_model(IntegerModel(str(model_name), options, int(num_classes), spec, (), {}, {}))
  if named != model:
    raise ValueError(f"model is not models.get_model({model_name!r}, {num_classes}, spec, **{options})")
  sites = trace.probe_named(str(model_name), options, int(num_classes), spec, input_shape,
                            next(iter(lengths.values())))
  pool = TensorPool()
  variants = export_variants(sites, flax.core.unfreeze(variables), plans, pool)
  im = IntegerModel(str(model_name), options, int(num_classes), spec, input_shape, variants, pool.tensors)
  structure.check(im)   # a consistency check of this exporter; it raises a ValueError if it fails
  return im
