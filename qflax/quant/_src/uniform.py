"""Uniform symmetric / asymmetric quantizers and their calibration.

Used for post-training quantization, fixed 8-bit first and last layers, and
export (Jacob et al., CVPR 2018; Krishnamoorthi, 2018).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qflax.quant._src import bits as bits_lib
from qflax.quant._src import ste
from qflax.quant._src.integer import IntegerTensor, dequantize

_MIN_SCALE = 1e-12
SYMMETRIC_METHODS = ("absmax", "percentile", "mse")
ASYMMETRIC_METHODS = ("minmax", "percentile", "mse")


def _symmetric_range(bits):
  half = bits_lib.num_levels(bits) / 2.0
  return half, half - 1.0


def _encode_symmetric(x, bits, scale):
  bits = bits_lib.safe_bits(bits)
  q_n, q_p = _symmetric_range(bits)
  scale = jnp.maximum(scale, _MIN_SCALE)
  codes = jnp.clip(jnp.round(x / scale), -q_n, q_p) + q_n
  return IntegerTensor(codes.astype(jnp.int32), scale, q_n, bits)


def _encode_asymmetric(x, bits, scale, zero_point):
  bits = bits_lib.safe_bits(bits)
  top = bits_lib.num_levels(bits) - 1.0
  scale = jnp.maximum(scale, _MIN_SCALE)
  zero_point = jnp.round(zero_point)
  codes = jnp.clip(jnp.round(x / scale) + zero_point, 0.0, top)
  return IntegerTensor(codes.astype(jnp.int32), scale, zero_point, bits)


def _with_range_mask(x, bits, encoded):
  lo = (0.0 - encoded.zero_point) * encoded.scale
  hi = (bits_lib.num_levels(encoded.bits) - 1.0 - encoded.zero_point) * encoded.scale
  surrogate = ste.masked_identity(x, (x >= lo) & (x <= hi))
  return bits_lib.select_full_precision(
      bits, x, ste.straight_through(surrogate, dequantize(encoded)))


def uniform_symmetric(x: jax.Array, bits, scale: jax.Array) -> jax.Array:
  """``x_q = s clip(round(x / s), -2^(k-1), 2^(k-1) - 1)``.

  ``scale`` broadcasts against ``x`` (per tensor, or per channel with
  ``keepdims`` shapes from :func:`calibrate_symmetric`). Straight-through
  gradient inside the representable range, 0 outside.

  Example:
    >>> s = calibrate_symmetric(w, 8, channel_axis=-1)
    >>> wq = uniform_symmetric(w, 8, s)
  """
  bits = bits_lib.check_bits(bits)
  return _with_range_mask(x, bits, _encode_symmetric(x, bits, jnp.asarray(scale, x.dtype)))


def uniform_asymmetric(x: jax.Array, bits, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
  """``x_q = s (clip(round(x / s) + z, 0, 2^k - 1) - z)`` with integer ``z``."""
  bits = bits_lib.check_bits(bits)
  encoded = _encode_asymmetric(x, bits, jnp.asarray(scale, x.dtype), jnp.asarray(zero_point, x.dtype))
  return _with_range_mask(x, bits, encoded)


def uniform_symmetric_integer(x, bits: int, scale) -> IntegerTensor:
  """Integer form of :func:`uniform_symmetric` (codes offset by ``2^(k-1)``)."""
  return _encode_symmetric(x, bits_lib.check_integer_bits(bits), jnp.asarray(scale, x.dtype))


def uniform_asymmetric_integer(x, bits: int, scale, zero_point) -> IntegerTensor:
  """Integer form of :func:`uniform_asymmetric`."""
  return _encode_asymmetric(x, bits_lib.check_integer_bits(bits), jnp.asarray(scale, x.dtype),
                            jnp.asarray(zero_point, x.dtype))


def _unsigned_clip(x, clip):
  if clip is None:
    clip = jax.lax.stop_gradient(jnp.max(x))
  return jnp.maximum(jnp.asarray(clip, x.dtype), 0.0)


def _encode_unsigned(x, bits, clip):
  bits = bits_lib.safe_bits(bits)
  top = bits_lib.num_levels(bits) - 1.0
  scale = jnp.maximum(clip / top, _MIN_SCALE)
  codes = jnp.clip(jnp.round(x / scale), 0.0, top)
  return IntegerTensor(codes.astype(jnp.int32), scale, jnp.zeros_like(scale), bits)


def uniform_unsigned(x: jax.Array, bits, clip: jax.Array | None = None) -> jax.Array:
  """Unsigned uniform quantizer: ``x_q = s clip(round(x / s), 0, 2^k - 1)``, ``s = c / (2^k - 1)``.

  Codes ``0..2^k - 1`` with zero point 0, for non-negative inputs (after a ReLU
  or average pooling); negative values clip to 0. The clip ``c`` defaults to
  ``max(x)`` of this tensor (per batch, no gradient through it); pass it
  explicitly (broadcasting against ``x``) for a fixed or per-channel range.
  All ``2^k`` codes span ``[0, c]``, where the signed :func:`uniform_symmetric`
  would leave its negative half unused (Jacob et al., CVPR 2018).
  Straight-through gradient on ``[0, c]``, 0 outside.

  Example:
    >>> a = jax.nn.relu(x)
    >>> aq = uniform_unsigned(a, 8)               # 256 levels on [0, max(a)]
  """
  bits = bits_lib.check_bits(bits)
  clip = _unsigned_clip(x, clip)
  surrogate = ste.masked_identity(x, (x >= 0.0) & (x <= clip))
  quantized = ste.straight_through(surrogate, dequantize(_encode_unsigned(x, bits, clip)))
  return bits_lib.select_full_precision(bits, x, quantized)


def uniform_unsigned_integer(x: jax.Array, bits: int, clip: jax.Array | None = None) -> IntegerTensor:
  """Integer form of :func:`uniform_unsigned`: codes ``0..2^k - 1``, zero point 0, scale ``c / (2^k - 1)``."""
  return _encode_unsigned(x, bits_lib.check_integer_bits(bits), _unsigned_clip(x, clip))


def _reduce_axes(x, channel_axis):
  if channel_axis is None:
    return None
  channel_axis = channel_axis % x.ndim
  return tuple(i for i in range(x.ndim) if i != channel_axis)


def _check_method(method, allowed):
  if method not in allowed:
    raise ValueError(f"method={method!r} is not a calibration method here; allowed: {allowed}")


def mse_search(x, axes, candidates, quantize):
  """Picks, per scale group, the candidate (leading axis) with the lowest ``mean((quantize(x, c) - x)^2)``."""
  def group_mse(candidate):
    return jnp.mean((quantize(x, candidate) - x) ** 2, axis=axes, keepdims=axes is not None)
  errors = jax.lax.map(group_mse, candidates)
  best = jnp.argmin(errors, axis=0)
  return jnp.take_along_axis(candidates, best[None], axis=0)[0]


def calibrate_symmetric(x: jax.Array, bits, *, method: str = "absmax", channel_axis: int | None = None,
                        percentile: float = 99.99, num_candidates: int = 64) -> jax.Array:
  """Scale for :func:`uniform_symmetric` from a calibration tensor.

  ``absmax``: ``s = max|x| / (2^(k-1) - 1)``; ``percentile``: the same with the
  ``percentile`` of ``|x|``; ``mse``: the clip ``r max|x|``, ``r`` on a grid of
  ``num_candidates`` ratios in (0, 1], minimising ``mean((x_q - x)^2)``.
  ``channel_axis=None`` gives one scale per tensor, else one per channel (with
  ``keepdims`` so it broadcasts against ``x``).
  """
  _check_method(method, SYMMETRIC_METHODS)
  bits = bits_lib.check_bits(bits)
  axes = _reduce_axes(x, channel_axis)
  keep = axes is not None
  q_p = jnp.maximum(_symmetric_range(bits_lib.safe_bits(bits))[1], 1.0)
  magnitude = jnp.abs(x)
  if method == "percentile":
    clip = jnp.percentile(magnitude, percentile, axis=axes, keepdims=keep)
  else:
    clip = jnp.max(magnitude, axis=axes, keepdims=keep)
  scale = jnp.maximum(clip / q_p, _MIN_SCALE)
  if method == "mse":
    ratios = jnp.arange(1, num_candidates + 1, dtype=x.dtype) / num_candidates
    candidates = ratios.reshape((-1,) + (1,) * jnp.ndim(scale)) * scale
    scale = mse_search(x, axes, candidates, lambda v, s: dequantize(_encode_symmetric(v, bits, s)))
  return scale


def calibrate_asymmetric(x: jax.Array, bits, *, method: str = "minmax", channel_axis: int | None = None,
                         percentile: float = 99.99, num_candidates: int = 64):
  """``(scale, zero_point)`` for :func:`uniform_asymmetric` from a calibration tensor.

  ``minmax``: the range ``[min(x, 0), max(x, 0)]`` in ``2^k - 1`` steps;
  ``percentile``: the range from the ``100 - p`` and ``p`` percentiles;
  ``mse``: the min-max range shrunk by ``r`` on a grid, minimising the MSE.
  """
  _check_method(method, ASYMMETRIC_METHODS)
  bits = bits_lib.check_bits(bits)
  axes = _reduce_axes(x, channel_axis)
  keep = axes is not None
  top = bits_lib.num_levels(bits) - 1.0
  if method == "percentile":
    lo = jnp.percentile(x, 100.0 - percentile, axis=axes, keepdims=keep)
    hi = jnp.percentile(x, percentile, axis=axes, keepdims=keep)
  else:
    lo = jnp.min(x, axis=axes, keepdims=keep)
    hi = jnp.max(x, axis=axes, keepdims=keep)
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)

  def params_for(ratio):
    scale = jnp.maximum((hi - lo) * ratio / top, _MIN_SCALE)
    return scale, jnp.round(-lo * ratio / scale)

  if method != "mse":
    return params_for(1.0)
  ratios = jnp.arange(1, num_candidates + 1, dtype=x.dtype) / num_candidates
  candidates = ratios.reshape((-1,) + (1,) * jnp.ndim(lo)) * jnp.ones_like(lo)
  best_ratio = mse_search(
      x, axes, candidates, lambda v, r: dequantize(_encode_asymmetric(v, bits, *params_for(r))))
  return params_for(best_ratio)
