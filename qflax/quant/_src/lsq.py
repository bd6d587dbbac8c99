"""Learned step size quantization (LSQ).

Esser et al., "Learned Step Size Quantization", ICLR 2020.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qflax.quant._src import bits as bits_lib
from qflax.quant._src import ste
from qflax.quant._src.integer import IntegerTensor, dequantize

_MIN_STEP = 1e-8


def lsq_range(bits, signed: bool):
  """``(Q_N, Q_P)``: ``(2^(k-1), 2^(k-1) - 1)`` signed, ``(0, 2^k - 1)`` unsigned."""
  n = bits_lib.num_levels(bits)
  if signed:
    return n / 2.0, n / 2.0 - 1.0
  return jnp.zeros_like(n), n - 1.0


def _encode(v, step, bits, signed):
  bits = bits_lib.safe_bits(bits)
  q_n, q_p = lsq_range(bits, signed)
  step = jnp.maximum(step, _MIN_STEP)
  codes = jnp.clip(jnp.round(v / step), -q_n, q_p) + q_n
  return IntegerTensor(codes.astype(jnp.int32), step, q_n, bits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lsq(v, step, bits, signed, numel):
  return bits_lib.select_full_precision(bits, v, dequantize(_encode(v, step, bits, signed)))


def _lsq_fwd(v, step, bits, signed, numel):
  return _lsq(v, step, bits, signed, numel), (v, step, bits)


def _lsq_bwd(signed, numel, res, g):
  v, step, bits = res
  full = bits_lib.is_full_precision(bits)
  q_n, q_p = lsq_range(bits_lib.safe_bits(bits), signed)
  r = v / jnp.maximum(step, _MIN_STEP)
  below, above = r <= -q_n, r >= q_p
  grad_v = jnp.where(full | ~(below | above), g, 0.0)
  d_step = jnp.where(below, -q_n, jnp.where(above, q_p, jnp.round(r) - r))
  grad_scale = jax.lax.rsqrt(numel * jnp.maximum(q_p, 1.0))
  grad_step = jnp.where(full, 0.0, g * d_step * grad_scale)
  return grad_v, ste.sum_to_shape(grad_step, jnp.shape(step)), None


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq(v: jax.Array, step: jax.Array, bits, *, signed: bool, numel: int | None = None) -> jax.Array:
  """LSQ: ``v_q = s clip(round(v / s), -Q_N, Q_P)`` with a learnable step ``s``.

  Gradients: ``d v_q / d v = 1`` on ``-Q_N < v/s < Q_P`` else 0;
  ``d v_q / d s = g * (round(v/s) - v/s)`` inside, ``-g Q_N`` below, ``g Q_P``
  above, with the gradient scale ``g = 1 / sqrt(numel * Q_P)``. ``numel``
  defaults to the number of elements per step value (``v.size / s.size``); pass
  the features per example for activations. For 1-bit signed LSQ
  (``Q_P = 0``) the gradient scale uses ``Q_P = 1``.

  Example:
    >>> s = lsq_init_step(w, 4, signed=True)
    >>> wq = lsq(w, s, 4, signed=True)
  """
  step = jnp.asarray(step, v.dtype)
  if numel is None:
    numel = max(v.size // max(step.size, 1), 1)
  return _lsq(v, step, bits_lib.check_bits(bits), signed, int(numel))


def lsq_integer(v: jax.Array, step: jax.Array, bits: int, *, signed: bool) -> IntegerTensor:
  """Integer form of :func:`lsq`: codes ``clip(round(v/s), -Q_N, Q_P) + Q_N``."""
  return _encode(v, jnp.asarray(step, v.dtype), bits_lib.check_integer_bits(bits), signed)


def lsq_init_step(v: jax.Array, bits, *, signed: bool, axis=None) -> jax.Array:
  """LSQ's initial step ``2 mean|v| / sqrt(Q_P)`` (``Q_P`` at least 1)."""
  _, q_p = lsq_range(bits_lib.safe_bits(bits_lib.check_bits(bits)), signed)
  mean = jnp.mean(jnp.abs(v), axis=axis, keepdims=axis is not None)
  return jnp.maximum(2.0 * mean / jnp.sqrt(jnp.maximum(q_p, 1.0)), _MIN_STEP)
