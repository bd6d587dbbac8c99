"""Mid-tread quantizer with ``2^R`` levels (transform quantization).

Young et al., "Transform Quantization for CNN Compression", TPAMI 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qflax.quant._src import bits as bits_lib
from qflax.quant._src import ste
from qflax.quant._src.integer import IntegerTensor, dequantize


def _encode(t, rate, step):
  rate = bits_lib.safe_bits(rate)
  half = bits_lib.num_levels(rate) / 2.0
  zero_rate = rate == 0
  codes = jnp.clip(jnp.round(t / step), -half, half - 1.0) + half
  codes = jnp.where(zero_rate, 0.0, codes)
  return IntegerTensor(codes.astype(jnp.int32), step, jnp.where(zero_rate, 0.0, half), rate)


def midtread(t: jax.Array, rate, step: jax.Array) -> jax.Array:
  """``q(t, R, D) = 0`` if ``R = 0``, else ``D clip(round(t/D), -2^(R-1), 2^(R-1) - 1)``.

  ``rate`` may be 0..8 (or ``>= 32``, identity). Pure straight-through gradient
  (identity, no clip mask), as used for fine-tuning.

  Example:
    >>> tq = midtread(coeffs, rate=3, step=jnp.float32(0.05))
  """
  rate = bits_lib.check_bits(rate, "rate", min_bits=0)
  step = jnp.maximum(jnp.asarray(step, t.dtype), 1e-12)
  return bits_lib.select_full_precision(rate, t, ste.straight_through(t, dequantize(_encode(t, rate, step))))


def midtread_integer(t: jax.Array, rate: int, step) -> IntegerTensor:
  """Integer form of :func:`midtread` (codes offset by ``2^(R-1)``; all zero for ``R = 0``)."""
  rate = bits_lib.check_integer_bits(rate, "rate", min_bits=0)
  return _encode(t, rate, jnp.maximum(jnp.asarray(step, t.dtype), 1e-12))
