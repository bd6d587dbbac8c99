"""Gradients of learnable quantizer parameters against the formulas in ``quantizers.md``."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  # The documented formulas hold where the interval constraint 0 <= c - d is inactive
  # (the clamped region is tested in test_qil_clamped_gradients_match_finite_differences).
  hypothesis.assume(centre >= half)
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


@SETTINGS
@hypothesis.given(seeds, bit_widths, st.floats(0.3, 4.0))
def test_pact_adabits_alpha_gradient(seed, bits, alpha):
  """AdaBits: d a_q / d alpha = Q_k(y / alpha) - y / alpha on [0, alpha), 1 above, 0 below."""
  x, g = _data(seed)
  alpha = np.float32(alpha)
  xs = jnp.asarray(x)
  grad = jax.grad(lambda a: jnp.sum(quant.pact(xs, a, bits, gradient="adabits") * g))(alpha)
  y = np.clip(x, 0, alpha)
  residual = np.asarray(quant.pact(xs, alpha, bits), np.float64) / alpha - y / np.float64(alpha)  # Q_k(u) - u
  inside = (x >= 0) & (x < alpha)
  d_alpha = np.where(x >= alpha, 1.0, np.where(inside, residual, 0.0))
  np.testing.assert_allclose(grad, np.sum(g * d_alpha), rtol=1e-4, atol=1e-4)
  # It is PACT's gradient plus the in-range residual term.
  pact_grad = jax.grad(lambda a: jnp.sum(quant.pact(xs, a, bits) * g))(alpha)
  np.testing.assert_allclose(grad - pact_grad, np.sum(g * inside * residual), rtol=1e-4, atol=1e-4)
  # Finite differences of a_q with the rounding passed straight through: round(z) = z + r0, r0 frozen
  # at alpha, i.e. a_q(a) = clip(x, 0, a) + a (Q_k(u0) - u0).
  eps = 1e-3
  hypothesis.assume(np.all(np.abs(x - alpha) > 2 * eps))

  def surrogate(a):
    return np.sum(g * (np.clip(x, 0, a) + a * np.where(inside, residual, 0.0)))

  fd = (surrogate(np.float64(alpha) + eps) - surrogate(np.float64(alpha) - eps)) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-3)


def test_pact_adabits_moves_an_alpha_far_above_the_data():
  """Init 8 on unit-scale activations: PACT's alpha gets no gradient, AdaBits' shrinks it."""
  x = jnp.asarray(np.abs(np.random.default_rng(0).normal(size=4096)), jnp.float32)

  def loss(alpha, gradient):
    return jnp.mean((quant.pact(x, alpha, 2, gradient=gradient) - x) ** 2)

  assert float(jax.grad(loss)(jnp.float32(8.0), "pact")) == 0.0
  assert float(jax.grad(loss)(jnp.float32(8.0), "adabits")) > 0.0   # gradient descent lowers alpha
  full = jax.grad(lambda a: jnp.sum(quant.pact(x, a, 32, gradient="adabits")))(jnp.float32(8.0))
  assert float(full) == 0.0


def test_pact_adabits_registered():
  q, p = quant.get_quantizer("pact_adabits", "activation"), quant.get_quantizer("pact", "activation")
  assert (q.param_names, dict(q.defaults)) == (p.param_names, dict(p.defaults))
  x = jnp.asarray(np.random.default_rng(0).normal(size=500), jnp.float32)
  np.testing.assert_array_equal(q.init(x, 4)["alpha"], p.init(x, 4)["alpha"])
  params = {"alpha": jnp.float32(1.2)}
  np.testing.assert_array_equal(q.apply(x, 3, params), p.apply(x, 3, params))
  g = jax.grad(lambda a: jnp.sum(q.apply(x, 3, {"alpha": a})))(jnp.float32(1.2))
  np.testing.assert_allclose(g, jax.grad(lambda a: jnp.sum(quant.pact(x, a, 3, gradient="adabits")))(1.2))


def _clamped_interval(c, d, rel=1e-5, absolute=1e-6):
  """The documented effective interval in float64: p = max(c - d+, 0), q = max(c + d+, p + eps(p))."""
  d = max(d, 0.0)
  p = max(c - d, 0.0)
  return p, max(c + d, p + absolute + rel * p)


def _clamped_transform_loss(x, g, signed):
  mag = np.abs(x) if signed else x
  sign = np.sign(x) if signed else np.ones_like(x)

  def loss(c, d):
    p, q = _clamped_interval(c, d)
    t = np.where(mag < p, 0.0, np.where(mag > q, sign, sign * (mag - p) / (q - p)))
    return np.sum(g * t)
  return loss, mag


def test_qil_pruning_point_is_clamped_at_zero():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 8, 8)), jnp.float32)
  # c - d = -0.25 < 0: the interval is [0, c + d] = [0, 0.75], the same as c = d = 0.375.
  for signed in (True, False):
    for bits in (1, 2, 4, 8):
      np.testing.assert_array_equal(quant.qil(x, 0.25, 0.5, bits, signed=signed),
                                    quant.qil(x, 0.375, 0.375, bits, signed=signed))
      np.testing.assert_array_equal(quant.dequantize(quant.qil_integer(x, 0.25, 0.5, bits, signed=signed)),
                                    quant.qil(x, 0.25, 0.5, bits, signed=signed))
  p, q = quant.qil_interval(0.25, 0.5)
  assert (float(p), float(q)) == (0.0, 0.75)
  p, q = quant.qil_interval(0.9, 0.6)               # unconstrained: (c - d, c + d)
  np.testing.assert_allclose([p, q], [0.3, 1.5], rtol=1e-6)
  mag = np.abs(np.asarray(x))
  t = np.where(mag > 0.75, np.sign(x), np.sign(x) * mag / 0.75)   # signed transform with p = 0
  np.testing.assert_allclose(quant.qil(x, 0.25, 0.5, 8, signed=True), np.round(t * 127) / 127, atol=1e-6)


extreme = st.builds(lambda sign, exponent: sign * 10.0**exponent,
                    st.sampled_from([-1.0, 1.0]), st.floats(-8.0, 8.0)) | st.just(0.0)


@SETTINGS
@hypothesis.given(extreme, extreme, bit_widths, st.booleans(), seeds)
def test_qil_extreme_intervals_stay_valid_and_finite(centre, half, bits, signed, seed):
  x, g = _data(seed, scale=float(10.0 ** np.random.default_rng(seed).uniform(-3, 3)))
  c, d = np.float32(centre), np.float32(half)
  p, q = quant.qil_interval(c, d)
  assert 0.0 <= float(p) < float(q)
  y = quant.qil(jnp.asarray(x), c, d, bits, signed=signed)
  assert np.all(np.isfinite(np.asarray(y)))
  grads = jax.grad(lambda v, a, b: jnp.sum(quant.qil(v, a, b, bits, signed=signed) * g), argnums=(0, 1, 2))(
      jnp.asarray(x), c, d)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in grads)
  codes = np.asarray(quant.qil_integer(jnp.asarray(x), c, d, bits, signed=signed).codes)
  assert codes.min() >= 0 and codes.max() < 2**bits


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("centre,half,scale", [
    (0.3, 0.6, 1.0),       # c - d < 0: p = 0, t = |x| / (c + d), gradient only through c + d
    (0.05, 0.5, 1.0),
    (1e-5, 1e-7, 1e-5),    # d tiny: q = p + eps(p), t = (|x| - (c - d)) / eps(p)
    (0.4, -0.2, 0.4),      # negative half-width acts as d = 0: p = c, q = c + eps(c)
    (-0.5, 0.3, 1.0),      # the whole interval below zero: [0, eps], no gradient to c or d
])
def test_qil_clamped_gradients_match_finite_differences(signed, centre, half, scale):
  p, q = _clamped_interval(centre, half)
  rng = np.random.default_rng(0)
  # Data spread over the effective interval and around it.
  mag = np.concatenate([rng.uniform(p, q, 200), rng.uniform(0, 2 * q + scale, 200)])
  x = (mag * (rng.choice([-1.0, 1.0], mag.size) if signed else 1.0)).astype(np.float32)
  g = rng.normal(size=x.size).astype(np.float32)
  c, d = np.float32(centre), np.float32(half)
  c64, d64 = np.float64(c), np.float64(d)
  eps = 1e-3 * (q - p)
  pf, qf = _clamped_interval(c64, d64)
  mag = np.abs(x.astype(np.float64)) if signed else x.astype(np.float64)
  keep = (np.abs(mag - pf) > 4 * eps) & (np.abs(mag - qf) > 4 * eps)
  assert keep.mean() > 0.9
  g = np.where(keep, g, 0.0)     # finite differences are exact only away from the interval ends
  loss, _ = _clamped_transform_loss(x.astype(np.float64), g, signed)
  grad_c, grad_d = jax.grad(lambda a, b: jnp.sum(quant.qil(jnp.asarray(x), a, b, 8, signed=signed) * g),
                            argnums=(0, 1))(c, d)
  fd_c = (loss(c64 + eps, d64) - loss(c64 - eps, d64)) / (2 * eps)
  fd_d = (loss(c64, d64 + eps) - loss(c64, d64 - eps)) / (2 * eps)
  tol = 1e-3 * max(1.0, abs(fd_c), abs(fd_d))
  np.testing.assert_allclose([grad_c, grad_d], [fd_c, fd_d], rtol=2e-3, atol=tol)
  if centre - max(half, 0) < 0:                       # p = 0: c and d enter only through c + d
    np.testing.assert_allclose(grad_c, grad_d, rtol=1e-5, atol=1e-6)
  if centre + half < 0:
    assert float(grad_c) == float(grad_d) == 0.0


def test_qil_interval_autodiff_is_the_clamped_expression():
  def jacobian(c, d):
    return np.asarray(jax.jacobian(lambda v: jnp.stack(quant.qil_interval(v[0], v[1])))(jnp.float32([c, d])))

  for c, d in [(0.9, 0.6), (0.3, 0.6), (1e-5, 1e-7), (0.4, -0.2), (-0.5, 0.3)]:
    jac = jacobian(c, d)
    h = 1e-9
    fd = np.stack([(np.array(_clamped_interval(c + h * e0, d + h * e1)) - np.array(_clamped_interval(
        c - h * e0, d - h * e1))) / (2 * h) for e0, e1 in [(1, 0), (0, 1)]], axis=1)
    np.testing.assert_allclose(jac, fd, rtol=1e-4, atol=1e-6, err_msg=f"c={c}, d={d}")
  # The inits sit on the kink c = d (p = 0 exactly); ties count as unclamped, so the
  # documented gradients hold there: dp/dc = 1, dp/dd = -1.
  np.testing.assert_array_equal(jacobian(0.5, 0.5), [[1.0, -1.0], [1.0, 1.0]])


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
  c, d = quant.qil_init_weight(w, bits=4)
  assert c - d == 0.0 and 0.3 * jnp.max(jnp.abs(w)) < c + d < jnp.max(jnp.abs(w))
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


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qil_weight_init_is_the_mse_clip_and_keeps_low_bit_codes_in_use(bits):
  # Found by the qkd recipe smoke test: a clip at max|w| rounds >90 % of a 2-bit kernel to 0.
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 32, 32)), jnp.float32)
  top = float(jnp.max(jnp.abs(w)))

  def error(clip):
    return float(jnp.mean((clip * quant.qil(w, clip / 2, clip / 2, bits, signed=True) - w) ** 2))

  c, d = quant.qil_init_weight(w, bits)
  grid = [top * i / 32 for i in range(1, 33)]
  assert error(float(c + d)) == pytest.approx(min(error(g) for g in grid), rel=1e-6)
  codes = quant.code_statistics(quant.qil_integer(w, c, d, bits, signed=True))
  absmax = quant.code_statistics(quant.qil_integer(w, top / 2, top / 2, bits, signed=True))
  assert float(codes["max_level_fraction"]) < 0.6
  if bits == 2:
    assert float(absmax["max_level_fraction"]) > 0.9


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pact_init_is_the_mse_clip_below_the_percentile(bits):
  # Found by the qat recipe smoke test: alpha = p99.9 rounds most 2-bit activations to 0.
  x = jnp.maximum(jnp.asarray(np.random.default_rng(2).normal(size=20_000), jnp.float32), 0.0)
  p = float(jnp.percentile(x, 99.9))

  def error(alpha):
    return float(jnp.mean((quant.pact(x, alpha, bits) - x) ** 2))

  alpha = float(quant.pact_init_alpha(x, bits))
  assert error(alpha) == pytest.approx(min(error(p * i / 32) for i in range(1, 33)), rel=1e-6)
  assert alpha <= p
  if bits == 2:
    assert alpha < 0.75 * p and error(alpha) < 0.8 * error(p)
  if bits == 8:
    assert alpha > 0.9 * p
  assert float(quant.pact_init_alpha(x, 32)) == pytest.approx(p)
