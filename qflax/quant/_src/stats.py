"""Code statistics of an :class:`IntegerTensor`, for a quantizer health monitor."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qflax.quant._src.integer import IntegerTensor

HISTOGRAM_LENGTH = 256   # 2^MAX_BITS: one bin per possible code, a fixed shape so it jits


def code_histogram(t: IntegerTensor) -> jax.Array:
  """Counts of each code ``0..255`` (``float32``, length 256); codes are clipped into that range."""
  codes = jnp.clip(jnp.asarray(t.codes, jnp.int32).reshape(-1), 0, HISTOGRAM_LENGTH - 1)
  return jnp.bincount(codes, length=HISTOGRAM_LENGTH).astype(jnp.float32)


def code_statistics(t: IntegerTensor) -> dict[str, jax.Array]:
  """Scalar statistics of the codes ``c`` of ``t`` (``n`` entries, ``k = t.bits``).

  - ``zero_fraction``: ``mean(c == zero_point)``, the share whose dequantized
    value ``(c - zero_point) scale`` is exactly 0 (always 0 for half-integer zero
    points: DoReFa, SAT).
  - ``top_fraction``: ``mean(c == 2^k - 1)``, saturation at the top code.
  - ``bottom_fraction``: ``mean(c == 0)``. For signed codes this is saturation at
    the most negative level; for unsigned activation quantizers (PACT, HWGQ,
    ``uniform_unsigned``, LSQ unsigned) code 0 *is* the zero (``zero_fraction``
    equals it), not saturation.
  - ``max_level_fraction``: ``max_c count(c) / n``, the largest share of one code
    (near 1 means a collapsed quantizer).
  - ``levels_used``: the number of distinct codes present (``int32``).
  - ``entropy_bits``: ``-sum_c p_c log2 p_c`` with ``p_c = count(c) / n``, at most ``k``.

  Pure jnp: works under ``jit`` with traced codes and a concrete or traced ``bits``;
  uses a fixed 256-bin histogram (codes have at most 8 bits). An empty tensor gives zeros.

  Example:
    >>> stats = code_statistics(quant.uniform_symmetric_integer(w, 2, s))
    >>> float(stats["zero_fraction"]), int(stats["levels_used"])
  """
  codes = jnp.asarray(t.codes, jnp.int32)
  n = max(codes.size, 1)
  counts = code_histogram(t)
  p = counts / n
  top = jnp.left_shift(jnp.int32(1), jnp.asarray(t.bits, jnp.int32)) - 1

  def fraction(mask):
    return jnp.sum(mask, dtype=jnp.float32) / n

  return {
      "zero_fraction": fraction(codes.astype(jnp.float32) == jnp.asarray(t.zero_point, jnp.float32)),
      "top_fraction": fraction(codes == top),
      "bottom_fraction": fraction(codes == 0),
      "max_level_fraction": jnp.max(p),
      "levels_used": jnp.sum(counts > 0, dtype=jnp.int32),
      "entropy_bits": -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0)),
  }
