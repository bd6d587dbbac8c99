"""A float Flax model and variables that reproduce an exported variant exactly."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from qflax import models, quant
from qflax import nn as qnn
from qflax.export._src import structure
from qflax.export._src.types import IntegerModel, LinearLayer, NormLayer, PackedCodes


@dataclasses.dataclass(frozen=True)
class RebuiltSpec(models.QuantSpec):
  """The spec of a rebuilt network: no weight quantizer anywhere, the fixed first / last layers
  included (their stored kernels are already quantized, and re-quantizing is not idempotent for
  SAT, DoReFa, QIL or per-channel uniform); activation quantizers as trained; one slot."""

  def fixed_layer_settings(self, role: str = "stem"):
    settings, precision = super().fixed_layer_settings(role)
    return {**settings, "weight_quantizer": "none"}, precision


def rebuilt_spec(spec: models.QuantSpec) -> RebuiltSpec:
  """``spec`` with ``weight_quantizer="none"`` and a single slot (the variant's)."""
  return RebuiltSpec(bit_set=(quant.FULL_PRECISION,), weight_quantizer="none", act_quantizer=spec.act_quantizer,
                     signed_act_quantizer=spec.signed_act_quantizer, act_param_init=spec.act_param_init,
                     first_last=spec.first_last)


def kernel_values(im: IntegerModel, layer: LinearLayer) -> np.ndarray:
  """The layer's kernel in float32: ``(codes - zero_point) * scale`` as :func:`qflax.quant.dequantize`
  computes it (in numpy: the same two correctly rounded float32 operations, so bit-identical to the
  fake-quantized kernel), or the stored float kernel."""
  kernel = im.tensors[layer.kernel]
  if not isinstance(kernel, PackedCodes):
    return kernel
  return (kernel.unpack().astype(np.float32) - im.tensors[layer.zero_point]) * im.tensors[layer.scale]


def _insert(tree: dict, path: str, values: dict) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = values


def _linear_params(im: IntegerModel, layer: LinearLayer) -> dict:
  params = {"kernel": kernel_values(im, layer)}
  if layer.bias is not None:
    params["bias"] = jnp.asarray(im.tensors[layer.bias])
  for name, value in layer.activation.params.items():
    params[f"input_{name}"] = jnp.asarray([value], jnp.float32)
  return params


def rebuild_variables(im: IntegerModel, variant: str, skip_kernels=()) -> dict:
  """``{"params", "batch_stats"}`` of the rebuilt network (one slot per layer); kernels of the
  layers in ``skip_kernels`` are left out (the integer path never reads them)."""
  params, stats = {}, {}
  row = lambda name: jnp.asarray(im.tensors[name])[None]
  for path, layer in im.variants[variant].layers.items():
    if isinstance(layer, NormLayer):
      _insert(params, path, {"scale": row(layer.scale), "bias": row(layer.bias)})
      _insert(stats, path, {"mean": row(layer.mean), "var": row(layer.var)})
    else:
      values = _linear_params(im, layer)
      if path in skip_kernels:
        del values["kernel"]
      _insert(params, path, values)
  return {"params": params, "batch_stats": stats}


def check_variant(im: IntegerModel, variant: str) -> None:
  if variant not in im.variants:
    raise ValueError(f"variant {variant!r} is not in this integer model; allowed: {tuple(im.variants)}")


def rebuild(im: IntegerModel, variant: str):
  """``(model, variables, plan)`` whose float forward gives the variant's fake-quantized logits.

  The model is ``models.get_model`` with :func:`rebuilt_spec`: weight quantizer ``"none"``
  (the kernels are the dequantized codes), the activation quantizers and their slot
  parameters as exported, one BatchNorm / quantizer slot per layer (the variant's). The plan
  keeps the variant's bits with slot 0 everywhere.

  Example:
    >>> model, variables, plan = rebuild(im, "w4a4")
    >>> logits = model.apply(variables, x, plan, train=False)   # == the trained model's at w4a4
  """
  check_variant(im, variant)
  v = im.variants[variant]
  model = structure.build_model(im, rebuilt_spec(im.spec))
  plan = qnn.PrecisionPlan(jnp.asarray(v.w_bits, jnp.int32), jnp.asarray(v.a_bits, jnp.int32),
                           jnp.zeros(len(v.slots), jnp.int32))
  return model, rebuild_variables(im, variant), plan


def float_parameter_bytes(im: IntegerModel, variant: str) -> int:
  """Bytes the variant's tensors take as float32: kernels, biases and one BatchNorm slot
  (scale, bias, mean, var), the same tensors its integer file stores."""
  total = 0
  for layer in im.variants[variant].layers.values():
    names = tuple(layer) if isinstance(layer, NormLayer) else (layer.kernel, layer.bias)
    total += sum(4 * int(np.prod(im.tensors[n].shape)) for n in names if n is not None)
  return total
