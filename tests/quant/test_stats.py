"""``quant.code_statistics`` on hand-made integer tensors, eagerly and under jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import quant

KEYS = ("zero_fraction", "top_fraction", "bottom_fraction", "max_level_fraction", "levels_used", "entropy_bits")


def _tensor(codes, bits, zero_point=0.0, scale=1.0):
  return quant.IntegerTensor(jnp.asarray(codes, jnp.int32), jnp.float32(scale), jnp.asarray(zero_point, jnp.float32),
                             jnp.int32(bits))


def _entropy(counts):
  p = np.asarray([c for c in counts if c], np.float64)
  p = p / p.sum()
  return float(-(p * np.log2(p)).sum())


def _check(stats, expected):
  assert set(stats) == set(KEYS)
  for key, value in expected.items():
    np.testing.assert_allclose(stats[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_signed_two_bit_codes():
  # Codes 0..3 with zero point 1 (a symmetric 2-bit quantizer): counts [3, 1, 1, 3].
  t = _tensor([0, 0, 1, 3, 3, 3, 2, 0], 2, zero_point=1.0)
  expected = {"zero_fraction": 1 / 8, "top_fraction": 3 / 8, "bottom_fraction": 3 / 8,
              "max_level_fraction": 3 / 8, "levels_used": 4, "entropy_bits": _entropy([3, 1, 1, 3])}
  _check(quant.code_statistics(t), expected)
  _check(jax.jit(quant.code_statistics)(t), expected)                         # traced codes and bits
  assert quant.code_statistics(t)["levels_used"].dtype == jnp.int32


def test_unsigned_codes_zero_is_the_bottom_code():
  x = jnp.asarray([0.0, 0.0, 0.0, 0.5, 1.0, -1.0], jnp.float32)
  t = quant.uniform_unsigned_integer(x, 4)
  stats = quant.code_statistics(t)
  assert float(stats["bottom_fraction"]) == float(stats["zero_fraction"]) == pytest.approx(4 / 6)
  assert float(stats["top_fraction"]) == pytest.approx(1 / 6)
  assert int(stats["levels_used"]) == 3


def test_half_integer_zero_point_never_dequantizes_to_zero():
  t = _tensor([0, 1, 2, 3, 1, 2], 2, zero_point=1.5)            # DoReFa / SAT layout
  stats = quant.code_statistics(t)
  assert float(stats["zero_fraction"]) == 0.0
  assert not np.any(np.asarray(quant.dequantize(t)) == 0.0)


def test_per_channel_zero_points_broadcast():
  codes = np.array([[1, 2], [1, 0], [3, 2]])                    # zero point 1 in column 0, 2 in column 1
  t = quant.IntegerTensor(jnp.asarray(codes, jnp.int32), jnp.ones((1, 2)), jnp.asarray([[1.0, 2.0]]), jnp.int32(2))
  assert float(quant.code_statistics(t)["zero_fraction"]) == pytest.approx(4 / 6)


def test_extremes():
  every = quant.code_statistics(_tensor(np.arange(256), 8))
  _check(every, {"levels_used": 256, "entropy_bits": 8.0, "max_level_fraction": 1 / 256,
                 "top_fraction": 1 / 256, "bottom_fraction": 1 / 256})
  collapsed = quant.code_statistics(_tensor(np.full((4, 5), 7), 3, zero_point=3.5))
  _check(collapsed, {"levels_used": 1, "entropy_bits": 0.0, "max_level_fraction": 1.0, "top_fraction": 1.0,
                     "bottom_fraction": 0.0, "zero_fraction": 0.0})
  empty = quant.code_statistics(_tensor(np.zeros((0,), np.int32), 4))
  assert all(float(empty[k]) == 0.0 for k in KEYS)


def test_traced_codes_from_a_quantizer_under_jit():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 16, 16)), jnp.float32)

  @jax.jit
  def stats(v, alpha):
    return quant.code_statistics(quant.pact_integer(v, alpha, 3))

  got = stats(x, jnp.float32(1.0))
  codes = np.asarray(quant.pact_integer(x, 1.0, 3).codes).ravel()
  counts = np.bincount(codes, minlength=8)
  _check(got, {"zero_fraction": np.mean(codes == 0), "bottom_fraction": np.mean(codes == 0),
               "top_fraction": np.mean(codes == 7), "max_level_fraction": counts.max() / codes.size,
               "levels_used": np.count_nonzero(counts), "entropy_bits": _entropy(counts)})
