"""PACT activation quantizer with a learnable clip value.

Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural
Networks", 2018.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from qflax.quant._src import bits as bits_lib
from qflax.quant._src import ste
from qflax.quant._src.integer import IntegerTensor, dequantize

_MIN_ALPHA = 1e-6


def _encode(x, alpha, bits):
  bits = bits_lib.safe_bits(bits)
  top = bits_lib.num_levels(bits) - 1.0
  alpha = jnp.maximum(alpha, _MIN_ALPHA)
  codes = jnp.round(jnp.clip(x, 0.0, alpha) / alpha * top)
  return IntegerTensor(codes.astype(jnp.int32), alpha / top, jnp.float32(0.0), bits)


@jax.custom_vjp
def _pact(x, alpha, bits):
  return bits_lib.select_full_precision(bits, x, dequantize(_encode(x, alpha, bits)))


def _pact_fwd(x, alpha, bits):
  return _pact(x, alpha, bits), (x, alpha, bits)


def _pact_bwd(res, g):
  x, alpha, bits = res
  full = bits_lib.is_full_precision(bits)
  grad_x = jnp.where(full | ((x >= 0.0) & (x < alpha)), g, 0.0)
  grad_alpha = jnp.where(full | (x < alpha), 0.0, g)
  return grad_x, ste.sum_to_shape(grad_alpha, jnp.shape(alpha)), None


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact(x: jax.Array, alpha: jax.Array, bits) -> jax.Array:
  """PACT: ``a_q = alpha Q_k(clip(x, 0, alpha) / alpha)``.

  Gradients (straight through the rounding, as in PACT):
  ``d a_q / d x = 1`` on ``[0, alpha)``, else 0;
  ``d a_q / d alpha = 1`` where ``x >= alpha``, else 0.
  ``alpha`` broadcasts against ``x`` (a scalar per layer and bit-width slot).

  Example:
    >>> aq = pact(x, alpha=jnp.float32(8.0), bits=4)
  """
  return _pact(x, jnp.asarray(alpha, x.dtype), bits_lib.check_bits(bits))


def pact_integer(x: jax.Array, alpha: jax.Array, bits: int) -> IntegerTensor:
  """Integer form of :func:`pact`: codes in ``[0, 2^k - 1]``, scale ``alpha / (2^k - 1)``."""
  return _encode(x, jnp.asarray(alpha, x.dtype), bits_lib.check_integer_bits(bits))
