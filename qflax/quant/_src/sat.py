"""SAT / AdaBits weight quantizer (the AAO default).

Jin, Yang, Liao, "Towards Efficient Training for Neural Network Quantization"
(SAT), 2019; Jin et al., "AdaBits", CVPR 2020.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qflax.quant._src import bits as bits_lib
from qflax.quant._src import ste
from qflax.quant._src.dorefa import unit_weight
from qflax.quant._src.integer import IntegerTensor, dequantize

_TINY = 1e-12


def default_fan_out(shape) -> int:
  """Fan-out of a Flax kernel: ``prod(spatial) * out`` (HWIO) or ``out`` (dense)."""
  if len(shape) < 2:
    return int(shape[-1]) if shape else 1
  return int(math.prod(shape[:-2]) * shape[-1])


def _encode(w, bits, centered, fan_out):
  bits = bits_lib.safe_bits(bits)
  n = bits_lib.num_levels(bits)
  # XLA may compute u = -1e-8 at the minimum (division by reciprocal): clip, not min.
  codes = jnp.clip(jnp.floor(n * unit_weight(w)), 0.0, n - 1.0)
  zero_point = (n - (1.0 if centered else 0.0)) / 2.0
  unit_scale = 2.0 / n
  unscaled = (codes - zero_point) * unit_scale
  rescale = 1.0 / (math.sqrt(fan_out) * jnp.maximum(jnp.std(unscaled), _TINY))
  rescale = jax.lax.stop_gradient(rescale)
  return IntegerTensor(codes.astype(jnp.int32), unit_scale * rescale, zero_point, bits), rescale


def sat_weight(w: jax.Array, bits, *, centered: bool = False, fan_out: int | None = None) -> jax.Array:
  """SAT weight quantizer with the "modified" rounding and variance rescaling.

  ``u`` as in DoReFa; ``q(u) = min(floor(2^k u), 2^k - 1) / 2^k`` (plus
  ``0.5 / 2^k`` when ``centered``); ``w_q = (2 q(u) - 1) / (sqrt(fan_out) std(2 q(u) - 1))``.
  Straight-through gradient through the rounding; the rescale factor is a
  constant in the backward pass.

  Example:
    >>> wq = sat_weight(kernel, bits=2)           # 4 levels, std 1/sqrt(fan_out)
  """
  bits = bits_lib.check_bits(bits)
  fan_out = default_fan_out(w.shape) if fan_out is None else fan_out
  encoded, rescale = _encode(w, bits, centered, fan_out)
  surrogate = (2.0 * unit_weight(w) - 1.0) * rescale
  quantized = ste.straight_through(surrogate, dequantize(encoded))
  return bits_lib.select_full_precision(bits, w, quantized)


def sat_weight_integer(w: jax.Array, bits: int, *, centered: bool = False,
                       fan_out: int | None = None) -> IntegerTensor:
  """Integer form of :func:`sat_weight`."""
  bits = bits_lib.check_integer_bits(bits)
  fan_out = default_fan_out(w.shape) if fan_out is None else fan_out
  return _encode(w, bits, centered, fan_out)[0]
