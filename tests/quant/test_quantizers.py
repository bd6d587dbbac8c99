"""Properties every quantizer in ``quantizers.md`` must hold, for k in 1..8.

Every registered quantizer (``quant.quantizer_names``) is covered by a case here
(``test_every_registered_quantizer_has_a_case``); registered ones without a
direct function case run through ``get_quantizer(...).apply``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import quant

SETTINGS = hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
SHAPE = (3, 3, 4, 6)


@dataclasses.dataclass(frozen=True)
class Case:
  """One quantizer with its parameters fixed, as ``(x, bits) -> y``."""
  name: str
  fn: Callable
  integer: Callable
  value_range: Callable        # (x, bits) -> (lo, hi)
  grad_mask: Callable | None   # (x, bits) -> expected d y / d x (elementwise)
  idempotent: bool = True
  groups: int | None = None    # scale groups along the last axis (per-channel)
  registered: tuple = ()       # the (role, name) registry entries this case stands for
  # Why ``bits >= 32`` is not the identity here (that output is tested elsewhere), or None.
  full_precision_differs: str | None = None


ALPHA, STEP, CENTRE, HALF = 1.5, 0.3, 0.9, 0.6


def _levels(bits):
  return 2.0**bits


def _registered(name, role, params=None):
  q = quant.get_quantizer(name, role)
  params = params or {}
  return (lambda x, b: q.apply(x, b, params)), (lambda x, b: q.integer(x, b, params))


def _uniform_range(integer):
  """``[-z s, (2^k - 1 - z) s]`` of a uniform quantizer, computed as ``_with_range_mask`` does (float32)."""
  def value_range(x, bits):
    enc = integer(jnp.asarray(x), bits)
    scale, zero = np.float32(enc.scale), np.float32(enc.zero_point)
    return (np.float32(0.0) - zero) * scale, (np.float32(_levels(bits) - 1.0) - zero) * scale
  return value_range


def _uniform_mask(integer):
  def mask(x, bits):
    lo, hi = _uniform_range(integer)(x, bits)
    return (x >= lo) & (x <= hi)
  return mask


_PACT_ADABITS = _registered("pact_adabits", "activation", {"alpha": jnp.float32(ALPHA)})
_SAT_FP = _registered("sat_fp_normalized", "weight")
_SAT_CENTERED_FP = _registered("sat_centered_fp_normalized", "weight")
_UNIFORM_LAYER = _registered("uniform_layer", "weight")
_UNIFORM_LAYER_ABSMAX = _registered("uniform_layer_absmax", "weight")
_UNIFORM_ACT = _registered("uniform", "activation")
_UNIFORM_UNSIGNED = _registered("uniform_unsigned", "activation")
_SAT_FP_REASON = ("AdaBits' full-precision member keeps the tanh normalisation and rescale "
                  "(test_variants.py::test_sat_fp_normalized_full_precision)")


CASES = [
    Case("dorefa", quant.dorefa_weight, quant.dorefa_weight_integer,
         lambda x, b: (-1.0, 1.0), None, idempotent=False, registered=(("weight", "dorefa"),)),
    Case("sat", quant.sat_weight, quant.sat_weight_integer,
         lambda x, b: (-np.inf, np.inf), None, idempotent=False, registered=(("weight", "sat"),)),
    Case("clamp", quant.clamp_activation, quant.clamp_activation_integer,
         lambda x, b: (0.0, 1.0), lambda x, b: (x >= 0) & (x <= 1), registered=(("activation", "clamp"),)),
    Case("pact", lambda x, b: quant.pact(x, ALPHA, b), lambda x, b: quant.pact_integer(x, ALPHA, b),
         lambda x, b: (0.0, ALPHA), lambda x, b: (x >= 0) & (x < ALPHA), registered=(("activation", "pact"),)),
    Case("lsq_signed", lambda x, b: quant.lsq(x, STEP, b, signed=True),
         lambda x, b: quant.lsq_integer(x, STEP, b, signed=True),
         lambda x, b: (-STEP * _levels(b) / 2, STEP * (_levels(b) / 2 - 1)),
         lambda x, b: (x / STEP > -_levels(b) / 2) & (x / STEP < _levels(b) / 2 - 1),
         registered=(("weight", "lsq"), ("activation", "lsq_signed"))),
    Case("lsq_unsigned", lambda x, b: quant.lsq(x, STEP, b, signed=False),
         lambda x, b: quant.lsq_integer(x, STEP, b, signed=False),
         lambda x, b: (0.0, STEP * (_levels(b) - 1)),
         lambda x, b: (x / STEP > 0) & (x / STEP < _levels(b) - 1), registered=(("activation", "lsq"),)),
    Case("qil_weight", lambda x, b: quant.qil(x, CENTRE, HALF, b, signed=True),
         lambda x, b: quant.qil_integer(x, CENTRE, HALF, b, signed=True),
         lambda x, b: (-1.0, 1.0),
         lambda x, b: ((np.abs(x) >= CENTRE - HALF) & (np.abs(x) <= CENTRE + HALF)) / (2 * HALF),
         idempotent=False, registered=(("weight", "qil"), ("weight", "qil_absmax"), ("activation", "qil_signed"))),
    Case("qil_activation", lambda x, b: quant.qil(x, CENTRE, HALF, b, signed=False),
         lambda x, b: quant.qil_integer(x, CENTRE, HALF, b, signed=False),
         lambda x, b: (0.0, 1.0),
         lambda x, b: ((x >= CENTRE - HALF) & (x <= CENTRE + HALF)) / (2 * HALF),
         idempotent=False, registered=(("activation", "qil"),)),
    # With the interval [0, 1] the QIL transform is the identity on [-1, 1], so
    # QIL is idempotent there (elsewhere the transform rescales its own output).
    Case("qil_unit_interval", lambda x, b: quant.qil(x, 0.5, 0.5, b, signed=True),
         lambda x, b: quant.qil_integer(x, 0.5, 0.5, b, signed=True),
         lambda x, b: (-1.0, 1.0), lambda x, b: (np.abs(x) <= 1.0)),
    Case("hwgq", quant.hwgq, quant.hwgq_integer,
         lambda x, b: (0.0, (_levels(b) - 1) * float(quant.hwgq_step(b))),
         lambda x, b: (x > 0) & (x <= (_levels(b) - 1) * float(quant.hwgq_step(b))),
         registered=(("activation", "hwgq"),)),
    Case("hwgq_nearest", lambda x, b: quant.hwgq(x, b, mode="nearest"),
         lambda x, b: quant.hwgq_integer(x, b, mode="nearest"),
         lambda x, b: (0.0, (_levels(b) - 1) * float(quant.hwgq_step(b, "nearest"))),
         lambda x, b: (x > 0) & (x <= (_levels(b) - 1) * float(quant.hwgq_step(b, "nearest")))),
    Case("uniform_symmetric", lambda x, b: quant.uniform_symmetric(x, b, STEP),
         lambda x, b: quant.uniform_symmetric_integer(x, b, STEP),
         lambda x, b: (-STEP * _levels(b) / 2, STEP * (_levels(b) / 2 - 1)),
         lambda x, b: (x >= -STEP * _levels(b) / 2) & (x <= STEP * (_levels(b) / 2 - 1))),
    Case("uniform_asymmetric", lambda x, b: quant.uniform_asymmetric(x, b, STEP, 1.0),
         lambda x, b: quant.uniform_asymmetric_integer(x, b, STEP, 1.0),
         lambda x, b: (-STEP, STEP * (_levels(b) - 2)),
         lambda x, b: (x >= -STEP) & (x <= STEP * (_levels(b) - 2))),
    Case("uniform_per_channel",
         lambda x, b: quant.uniform_symmetric(x, b, quant.calibrate_symmetric(x, b, channel_axis=-1)),
         lambda x, b: quant.uniform_symmetric_integer(x, b, quant.calibrate_symmetric(x, b, channel_axis=-1)),
         lambda x, b: (-np.inf, np.inf), None, idempotent=False, groups=SHAPE[-1],
         registered=(("weight", "uniform"),)),
    Case("midtread", lambda x, b: quant.midtread(x, b, STEP), lambda x, b: quant.midtread_integer(x, b, STEP),
         lambda x, b: (-STEP * _levels(b) / 2, STEP * (_levels(b) / 2 - 1)),
         lambda x, b: np.ones_like(x)),
    # Registered variants, through the registry.
    Case("dorefa_mean", *_registered("dorefa_mean", "weight"), lambda x, b: (-np.inf, np.inf), None,
         idempotent=False, registered=(("weight", "dorefa_mean"),)),
    Case("sat_centered", *_registered("sat_centered", "weight"), lambda x, b: (-np.inf, np.inf), None,
         idempotent=False, registered=(("weight", "sat_centered"),)),
    Case("sat_fp_normalized", *_SAT_FP, lambda x, b: (-np.inf, np.inf), None, idempotent=False,
         registered=(("weight", "sat_fp_normalized"),), full_precision_differs=_SAT_FP_REASON),
    Case("sat_centered_fp_normalized", *_SAT_CENTERED_FP, lambda x, b: (-np.inf, np.inf), None,
         idempotent=False, registered=(("weight", "sat_centered_fp_normalized"),),
         full_precision_differs=_SAT_FP_REASON),
    Case("pact_adabits", *_PACT_ADABITS, lambda x, b: (0.0, ALPHA), lambda x, b: (x >= 0) & (x < ALPHA),
         registered=(("activation", "pact_adabits"),)),
    Case("uniform_layer", *_UNIFORM_LAYER, _uniform_range(_UNIFORM_LAYER[1]), _uniform_mask(_UNIFORM_LAYER[1]),
         idempotent=False, registered=(("weight", "uniform_layer"),)),
    Case("uniform_layer_absmax", *_UNIFORM_LAYER_ABSMAX, _uniform_range(_UNIFORM_LAYER_ABSMAX[1]),
         _uniform_mask(_UNIFORM_LAYER_ABSMAX[1]), idempotent=False, registered=(("weight", "uniform_layer_absmax"),)),
    Case("uniform_activation", *_UNIFORM_ACT, _uniform_range(_UNIFORM_ACT[1]), _uniform_mask(_UNIFORM_ACT[1]),
         idempotent=False, registered=(("activation", "uniform"),)),
    Case("uniform_unsigned", *_UNIFORM_UNSIGNED, lambda x, b: (0.0, x.max()),
         lambda x, b: (x >= 0) & (x <= x.max()), registered=(("activation", "uniform_unsigned"),)),
]
IDS = [c.name for c in CASES]


def _input(seed, scale):
  return jnp.asarray(np.random.default_rng(seed).normal(size=SHAPE) * scale, jnp.float32)


inputs = st.tuples(st.integers(0, 2**31 - 1), st.sampled_from([0.3, 1.0, 3.0]))
bit_widths = st.integers(1, 8)


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
  c = request.param
  return dataclasses.replace(c, fn=jax.jit(c.fn))


@SETTINGS
@hypothesis.given(inputs, bit_widths)
def test_levels_and_range(case, data, bits):
  x = _input(*data)
  y = np.asarray(case.fn(x, bits))
  assert np.all(np.isfinite(y))
  if case.groups:
    for g in range(case.groups):
      assert len(np.unique(y[..., g])) <= 2**bits
  else:
    assert len(np.unique(y)) <= 2**bits
  lo, hi = case.value_range(np.asarray(x), bits)
  assert y.min() >= lo - 1e-6 and y.max() <= hi + 1e-6


@SETTINGS
@hypothesis.given(inputs, bit_widths)
def test_idempotent(case, data, bits):
  if not case.idempotent:
    pytest.skip("tanh-normalised, recalibrated or interval-transformed quantizers are "
                "idempotent on their rounding stage only (see test_dorefa_levels_are_the_rounding_grid)")
  y = case.fn(_input(*data), bits)
  np.testing.assert_allclose(case.fn(y, bits), y, rtol=0, atol=1e-6)


def test_every_registered_quantizer_has_a_case():
  covered = {entry for c in CASES for entry in c.registered}
  identities = {("weight", "none"), ("activation", "none")}   # no levels, range or integer form to test
  registered = {(role, name) for role in ("weight", "activation") for name in quant.quantizer_names(role)}
  assert registered - identities <= covered, sorted(registered - identities - covered)


@pytest.mark.parametrize("bits", [32, 33, 64])
def test_full_precision_is_identity(case, bits):
  if case.full_precision_differs:
    pytest.skip(case.full_precision_differs)
  x = _input(0, 2.0)
  np.testing.assert_array_equal(case.fn(x, bits), x)
  grad = jax.grad(lambda v: jnp.sum(case.fn(v, bits) * 3.0))(x)
  np.testing.assert_array_equal(grad, 3.0 * jnp.ones_like(x))


@SETTINGS
@hypothesis.given(inputs, bit_widths)
def test_straight_through_gradient_mask(case, data, bits):
  if case.grad_mask is None:
    pytest.skip("gradient is that of the normalisation, tested in test_weight_surrogate_gradients")
  x = _input(*data)
  cotangent = _input(data[0] + 1, 1.0)
  grad = jax.grad(lambda v: jnp.sum(case.fn(v, bits) * cotangent))(x)
  expected = np.asarray(cotangent) * case.grad_mask(np.asarray(x), bits)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


@SETTINGS
@hypothesis.given(inputs, st.integers(1, 7))
def test_integer_form_round_trips_exactly(case, data, bits):
  x = _input(*data)
  encoded = case.integer(x, bits)
  codes = np.asarray(encoded.codes)
  assert codes.min() >= 0 and codes.max() < 2**bits
  np.testing.assert_array_equal(quant.dequantize(encoded), case.fn(x, bits))
  packed = quant.pack_codes(codes, bits)
  assert packed.size == quant.packed_size_bytes(codes.size, bits)
  np.testing.assert_array_equal(quant.unpack_codes(packed, bits, codes.size).reshape(codes.shape), codes)


def test_compiles_once_for_all_bit_widths(case):
  traces = []

  @jax.jit
  def step(x, bits):
    traces.append(1)
    return jax.value_and_grad(lambda v: jnp.sum(case.fn(v, bits) ** 2))(x)

  x = _input(1, 1.0)
  for bits in [8, 4, 2, 1, 32, 3]:
    step(x, jnp.int32(bits))
  assert len(traces) == 1


def test_vmap_over_bits_equals_loop(case):
  x = _input(2, 1.0)
  bit_set = jnp.array([32, 8, 6, 4, 2, 1], jnp.int32)
  batched = jax.vmap(case.fn, in_axes=(None, 0))(x, bit_set)
  for i, b in enumerate(bit_set.tolist()):
    np.testing.assert_array_equal(batched[i], case.fn(x, b))
