"""DoReFa weight and clamp-activation quantizers.

Zhou et al., "DoReFa-Net", 2016; used by Zhuang et al. (TPAMI 2021) and, with the
mean-magnitude scale, by Any-Precision DNNs (Yu et al., 2021).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qflax.quant._src import bits as bits_lib
from qflax.quant._src import ste
from qflax.quant._src.integer import IntegerTensor, dequantize

_TINY = 1e-12


def unit_weight(w: jax.Array) -> jax.Array:
  """``u = tanh(w) / (2 max|tanh(w)|) + 1/2``, mapping weights into [0, 1].

  Evaluated as ``(tanh(w) + m) / (2m)``, ``m = max|tanh(w)|``: with no product
  feeding an addition, jitted code (where XLA turns the division into a
  reciprocal multiply and fuses multiply-adds) gives the same bits as op-by-op
  code, so integer codes match the fake-quantized weights, and ``u`` is exactly
  0 and 1 at the extremes.
  """
  t = jnp.tanh(w)
  m = jnp.maximum(jnp.max(jnp.abs(t)), _TINY)
  return (t + m) / (2.0 * m)


def _encode_weight(w, bits, scale_by_mean):
  bits = bits_lib.safe_bits(bits)
  top = bits_lib.num_levels(bits) - 1.0
  codes = jnp.clip(jnp.round(unit_weight(w) * top), 0.0, top)
  scale = 2.0 / top
  if scale_by_mean:
    scale = scale * jax.lax.stop_gradient(jnp.mean(jnp.abs(w)))
  return IntegerTensor(codes.astype(jnp.int32), scale, top / 2.0, bits)


def dorefa_weight(w: jax.Array, bits, *, scale_by_mean: bool = False) -> jax.Array:
  """DoReFa weight quantizer, one scale per tensor.

  ``w_q = 2 Q_k(u) - 1`` with ``u = tanh(w) / (2 max|tanh w|) + 1/2`` and
  ``Q_k(u) = round((2^k - 1) u) / (2^k - 1)``; the gradient passes straight
  through the rounding (``d w_q / d w = 2 du/dw``). ``scale_by_mean=True`` is
  the Any-Precision variant ``E * w_q`` with ``E = mean|w|`` (no gradient
  through ``E``).

  Example:
    >>> wq = dorefa_weight(kernel, bits=4)        # 16 levels in [-1, 1]
  """
  bits = bits_lib.check_bits(bits)
  surrogate = 2.0 * unit_weight(w) - 1.0
  if scale_by_mean:
    surrogate = surrogate * jax.lax.stop_gradient(jnp.mean(jnp.abs(w)))
  quantized = ste.straight_through(surrogate, dequantize(_encode_weight(w, bits, scale_by_mean)))
  return bits_lib.select_full_precision(bits, w, quantized)


def dorefa_weight_integer(w: jax.Array, bits: int, *, scale_by_mean: bool = False) -> IntegerTensor:
  """Integer form of :func:`dorefa_weight`: codes ``round((2^k - 1) u)``."""
  bits = bits_lib.check_integer_bits(bits)
  return _encode_weight(w, bits, scale_by_mean)


def _encode_clamp(x, bits):
  bits = bits_lib.safe_bits(bits)
  top = bits_lib.num_levels(bits) - 1.0
  codes = jnp.round(jnp.clip(x, 0.0, 1.0) * top)
  return IntegerTensor(codes.astype(jnp.int32), 1.0 / top, jnp.float32(0.0), bits)


def clamp_activation(x: jax.Array, bits) -> jax.Array:
  """DoReFa activation: ``a_q = Q_k(clip(x, 0, 1))``; it replaces the ReLU.

  Gradient: 1 on [0, 1], 0 outside (straight through the rounding).

  Example:
    >>> aq = clamp_activation(x, bits=2)          # values {0, 1/3, 2/3, 1}
  """
  bits = bits_lib.check_bits(bits)
  surrogate = ste.masked_identity(x, (x >= 0.0) & (x <= 1.0))
  quantized = ste.straight_through(surrogate, dequantize(_encode_clamp(x, bits)))
  return bits_lib.select_full_precision(bits, x, quantized)


def clamp_activation_integer(x: jax.Array, bits: int) -> IntegerTensor:
  """Integer form of :func:`clamp_activation`."""
  return _encode_clamp(x, bits_lib.check_integer_bits(bits))
