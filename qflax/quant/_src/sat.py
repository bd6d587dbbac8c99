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


def _rescale(unscaled, fan_out):
  """``1 / (sqrt(fan_out) std(unscaled))``, a constant in the backward pass."""
  return jax.lax.stop_gradient(1.0 / (math.sqrt(fan_out) * jnp.maximum(jnp.std(unscaled), _TINY)))


_CHUNK = 1 << 11
_MAX_SIZE = 1 << 26


def _exact_sum(values):
  """``sum(values)`` of int32 values with ``|v| < 2^19``, as float32 with a single rounding.

  Integer partial sums are exact, so the result does not depend on the reduction
  order XLA picks (float reductions such as ``jnp.std`` differ in the last bit
  between eager and jitted code, which would break the integer form's bit-exactness).
  """
  values = values.reshape(-1)
  chunk = max(min(_CHUNK, values.size), 1)
  values = jnp.pad(values, (0, -values.size % chunk)).reshape(-1, chunk)
  partial = jnp.sum(values, axis=1)                          # |.| < 2^30
  high, low = partial >> 15, partial & 0x7FFF                # partial = high 2^15 + low; sums < 2^31 for <= 2^26 values
  return jnp.sum(high).astype(jnp.float32) * 32768.0 + jnp.sum(low).astype(jnp.float32)


def _code_rescale(codes, offset, levels, fan_out):
  """``1 / (sqrt(fan_out) std(e / 2^k))`` for the integers ``e = 2 codes - offset``, bit-reproducibly.

  ``(codes - zero_point) 2 / 2^k = e / 2^k``. With ``d = e - round(mean e)``
  (exact integers), ``a = sqrt(mean d^2)`` and ``m = |mean d| <= 1/2``:
  ``var e = (a - m)(a + m)``. The sums are exact, and no product feeds an
  addition, so XLA's reassociation and fused multiply-adds (which it applies in
  jitted code but not op by op) cannot change a bit.
  """
  size = codes.size
  if size > _MAX_SIZE:
    raise ValueError(f"SAT weights with {size} > 2^26 entries are not supported")
  inv_size = 1.0 / size
  e = 2 * codes - offset                                    # |e| <= 256
  shift = jnp.round(_exact_sum(e) * inv_size).astype(jnp.int32)
  d = e - shift                                             # |d| <= 512
  mean = jnp.abs(_exact_sum(d) * inv_size)
  root_mean_square = jnp.sqrt(_exact_sum(d * d) * inv_size)
  std = jnp.sqrt(jnp.maximum((root_mean_square - mean) * (root_mean_square + mean), 0.0)) / levels
  return jax.lax.stop_gradient(1.0 / (math.sqrt(fan_out) * jnp.maximum(std, _TINY)))


def _encode(w, bits, centered, fan_out):
  bits = bits_lib.safe_bits(bits)
  n = bits_lib.num_levels(bits)
  # u is in [0, 1] (1 at the maximum, where floor gives 2^k): clip, not min.
  codes = jnp.clip(jnp.floor(n * unit_weight(w)), 0.0, n - 1.0).astype(jnp.int32)
  zero_point = (n - (1.0 if centered else 0.0)) / 2.0
  unit_scale = 2.0 / n
  offset = jnp.left_shift(jnp.int32(1), bits) - (1 if centered else 0)   # 2 zero_point
  rescale = _code_rescale(codes, offset, n, fan_out)
  return IntegerTensor(codes, unit_scale * rescale, zero_point, bits), rescale


def sat_weight(w: jax.Array, bits, *, centered: bool = False, fan_out: int | None = None,
               normalize_full_precision: bool = False) -> jax.Array:
  """SAT weight quantizer with the "modified" rounding and variance rescaling.

  ``u = tanh(w) / (2 max|tanh w|) + 1/2`` as in DoReFa;
  ``q(u) = min(floor(2^k u), 2^k - 1) / 2^k`` (plus ``0.5 / 2^k`` when
  ``centered``); ``w_q = (2 q(u) - 1) / (sqrt(fan_out) std(2 q(u) - 1))``.
  Straight-through gradient through the rounding (that of the surrogate
  ``(2u - 1) / (sqrt(fan_out) std(2 q(u) - 1))``); the rescale factor is a
  constant in the backward pass.

  At ``bits >= 32`` the raw weights are returned, unless
  ``normalize_full_precision`` (AdaBits' full-precision member, Jin et al.,
  CVPR 2020): then ``w_fp = (2u - 1) / (sqrt(fan_out) std(2u - 1))``, the same
  tanh normalisation and rescale (no gradient through the rescale), so
  ``std(w_fp) = 1 / sqrt(fan_out)`` at every bit-width.

  Example:
    >>> wq = sat_weight(kernel, bits=2)           # 4 levels, std 1/sqrt(fan_out)
    >>> wf = sat_weight(kernel, 32, normalize_full_precision=True)   # std 1/sqrt(fan_out), not quantized
  """
  bits = bits_lib.check_bits(bits)
  fan_out = default_fan_out(w.shape) if fan_out is None else fan_out
  encoded, rescale = _encode(w, bits, centered, fan_out)
  unit = 2.0 * unit_weight(w) - 1.0
  quantized = ste.straight_through(unit * rescale, dequantize(encoded))
  full_precision = unit * _rescale(unit, fan_out) if normalize_full_precision else w
  return bits_lib.select_full_precision(bits, full_precision, quantized)


def sat_weight_integer(w: jax.Array, bits: int, *, centered: bool = False, fan_out: int | None = None,
                       normalize_full_precision: bool = False) -> IntegerTensor:
  """Integer form of :func:`sat_weight` (``normalize_full_precision`` only changes ``bits >= 32``,
  which has no integer form and raises)."""
  del normalize_full_precision
  bits = bits_lib.check_integer_bits(bits)
  fan_out = default_fan_out(w.shape) if fan_out is None else fan_out
  return _encode(w, bits, centered, fan_out)[0]
