"""QIL learnable-interval quantizers (the QKD quantizer).

Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization
Intervals with Task Loss" (QIL), CVPR 2019; used by Kim et al., "QKD", 2019.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qflax.quant._src import bits as bits_lib
from qflax.quant._src import ste
from qflax.quant._src.integer import IntegerTensor, dequantize

_MIN_HALF_WIDTH = 1e-6


def _transform(x, centre, half_width, signed):
  """Returns ``t`` in [-1, 1] (signed) or [0, 1], and the in-interval mask."""
  d = jnp.maximum(half_width, _MIN_HALF_WIDTH)
  magnitude = jnp.abs(x) if signed else x
  sign = jnp.sign(x) if signed else 1.0
  inside = (magnitude >= centre - d) & (magnitude <= centre + d)
  t = jnp.where(magnitude < centre - d, 0.0,
                jnp.where(magnitude > centre + d, sign,
                          sign * (magnitude - (centre - d)) / (2.0 * d)))
  return t, inside, d, magnitude, sign


def _encode(x, centre, half_width, bits, signed):
  bits = bits_lib.safe_bits(bits)
  t = _transform(x, centre, half_width, signed)[0]
  n = bits_lib.num_levels(bits)
  if not signed:
    top = n - 1.0
    return IntegerTensor(jnp.round(t * top).astype(jnp.int32), 1.0 / top, jnp.float32(0.0), bits)
  # Signed: q_W = 2^(k-1) - 1 gives 2^k - 1 symmetric levels; for k = 1 (q_W = 0)
  # the quantizer is binary, sign(t) with sign(0) = +1.
  q_w = n / 2.0 - 1.0
  binary = bits == 1
  q_safe = jnp.where(binary, 1.0, q_w)
  codes = jnp.where(binary, (t >= 0.0).astype(jnp.float32), jnp.round(t * q_safe) + q_safe)
  zero_point = jnp.where(binary, 0.5, q_safe)
  scale = jnp.where(binary, 2.0, 1.0 / q_safe)
  return IntegerTensor(codes.astype(jnp.int32), scale, zero_point, bits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _qil(x, centre, half_width, bits, signed):
  return bits_lib.select_full_precision(
      bits, x, dequantize(_encode(x, centre, half_width, bits, signed)))


def _qil_fwd(x, centre, half_width, bits, signed):
  return _qil(x, centre, half_width, bits, signed), (x, centre, half_width, bits)


def _qil_bwd(signed, res, g):
  x, centre, half_width, bits = res
  full = bits_lib.is_full_precision(bits)
  _, inside, d, magnitude, sign = _transform(x, centre, half_width, signed)
  g_in = jnp.where(inside & ~full, g, 0.0)
  grad_x = jnp.where(full, g, g_in / (2.0 * d))
  grad_c = -g_in * sign / (2.0 * d)
  grad_d = g_in * sign * (centre - magnitude) / (2.0 * d * d)
  return (grad_x, ste.sum_to_shape(grad_c, jnp.shape(centre)),
          ste.sum_to_shape(grad_d, jnp.shape(half_width)), None)


_qil.defvjp(_qil_fwd, _qil_bwd)


def qil(x: jax.Array, centre: jax.Array, half_width: jax.Array, bits, *, signed: bool) -> jax.Array:
  """QIL interval quantizer with learnable centre ``c`` and half-width ``d``.

  Pruning point ``c - d``, clipping point ``c + d``. Signed (weights):
  ``t = 0`` if ``|w| < c - d``; ``sign(w)`` if ``|w| > c + d``; else
  ``sign(w) (|w| - (c - d)) / (2d)``; ``w_q = round(t q) / q`` with
  ``q = 2^(k-1) - 1`` (binary ``sign`` for ``k = 1``). Unsigned (activations):
  the same without the sign and ``q = 2^k - 1``.

  Gradients inside the interval (straight through the rounding):
  ``dt/dx = 1/(2d)``, ``dt/dc = -sign(x)/(2d)``,
  ``dt/dd = sign(x)(c - |x|)/(2d^2)``; zero where pruned or clipped.

  Example:
    >>> c, d = qil_init_weight(w)
    >>> wq = qil(w, c, d, bits=3, signed=True)
  """
  dtype = x.dtype
  return _qil(x, jnp.asarray(centre, dtype), jnp.asarray(half_width, dtype),
              bits_lib.check_bits(bits), signed)


def qil_integer(x, centre, half_width, bits: int, *, signed: bool) -> IntegerTensor:
  """Integer form of :func:`qil`."""
  dtype = x.dtype
  return _encode(x, jnp.asarray(centre, dtype), jnp.asarray(half_width, dtype),
                 bits_lib.check_integer_bits(bits), signed)


def qil_init_weight(w: jax.Array):
  """Weights: ``c + d = max|w|``, ``c - d = 0``. Returns ``(c, d)``."""
  half = jnp.maximum(jnp.max(jnp.abs(w)) / 2.0, _MIN_HALF_WIDTH)
  return half, half


def qil_init_activation(x: jax.Array, percentile: float = 99.9):
  """Activations: ``c + d`` = the 99.9th percentile, ``c - d = 0``. Returns ``(c, d)``."""
  half = jnp.maximum(jnp.percentile(x, percentile) / 2.0, _MIN_HALF_WIDTH)
  return half, half
