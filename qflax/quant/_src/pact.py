"""PACT activation quantizer with a learnable clip value.

Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural
Networks", 2018; the clip gradient of Jin et al., "AdaBits: Neural Network
Quantization with Adaptive Bit-Widths", CVPR 2020.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qflax.quant._src import bits as bits_lib
from qflax.quant._src import ste
from qflax.quant._src.integer import IntegerTensor, dequantize
from qflax.quant._src.uniform import mse_search

_MIN_ALPHA = 1e-6
GRADIENTS = ("pact", "adabits")


def _encode(x, alpha, bits):
  bits = bits_lib.safe_bits(bits)
  top = bits_lib.num_levels(bits) - 1.0
  alpha = jnp.maximum(alpha, _MIN_ALPHA)
  codes = jnp.round(jnp.clip(x, 0.0, alpha) / alpha * top)
  return IntegerTensor(codes.astype(jnp.int32), alpha / top, jnp.float32(0.0), bits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pact(x, alpha, bits, gradient):
  del gradient
  return bits_lib.select_full_precision(bits, x, dequantize(_encode(x, alpha, bits)))


def _pact_fwd(x, alpha, bits, gradient):
  return _pact(x, alpha, bits, gradient), (x, alpha, bits)


def _rounding_residual(x: jax.Array, alpha: jax.Array, bits) -> jax.Array:
  """``Q_k(y / alpha) - y / alpha`` with ``y = clip(x, 0, alpha)``: AdaBits' in-range ``d a_q / d alpha``."""
  encoded = _encode(x, alpha, bits)
  alpha = jnp.maximum(alpha, _MIN_ALPHA)
  top = bits_lib.num_levels(encoded.bits) - 1.0
  return encoded.codes.astype(jnp.float32) / top - jnp.clip(x, 0.0, alpha) / alpha


def _pact_bwd(gradient, res, g):
  x, alpha, bits = res
  full = bits_lib.is_full_precision(bits)
  inside = (x >= 0.0) & (x < alpha)
  grad_x = jnp.where(full | inside, g, 0.0)
  d_alpha = jnp.where(x < alpha, 0.0, 1.0).astype(g.dtype)
  if gradient == "adabits":
    d_alpha = jnp.where(inside, _rounding_residual(x, alpha, bits).astype(d_alpha.dtype), d_alpha)
  grad_alpha = jnp.where(full, 0.0, g * d_alpha)
  return grad_x, ste.sum_to_shape(grad_alpha, jnp.shape(alpha)), None


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact(x: jax.Array, alpha: jax.Array, bits, *, gradient: str = "pact") -> jax.Array:
  """PACT: ``a_q = alpha Q_k(clip(x, 0, alpha) / alpha)``.

  Gradients (straight through the rounding): ``d a_q / d x = 1`` on
  ``[0, alpha)``, else 0. For ``alpha``, with ``y = clip(x, 0, alpha)``:

  - ``gradient="pact"`` (Choi et al., 2018): ``d a_q / d alpha = 1`` where
    ``x >= alpha``, else 0, so alpha learns only from clipped inputs.
  - ``gradient="adabits"`` (Jin et al., CVPR 2020): additionally
    ``d a_q / d alpha = Q_k(y / alpha) - y / alpha`` (the rounding residual)
    on ``0 <= x < alpha``, 0 for ``x < 0``. This is the exact derivative of
    ``alpha round((2^k - 1) y / alpha) / (2^k - 1)`` with the rounding passed
    straight through, so alpha also moves when no input is clipped.

  ``alpha`` broadcasts against ``x`` (a scalar per layer and bit-width slot).
  At ``bits >= 32`` the quantizer is the identity and ``alpha`` gets no gradient.

  Example:
    >>> aq = pact(x, alpha=jnp.float32(8.0), bits=4)
    >>> aq = pact(x, alpha=jnp.float32(8.0), bits=4, gradient="adabits")
  """
  if gradient not in GRADIENTS:
    raise ValueError(f"gradient={gradient!r} is not a PACT clip gradient; allowed: {GRADIENTS}")
  return _pact(x, jnp.asarray(alpha, x.dtype), bits_lib.check_bits(bits), gradient)


def pact_integer(x: jax.Array, alpha: jax.Array, bits: int) -> IntegerTensor:
  """Integer form of :func:`pact` (either gradient): codes in ``[0, 2^k - 1]``, scale ``alpha / (2^k - 1)``."""
  return _encode(x, jnp.asarray(alpha, x.dtype), bits_lib.check_integer_bits(bits))


# Candidate clips r p99.9(x) for the data-based init, r = i / 32.
INIT_CANDIDATES = 32


def pact_init_alpha(x: jax.Array, bits=32, percentile: float = 99.9) -> jax.Array:
  """A clip from calibration activations: ``alpha = r p`` with ``p`` the ``percentile``
  of ``x`` and ``r`` on ``i / 32``, ``i = 1..32``, minimising ``mean((pact(x) - x)^2)``
  at ``bits`` (``alpha = p`` at 32 bits).

  The percentile alone suits 8 bits but not 2: with ``alpha = p99.9`` of unit-scale
  post-ReLU activations the 2-bit levels are about ``{0, 1.1, 2.2, 3.3}``, 60-70 % of
  the inputs round to 0, and PACT's clip, which learns only from the few clipped
  inputs, barely moves (found by the qat recipe's smoke test: W2A2 at 31 % against
  W8A8's 77 % after 200 steps).

  Example:
    >>> alpha = pact_init_alpha(calibration_activations, bits=2)
  """
  bits = bits_lib.check_bits(bits)
  top = jnp.maximum(jnp.percentile(x, percentile), 1e-3)
  candidates = jnp.arange(1, INIT_CANDIDATES + 1, dtype=jnp.float32) / INIT_CANDIDATES * top
  best = mse_search(x, None, candidates, lambda v, alpha: dequantize(_encode(v, alpha, bits)))
  return jnp.where(bits_lib.is_full_precision(bits), top, best)
