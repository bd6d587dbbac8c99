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
from qflax.quant._src.uniform import mse_search

_MIN_HALF_WIDTH = 1e-6
# Smallest interval width, q - p >= MIN_WIDTH_ABS + MIN_WIDTH_REL * p: the absolute
# part matches the former ``d >= 1e-6`` floor (the scale of the smallest weights), the
# relative part keeps q - p above float32's resolution at p (ulp(p) ~ 1.2e-7 p), so
# ``p + eps > p`` and ``1 / (q - p)`` stays finite for any pruning point.
MIN_WIDTH_ABS = 1e-6
MIN_WIDTH_REL = 1e-5


def _interval(centre, half_width):
  """The constrained ``(p, q)`` and its Jacobian ``(dp/dc, dp/dd, dq/dc, dq/dd)``.

  Ties (``c = d``, the inits; ``d = 0``) count as unclamped, so the documented
  gradients hold at the initial interval.
  """
  dtype = jnp.result_type(centre, half_width)
  one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
  d_free = half_width >= 0.0
  d = jnp.where(d_free, half_width, zero)
  low, high = centre - d, centre + d
  p_free = low >= 0.0
  p = jnp.where(p_free, low, zero)
  q_min = p + (MIN_WIDTH_ABS + MIN_WIDTH_REL * p)
  q_free = high >= q_min
  q = jnp.where(q_free, high, q_min)
  dd_dd = jnp.where(d_free, one, zero)
  p_c = jnp.where(p_free, one, zero)
  p_d = -p_c * dd_dd
  q_c = jnp.where(q_free, one, (1.0 + MIN_WIDTH_REL) * p_c)
  q_d = jnp.where(q_free, dd_dd, (1.0 + MIN_WIDTH_REL) * p_d)
  return p, q, (p_c, p_d, q_c, q_d)


def qil_interval(centre: jax.Array, half_width: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The effective QIL interval ``(pruning, clipping)`` for centre ``c`` and half-width ``d``.

  ``d+ = max(d, 0)``; pruning point ``p = max(c - d+, 0)``; clipping point
  ``q = max(c + d+, p + eps(p))`` with ``eps(p) = 1e-6 + 1e-5 p``. Hence always
  ``0 <= p < q``: the interval cannot start below the data (weight magnitudes and
  post-ReLU activations are non-negative) nor collapse, and the layer does not
  freeze when ``c``, ``d`` overshoot under a large learning rate (Jung et al., QIL,
  CVPR 2019, parameterise by the unconstrained ``c - d``, ``c + d``). Where no clamp
  is active ``(p, q) = (c - d, c + d)``. Differentiable: the gradient is that of
  whichever expression is active (``p = 0`` passes nothing to ``c`` or ``d``).

  Example:
    >>> qil_interval(0.2, 0.5)                    # (0.0, 0.7): pruning point clamped to 0
  """
  return _interval(jnp.asarray(centre), jnp.asarray(half_width))[:2]


def _transform(x, pruning, clipping, signed):
  """Returns ``t`` in [-1, 1] (signed) or [0, 1], the in-interval mask, ``|x|`` and ``sign(x)``."""
  magnitude = jnp.abs(x) if signed else x
  sign = jnp.sign(x) if signed else 1.0
  inside = (magnitude >= pruning) & (magnitude <= clipping)
  t = jnp.where(magnitude < pruning, 0.0,
                jnp.where(magnitude > clipping, sign,
                          sign * (magnitude - pruning) / (clipping - pruning)))
  return t, inside, magnitude, sign


def _encode(x, centre, half_width, bits, signed):
  bits = bits_lib.safe_bits(bits)
  pruning, clipping, _ = _interval(centre, half_width)
  t = _transform(x, pruning, clipping, signed)[0]
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
  p, q, (p_c, p_d, q_c, q_d) = _interval(centre, half_width)
  _, inside, magnitude, sign = _transform(x, p, q, signed)
  width = q - p
  live = inside & ~full

  def d_t(p_k, q_k):
    # dt/dk = dt/dp dp/dk + dt/dq dq/dk with dt/dp = (m - q) / w^2, dt/dq = (p - m) / w^2,
    # regrouped so the unclamped case is exactly -sign / w (c) and sign (p + q - 2m) / w^2 (d).
    return sign * (magnitude * (p_k - q_k) + (p * q_k - q * p_k)) / width / width

  grad_x = jnp.where(full, g, jnp.where(live, g / width, 0.0))
  grad_c = jnp.where(live, g * d_t(p_c, q_c), 0.0)
  grad_d = jnp.where(live, g * d_t(p_d, q_d), 0.0)
  return (grad_x, ste.sum_to_shape(grad_c, jnp.shape(centre)),
          ste.sum_to_shape(grad_d, jnp.shape(half_width)), None)


_qil.defvjp(_qil_fwd, _qil_bwd)


def qil(x: jax.Array, centre: jax.Array, half_width: jax.Array, bits, *, signed: bool) -> jax.Array:
  """QIL interval quantizer with learnable centre ``c`` and half-width ``d``.

  Pruning point ``p`` and clipping point ``q`` from :func:`qil_interval`:
  ``(c - d, c + d)``, constrained to ``0 <= p < q``. Signed (weights):
  ``t = 0`` if ``|w| < p``; ``sign(w)`` if ``|w| > q``; else
  ``sign(w) (|w| - p) / (q - p)``; ``w_q = round(t q_W) / q_W`` with
  ``q_W = 2^(k-1) - 1`` (binary ``sign`` for ``k = 1``). Unsigned (activations):
  the same without the sign and ``q_X = 2^k - 1`` (Jung et al., CVPR 2019).

  Gradients inside the interval (straight through the rounding), where no
  constraint is active: ``dt/dx = 1/(2d)``, ``dt/dc = -sign(x)/(2d)``,
  ``dt/dd = sign(x)(c - |x|)/(2d^2)``; zero where pruned or clipped. Where a
  clamp is active, the gradient of the clamped expression: e.g. with ``p = 0``,
  ``t = sign(w) |w| / (c + d)`` and ``dt/dc = dt/dd = -sign(w) |w| / (c + d)^2``.

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


# Candidate clipping points r max|w| for the weight init, r = i / 32 (as ``uniform_layer``).
INIT_CANDIDATES = 32


def qil_init_weight(w: jax.Array, bits=32):
  """Weights: ``c - d = 0`` and the clipping point ``c + d = r max|w|`` minimising the MSE.

  ``r`` is searched on ``i / 32``, ``i = 1..32``, minimising
  ``mean(((c + d) qil(w) - w)^2)`` at ``bits`` (QIL's output is ``w`` rescaled to
  ``[-1, 1]``); ``r = 1`` (``c + d = max|w|``) at 32 bits. The abs-max clip wastes
  the low bit-widths: at 2 bits (levels ``{-q, 0, q}``) every ``|w| < max|w| / 2``
  rounds to 0, over 90 % of a trained kernel, and the layer starts binarised.
  Returns ``(c, d)``.

  Example:
    >>> c, d = qil_init_weight(kernel, bits=2)     # c + d ~ 1.2 std(kernel) for Gaussian weights
  """
  bits = bits_lib.check_bits(bits)
  top = jnp.maximum(jnp.max(jnp.abs(w)), 2.0 * _MIN_HALF_WIDTH)
  candidates = jnp.arange(1, INIT_CANDIDATES + 1, dtype=jnp.float32) / INIT_CANDIDATES * top
  # QIL's output is in [-1, 1]; with p = 0, w ~ (c + d) * output.
  best = mse_search(w, None, candidates, lambda v, clip: clip * dequantize(_encode(v, clip / 2, clip / 2, bits, True)))
  half = jnp.maximum(jnp.where(bits_lib.is_full_precision(bits), top, best) / 2.0, _MIN_HALF_WIDTH)
  return half, half


def qil_init_activation(x: jax.Array, percentile: float = 99.9):
  """Activations: ``c + d`` = the 99.9th percentile, ``c - d = 0``. Returns ``(c, d)``."""
  half = jnp.maximum(jnp.percentile(x, percentile) / 2.0, _MIN_HALF_WIDTH)
  return half, half
