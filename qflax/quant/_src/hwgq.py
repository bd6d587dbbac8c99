"""Half-wave Gaussian quantizer (HWGQ), the CMT-KD activation quantizer.

Cai, He, Sun, Vasconcelos, "Deep Learning with Low Precision by Half-wave
Gaussian Quantization", CVPR 2017.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qflax.quant._src import bits as bits_lib
from qflax.quant._src import ste
from qflax.quant._src.integer import IntegerTensor, dequantize


MODES = ("paper", "nearest")


def _lowest_positive_code(mode: str) -> int:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not an HWGQ mode; allowed: {MODES}")
  return 1 if mode == "paper" else 0


def _half_gaussian_mse(step, levels, z, weight, lowest):
  q = step * np.clip(np.round(z / step), lowest, levels - 1)
  return float(np.sum(weight * (z - q) ** 2))


@functools.cache
def hwgq_steps(mode: str = "paper") -> np.ndarray:
  """MSE-optimal steps ``D_k`` for ``k = 1..8`` on a half-rectified unit Gaussian.

  Minimises ``E[(x - q(x))^2]`` for ``x = max(0, z)``, ``z ~ N(0, 1)`` (the
  ``x = 0`` half has no error) by golden-section search on a fine grid.
  ``mode="paper"`` (HWGQ's quantizer: every ``x > 0`` maps to one of
  ``{D, ..., (2^k - 1) D}``) gives ``D_2 ~= 0.539``, the paper's 0.538;
  ``mode="nearest"`` (``x > 0`` may round down to 0) gives ``D_2 ~= 0.651``.
  """
  lowest = _lowest_positive_code(mode)
  z = np.linspace(0.0, 12.0, 240_001)
  weight = np.exp(-0.5 * z**2) / np.sqrt(2.0 * np.pi) * (z[1] - z[0])
  steps = []
  ratio = (np.sqrt(5.0) - 1.0) / 2.0
  for k in range(1, bits_lib.MAX_BITS + 1):
    levels = 2**k
    lo, hi = 1e-4, 4.0
    for _ in range(80):
      a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
      if (_half_gaussian_mse(a, levels, z, weight, lowest)
          < _half_gaussian_mse(b, levels, z, weight, lowest)):
        hi = b
      else:
        lo = a
    steps.append((lo + hi) / 2.0)
  return np.asarray(steps, np.float32)


def hwgq_step(bits, mode: str = "paper") -> jax.Array:
  """``D_k`` for (possibly traced) ``bits``."""
  return jnp.asarray(hwgq_steps(mode))[bits_lib.safe_bits(bits) - 1]


def _encode(x, bits, mode):
  bits = bits_lib.safe_bits(bits)
  step = hwgq_step(bits, mode)
  top = bits_lib.num_levels(bits) - 1.0
  codes = jnp.clip(jnp.round(x / step), _lowest_positive_code(mode), top)
  codes = jnp.where(x > 0.0, codes, 0.0)
  return IntegerTensor(codes.astype(jnp.int32), step, jnp.float32(0.0), bits)


def hwgq(x: jax.Array, bits, *, mode: str = "paper") -> jax.Array:
  """HWGQ: ``0`` for ``x <= 0``, else ``D clip(round(x / D), lo, 2^k - 1)``.

  ``mode="paper"`` (default, ``lo = 1``): positive inputs map to the nearest of
  ``{D, ..., (2^k - 1) D}``, as in HWGQ, with ``D_2 = 0.539``. ``mode="nearest"``
  (``lo = 0``): the nearest of ``{0, D, ..., (2^k - 1) D}`` with its own
  MSE-optimal ``D``. Either way ``2^k`` levels. Backward: the clipped ReLU,
  gradient 1 on ``(0, (2^k - 1) D]``, else 0.

  Example:
    >>> aq = hwgq(x, bits=2)                      # levels {0, .539, 1.078, 1.617}
  """
  bits = bits_lib.check_bits(bits)
  top = (bits_lib.num_levels(bits) - 1.0) * hwgq_step(bits, mode)
  surrogate = ste.masked_identity(x, (x > 0.0) & (x <= top))
  quantized = ste.straight_through(surrogate, dequantize(_encode(x, bits, mode)))
  return bits_lib.select_full_precision(bits, x, quantized)


def hwgq_integer(x: jax.Array, bits: int, *, mode: str = "paper") -> IntegerTensor:
  """Integer form of :func:`hwgq`: codes in ``[0, 2^k - 1]``, scale ``D_k``."""
  return _encode(x, bits_lib.check_integer_bits(bits), mode)
