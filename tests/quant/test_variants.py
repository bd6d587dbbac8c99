"""Quantizer variants: AdaBits' normalised full precision, per-layer MSE scales, unsigned uniform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import quant

KERNEL = (3, 3, 8, 16)
FAN_OUT = 3 * 3 * 16


def _kernel(seed=0, shape=KERNEL, scale=0.1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _normalised(w):
  """AdaBits' full-precision weights: (2u - 1) / (sqrt(fan_out) std(2u - 1)), constant rescale."""
  t = jnp.tanh(w)
  unit = 2 * (t / (2 * jnp.max(jnp.abs(t))) + 0.5) - 1
  return unit * jax.lax.stop_gradient(1 / (np.sqrt(FAN_OUT) * jnp.std(unit)))


@pytest.mark.parametrize("bits", [32, 33, 64])
@pytest.mark.parametrize("centered", [False, True])
def test_sat_fp_normalized_full_precision(bits, centered):
  w = _kernel()
  g = _kernel(1, scale=1.0)
  fn = lambda v, b: quant.sat_weight(v, b, centered=centered, normalize_full_precision=True)  # noqa: E731
  wf = fn(w, bits)
  np.testing.assert_allclose(jnp.std(wf), 1 / np.sqrt(FAN_OUT), rtol=1e-5)
  np.testing.assert_allclose(wf, _normalised(w), rtol=1e-5, atol=1e-7)
  assert not np.allclose(wf, w)                                  # not the raw weights
  grad = jax.grad(lambda v: jnp.sum(fn(v, bits) * g))(w)
  np.testing.assert_allclose(grad, jax.grad(lambda v: jnp.sum(_normalised(v) * g))(w), rtol=1e-4, atol=1e-6)
  # Traced bits, under jit, and the registered names.
  np.testing.assert_allclose(jax.jit(fn)(w, jnp.int32(bits)), wf, rtol=1e-6, atol=1e-8)
  name = "sat_centered_fp_normalized" if centered else "sat_fp_normalized"
  np.testing.assert_array_equal(quant.get_quantizer(name, "weight").apply(w, bits, {}), wf)
  # The default keeps returning the raw weights.
  np.testing.assert_array_equal(quant.sat_weight(w, bits, centered=centered), w)


def test_sat_fp_normalized_quantized_path_is_sat():
  w = _kernel(2)
  q = quant.get_quantizer("sat_fp_normalized", "weight")
  for bits in range(1, 9):
    np.testing.assert_array_equal(q.apply(w, bits, {}), quant.sat_weight(w, bits))
    np.testing.assert_array_equal(quant.dequantize(q.integer(w, bits, {})), q.apply(w, bits, {}))


def test_sat_fp_normalized_has_no_integer_form_at_full_precision():
  w = _kernel()
  with pytest.raises(ValueError, match="full precision"):
    quant.get_quantizer("sat_fp_normalized", "weight").integer(w, 32, {})
  with pytest.raises(ValueError, match="full precision"):
    quant.sat_weight_integer(w, 32, normalize_full_precision=True)


@pytest.mark.parametrize("shape", [(3, 3, 4, 6), (3, 3, 32, 32), (3, 3, 64, 96), (200, 10)])
def test_weight_integer_forms_match_jitted_fake_quantization(shape):
  """The rescale and ``u`` are computed so that jitted and op-by-op code agree bit for bit."""
  fns = {name: jax.jit(lambda v, b, q=quant.get_quantizer(name, "weight"): q.apply(v, b, {}))
         for name in ("sat", "sat_centered", "dorefa")}
  for seed in range(2):
    w = _kernel(seed, shape, scale=[0.05, 3.0][seed])
    for bits in (1, 2, 4, 8):
      for name, fn in fns.items():
        integer = quant.get_quantizer(name, "weight").integer(w, bits, {})
        np.testing.assert_array_equal(quant.dequantize(integer), fn(w, bits), err_msg=f"{name} {bits} {seed}")


def _gaussian_kernel():
  return _kernel(0, (3, 3, 32, 32), scale=0.05)


def test_uniform_layer_uses_all_low_bit_codes():
  w = _gaussian_kernel()
  mse = quant.code_statistics(quant.get_quantizer("uniform_layer", "weight").integer(w, 2, {}))
  absmax = quant.code_statistics(quant.get_quantizer("uniform_layer_absmax", "weight").integer(w, 2, {}))
  assert int(mse["levels_used"]) == 4
  assert float(mse["max_level_fraction"]) < 0.6
  assert float(absmax["zero_fraction"]) > 0.85
  assert float(mse["entropy_bits"]) > 1.5 > float(absmax["entropy_bits"])


def test_uniform_layer_is_the_mse_scale_and_absmax_is_the_old_one():
  w = _gaussian_kernel()
  for bits in (2, 4, 8):
    s_mse = quant.calibrate_symmetric(w, bits, method="mse", num_candidates=32)
    np.testing.assert_array_equal(quant.get_quantizer("uniform_layer", "weight").apply(w, bits, {}),
                                  quant.uniform_symmetric(w, bits, s_mse))
    np.testing.assert_array_equal(quant.get_quantizer("uniform_layer_absmax", "weight").apply(w, bits, {}),
                                  quant.uniform_symmetric(w, bits, quant.calibrate_symmetric(w, bits)))
    err = {name: float(jnp.mean((quant.get_quantizer(name, "weight").apply(w, bits, {}) - w) ** 2))
           for name in ("uniform_layer", "uniform_layer_absmax")}
    assert err["uniform_layer"] <= err["uniform_layer_absmax"]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_uniform_layer_gradient_is_straight_through_inside_the_range(bits):
  w = _gaussian_kernel()
  g = _kernel(3, w.shape, scale=1.0)
  q = quant.get_quantizer("uniform_layer", "weight")
  grad = jax.jit(jax.grad(lambda v: jnp.sum(q.apply(v, bits, {}) * g)))(w)
  enc = q.integer(w, bits, {})
  scale, zero = np.float32(enc.scale), np.float32(enc.zero_point)
  lo, hi = -zero * scale, (np.float32(2**bits - 1) - zero) * scale
  inside = (np.asarray(w) >= lo) & (np.asarray(w) <= hi)
  assert inside.mean() < 1.0 or bits == 8          # the MSE clip saturates some entries at low bits
  np.testing.assert_array_equal(grad, np.where(inside, g, 0.0))


def test_uniform_unsigned_uses_every_code_on_non_negative_data():
  a = jnp.asarray(np.random.default_rng(0).uniform(0, 2, size=20_000), jnp.float32)
  unsigned = quant.get_quantizer("uniform_unsigned", "activation")
  signed = quant.get_quantizer("uniform", "activation")
  assert len(np.unique(np.asarray(unsigned.apply(a, 8, {})))) == 256
  assert len(np.unique(np.asarray(signed.apply(a, 8, {})))) <= 128
  assert int(quant.code_statistics(unsigned.integer(a, 8, {}))["levels_used"]) == 256


def test_uniform_unsigned_definition():
  x = jnp.asarray(np.random.default_rng(1).normal(size=1000), jnp.float32)
  for bits in (1, 2, 4, 8):
    enc = quant.uniform_unsigned_integer(x, bits)
    top = 2**bits - 1
    np.testing.assert_allclose(enc.scale, jnp.max(x) / top, rtol=1e-6)
    assert float(enc.zero_point) == 0.0
    y = quant.uniform_unsigned(x, bits)
    np.testing.assert_array_equal(quant.dequantize(enc), y)
    np.testing.assert_array_equal(y[x < 0], 0.0)                # negatives clip to 0
    assert float(y[jnp.argmax(x)]) == float(y.max()) == pytest.approx(float(x.max()), rel=1e-6)   # max -> top code
    grad = jax.grad(lambda v: jnp.sum(quant.uniform_unsigned(v, bits) * 2.0))(x)
    np.testing.assert_array_equal(grad, np.where(np.asarray(x) >= 0, 2.0, 0.0))   # STE on [0, max], max included
  # Explicit clip.
  y = quant.uniform_unsigned(x, 2, clip=1.5)
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 0.5, 1.0, 1.5], atol=1e-6)
  np.testing.assert_array_equal(quant.uniform_unsigned(x, 32), x)
