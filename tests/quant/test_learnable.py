"""Gradients of learnable quantizer parameters against the formulas in ``quantizers.md``."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from qflax import quant

SETTINGS = hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
seeds = st.integers(0, 2**31 - 1)
bit_widths = st.integers(1, 8)


def _data(seed, n=257, scale=2.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=n).astype(np.float32) * scale, rng.normal(size=n).astype(np.float32)


@SETTINGS
@hypothesis.given(seeds, bit_widths, st.floats(0.3, 4.0))
def test_pact_alpha_gradient(seed, bits, alpha):
  x, g = _data(seed)
  grad = jax.grad(lambda a: jnp.sum(quant.pact(jnp.asarray(x), a, bits) * g))(jnp.float32(alpha))
  np.testing.assert_allclose(grad, np.sum(g * (x >= np.float32(alpha))), rtol=1e-5, atol=1e-5)
  # The pre-rounding function clip(x, 0, alpha) is smooth in alpha away from the
  # data points; its finite difference is the same sum.
  eps = 1e-3
  fd = (np.sum(g * np.clip(x, 0, alpha + eps)) - np.sum(g * np.clip(x, 0, alpha - eps))) / (2 * eps)
  hypothesis.assume(np.all(np.abs(x - alpha) > 2 * eps))
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-3)


@SETTINGS
@hypothesis.given(seeds, bit_widths, st.booleans(), st.floats(0.05, 1.0))
def test_lsq_step_gradient(seed, bits, signed, step):
  x, g = _data(seed)
  step = np.float32(step)
  grad = jax.grad(lambda s: jnp.sum(quant.lsq(jnp.asarray(x), s, bits, signed=signed) * g))(step)
  q_n, q_p = (2.0**(bits - 1), 2.0**(bits - 1) - 1) if signed else (0.0, 2.0**bits - 1)
  r = x / step
  d = np.where(r <= -q_n, -q_n, np.where(r >= q_p, q_p, np.round(r) - r))
  expected = np.sum(g * d) / np.sqrt(x.size * max(q_p, 1.0))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


@SETTINGS
@hypothesis.given(seeds, bit_widths, st.booleans(), st.floats(0.5, 1.5), st.floats(0.2, 0.9))
def test_qil_interval_gradients(seed, bits, signed, centre, half):
  x, g = _data(seed, scale=1.0)
  centre, half = np.float32(centre), np.float32(half)

  def loss(c, d):
    return jnp.sum(quant.qil(jnp.asarray(x), c, d, bits, signed=signed) * g)

  grad_c, grad_d = jax.grad(loss, argnums=(0, 1))(centre, half)
  mag = np.abs(x) if signed else x
  sign = np.sign(x) if signed else np.ones_like(x)
  inside = (mag >= centre - half) & (mag <= centre + half)
  np.testing.assert_allclose(grad_c, np.sum(g * inside * -sign / (2 * half)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad_d, np.sum(g * inside * sign * (centre - mag) / (2 * half**2)),
                             rtol=1e-4, atol=1e-5)

  # Finite differences of the (smooth inside the interval) pre-rounding transform.
  def transform(c, d):
    t = np.where(mag < c - d, 0.0, np.where(mag > c + d, sign, sign * (mag - (c - d)) / (2 * d)))
    return np.sum(g * t)

  eps = 1e-4
  hypothesis.assume(np.all(np.abs(mag - (centre - half)) > 4 * eps)
                    and np.all(np.abs(mag - (centre + half)) > 4 * eps))
  c64, d64 = np.float64(centre), np.float64(half)
  fd_c = (transform(c64 + eps, d64) - transform(c64 - eps, d64)) / (2 * eps)
  fd_d = (transform(c64, d64 + eps) - transform(c64, d64 - eps)) / (2 * eps)
  np.testing.assert_allclose(grad_c, fd_c, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(grad_d, fd_d, rtol=1e-3, atol=1e-3)


def test_weight_surrogate_gradients():
  """DoReFa and SAT pass the gradient straight through the rounding only."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 4, 8)), jnp.float32)
  g = jnp.asarray(np.random.default_rng(1).normal(size=w.shape), jnp.float32)
  for bits in (1, 2, 4, 8):
    got = jax.grad(lambda v: jnp.sum(quant.dorefa_weight(v, bits) * g))(w)
    want = jax.grad(lambda v: jnp.sum((2 * (jnp.tanh(v) / (2 * jnp.max(jnp.abs(jnp.tanh(v)))) + .5) - 1) * g))(w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    wq = quant.sat_weight(w, bits)
    rescale = float(quant.sat_weight_integer(w, bits).scale) / (2.0 / 2**bits)  # 1/(sqrt(fan_out) std)
    got = jax.grad(lambda v: jnp.sum(quant.sat_weight(v, bits) * g))(w)
    np.testing.assert_allclose(got, want * rescale, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(jnp.std(wq), 1 / np.sqrt(3 * 3 * 8), rtol=1e-4)


def test_dorefa_levels_are_the_rounding_grid():
  w = jnp.asarray(np.random.default_rng(3).normal(size=(500,)), jnp.float32)
  for bits in range(1, 9):
    u = (quant.dorefa_weight(w, bits) + 1) / 2
    np.testing.assert_allclose(quant.clamp_activation(u, bits), u, atol=1e-6)   # Q_k(Q_k(u)) = Q_k(u)
    assert len(np.unique(np.asarray(quant.sat_weight(w, bits, centered=True)))) <= 2**bits


def test_lsq_init_step():
  v = jnp.asarray(np.random.default_rng(0).normal(size=1000), jnp.float32)
  np.testing.assert_allclose(quant.lsq_init_step(v, 4, signed=True), 2 * jnp.mean(jnp.abs(v)) / np.sqrt(7),
                             rtol=1e-6)


def test_qil_inits():
  w = jnp.asarray(np.random.default_rng(0).normal(size=1000), jnp.float32)
  c, d = quant.qil_init_weight(w)
  np.testing.assert_allclose([c + d, c - d], [jnp.max(jnp.abs(w)), 0.0], atol=1e-6)
  c, d = quant.qil_init_activation(jnp.abs(w))
  np.testing.assert_allclose(c + d, jnp.percentile(jnp.abs(w), 99.9), rtol=1e-6)


def test_hwgq_steps_minimise_the_half_gaussian_mse():
  np.testing.assert_allclose(quant.hwgq_steps()[1], 0.538, atol=2e-3)   # HWGQ's published 2-bit step
  z = np.random.default_rng(0).normal(size=400_000).astype(np.float32)
  x = np.maximum(z, 0)
  for bits, mode in [(2, "paper"), (3, "paper"), (2, "nearest")]:
    step = float(quant.hwgq_step(bits, mode))

    def mse(d):
      lowest = 1 if mode == "paper" else 0
      q = np.where(x > 0, d * np.clip(np.round(x / d), lowest, 2**bits - 1), 0)
      return np.mean((x - q) ** 2)

    assert mse(step) <= min(mse(step * 0.95), mse(step * 1.05))
    np.testing.assert_allclose(quant.hwgq(jnp.asarray(x), bits, mode=mode),
                               np.where(x > 0, step * np.clip(np.round(x / step), 1 if mode == "paper" else 0,
                                                              2**bits - 1), 0), rtol=1e-6)


def test_calibration_methods():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(3, 3, 8, 16)) * np.linspace(0.1, 2, 16), jnp.float32)
  s = quant.calibrate_symmetric(w, 8, channel_axis=-1)
  assert s.shape == (1, 1, 1, 16)
  np.testing.assert_allclose(s.reshape(-1), jnp.max(jnp.abs(w), axis=(0, 1, 2)) / 127, rtol=1e-6)
  err = {m: float(jnp.mean((quant.uniform_symmetric(w, 3, quant.calibrate_symmetric(w, 3, method=m)) - w) ** 2))
         for m in ("absmax", "percentile", "mse")}
  assert err["mse"] <= err["absmax"]
  scale, zero = quant.calibrate_asymmetric(jnp.abs(w) + 0.5, 4)
  np.testing.assert_allclose(scale, (jnp.max(jnp.abs(w)) + 0.5) / 15, rtol=1e-6)
  assert float(zero) == 0.0
  a = jnp.asarray(rng.normal(size=4096) * 2 + 1, jnp.float32)
  errs = [float(jnp.mean((quant.uniform_asymmetric(a, 3, *quant.calibrate_asymmetric(a, 3, method=m)) - a) ** 2))
          for m in ("minmax", "mse")]
  assert errs[1] <= errs[0]


def test_midtread_rate_zero_and_packing():
  t = jnp.asarray(np.random.default_rng(0).normal(size=100), jnp.float32)
  np.testing.assert_array_equal(quant.midtread(t, 0, 0.1), jnp.zeros_like(t))
  enc = quant.midtread_integer(t, 0, 0.1)
  assert quant.pack_codes(enc.codes, 0).size == 0
  np.testing.assert_array_equal(quant.unpack_codes(b"", 0, 100), np.zeros(100))


def test_pack_codes_layout():
  np.testing.assert_array_equal(quant.pack_codes(np.array([1, 2, 3, 0]), 2), [0b00111001])
  codes = np.arange(8) % 8
  assert quant.pack_codes(codes, 3).size == 3
  assert quant.pack_codes(np.arange(10), 5).dtype == np.uint8
