"""QuantConv / QuantDense: precision as data, slots, calibration, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import nn as qnn
from qflax import quant

BIT_SET = (32, 8, 4, 2, 1)


def _x(shape=(4, 8, 8, 6), seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _conv(**kw):
  kw = {"weight_quantizer": "sat", "act_quantizer": "pact", "bit_set": BIT_SET, **kw}
  return qnn.QuantConv(8, (3, 3), **kw)


def _precision(bits):
  return qnn.BlockPrecision(jnp.int32(bits), jnp.int32(bits), jnp.int32(BIT_SET.index(bits)))


@pytest.mark.parametrize("wq,aq", [("sat", "pact"), ("lsq", "lsq"), ("qil", "qil"), ("dorefa", "clamp"),
                                   ("uniform", "hwgq")])
def test_forward_backward_compiles_once_for_five_plans(wq, aq):
  conv = _conv(weight_quantizer=wq, act_quantizer=aq)
  x = jnp.abs(_x())
  variables = conv.init(jax.random.key(0), x, _precision(4))
  traces = []

  @jax.jit
  def step(params, x, precision):
    traces.append(1)
    return jax.value_and_grad(lambda p: jnp.sum(conv.apply({"params": p}, x, precision) ** 2))(params)

  losses = []
  for bits in BIT_SET:
    loss, grads = step(variables["params"], x, _precision(bits))
    losses.append(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert len(traces) == 1
  assert len(set(losses)) == len(BIT_SET)   # the plans really differ


def test_vmap_over_bit_widths_equals_loop():
  conv = _conv()
  x = jnp.abs(_x())
  variables = conv.init(jax.random.key(0), x, _precision(8))
  stacked = qnn.BlockPrecision(jnp.array(BIT_SET), jnp.array(BIT_SET), jnp.arange(len(BIT_SET)))
  batched = jax.vmap(lambda p: conv.apply(variables, x, p))(stacked)
  for i, bits in enumerate(BIT_SET):
    np.testing.assert_allclose(batched[i], conv.apply(variables, x, _precision(bits)), rtol=1e-6, atol=1e-6)


def test_full_precision_equals_plain_flax_layers():
  x = _x()
  conv = qnn.QuantConv(8, (3, 3), strides=2, use_bias=True, weight_quantizer="sat", act_quantizer="pact",
                       bit_set=BIT_SET)
  variables = conv.init(jax.random.key(1), x, _precision(32))
  params = variables["params"]
  plain = nn.Conv(8, (3, 3), strides=2, padding="SAME").apply(
      {"params": {"kernel": params["kernel"], "bias": params["bias"]}}, x)
  np.testing.assert_allclose(conv.apply(variables, x, _precision(32)), plain, rtol=1e-5, atol=1e-5)

  dense = qnn.QuantDense(5, weight_quantizer="lsq", act_quantizer="lsq", bit_set=BIT_SET)
  flat = x.reshape(4, -1)
  dvars = dense.init(jax.random.key(2), flat, _precision(32))
  plain = nn.Dense(5).apply({"params": {k: dvars["params"][k] for k in ("kernel", "bias")}}, flat)
  np.testing.assert_allclose(dense.apply(dvars, flat, _precision(32)), plain, rtol=1e-5, atol=1e-5)


def test_quantized_forward_uses_the_quantizers():
  conv = _conv(act_param_init={"alpha": 2.0})
  x = _x()
  variables = conv.init(jax.random.key(0), x, _precision(4))
  p = variables["params"]
  assert p["input_alpha"].shape == (len(BIT_SET),)
  np.testing.assert_array_equal(p["input_alpha"], 2.0)
  xq = quant.pact(x, 2.0, 4)
  wq = quant.sat_weight(p["kernel"], 4)
  want = jax.lax.conv_general_dilated(xq, wq, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv.apply(variables, x, _precision(4)), want, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_only_the_selected_slot():
  conv = _conv(act_param_init={"alpha": 0.5})
  x = _x() * 3
  variables = conv.init(jax.random.key(0), x, _precision(4))
  grads = jax.grad(lambda p: jnp.sum(conv.apply({"params": p}, x, _precision(2))))(variables["params"])
  g = np.asarray(grads["input_alpha"])
  slot = BIT_SET.index(2)
  assert g[slot] != 0 and np.all(np.delete(g, slot) == 0)


def test_depthwise_convolution():
  x = _x()
  conv = qnn.QuantConv(6, (3, 3), feature_group_count=6, weight_quantizer="sat", bit_set=BIT_SET)
  variables = conv.init(jax.random.key(0), x, _precision(4))
  assert variables["params"]["kernel"].shape == (3, 3, 1, 6)
  assert conv.apply(variables, x, _precision(4)).shape == x.shape


def test_calibration_sets_each_slot_from_data():
  conv = _conv(weight_quantizer="lsq", act_quantizer="pact")
  batches = [jnp.abs(_x(seed=s)) * (s + 1) for s in range(3)]
  variables = conv.init(jax.random.key(0), batches[0], _precision(4))
  plans = [qnn.make_plan([b], [b], [BIT_SET.index(b)], len(BIT_SET)) for b in (4, 2)]

  def apply(v, x, plan, **kw):
    return conv.apply(v, x, plan.block(0), **kw)

  calibrated = qnn.calibrate(apply, variables, batches, plans)
  alpha = np.asarray(calibrated["params"]["input_alpha"])
  for bits in (4, 2):   # PACT's bits-aware clip, averaged over the batches
    want = np.mean([quant.pact_init_alpha(b, bits) for b in batches])
    np.testing.assert_allclose(alpha[BIT_SET.index(bits)], want, rtol=1e-4)
  assert alpha[BIT_SET.index(2)] < alpha[BIT_SET.index(4)]
  np.testing.assert_array_equal(alpha[[0, 1, 4]], np.asarray(variables["params"]["input_alpha"])[[0, 1, 4]])
  step = np.asarray(calibrated["params"]["kernel_step"])
  kernel = variables["params"]["kernel"]
  np.testing.assert_allclose(step[3], quant.lsq_init_step(kernel, 2, signed=True), rtol=1e-5)
  with pytest.raises(ValueError, match="batch"):
    qnn.calibrate(apply, variables, [], plans)


def test_calibration_refuses_a_plan_it_cannot_run():
  # The forward pass is jitted, so the layers see traced plans and cannot check them.
  conv = _conv(weight_quantizer="lsq", act_quantizer="pact")
  x = jnp.abs(_x())
  variables = conv.init(jax.random.key(0), x, _precision(4))

  def apply(v, x, plan, **kw):
    return conv.apply(v, x, plan.block(0), **kw)

  plan = qnn.make_plan([4], [4], [BIT_SET.index(4)], len(BIT_SET))
  with pytest.raises(ValueError, match="w_bits"):
    qnn.calibrate(apply, variables, [x], [plan._replace(w_bits=jnp.array([9]))])
  with pytest.raises(ValueError, match="slot=7"):
    qnn.calibrate(apply, variables, [x], [plan._replace(slot=jnp.array([7]))])


def test_errors_name_the_argument():
  x = _x()
  conv = _conv()
  variables = conv.init(jax.random.key(0), x, _precision(4))
  with pytest.raises(ValueError, match="slot"):
    conv.apply(variables, x, qnn.BlockPrecision(4, 4, 5))
  with pytest.raises(ValueError, match="w_bits"):
    conv.apply(variables, x, qnn.BlockPrecision(9, 4, 1))
  with pytest.raises(ValueError, match="a_bits"):
    conv.apply(variables, x, qnn.BlockPrecision(4, 0, 1))
  with pytest.raises(ValueError, match="weight quantizer 'sta'"):
    _conv(weight_quantizer="sta").init(jax.random.key(0), x, _precision(4))
  with pytest.raises(ValueError, match="bit_set"):
    _conv(bit_set=(32, 16)).init(jax.random.key(0), x, _precision(32))
  with pytest.raises(ValueError, match="not in the model's bit set"):
    qnn.uniform_plan(3, 6, BIT_SET)
  with pytest.raises(ValueError, match="slots"):
    qnn.make_plan([4, 4], [4, 4], [0, 7], num_slots=5)
  with pytest.raises(ValueError, match="w_bits"):
    qnn.make_plan([4, 2.5], [4, 4], [0, 1], num_slots=5)


def test_plans():
  plan = qnn.uniform_plan(4, 4, BIT_SET)
  np.testing.assert_array_equal(plan.slot, [2] * 4)
  teacher = qnn.uniform_plan(4, 8, BIT_SET)
  mixed = qnn.mix_plans(jnp.array([True, False, True, False]), teacher, plan)
  np.testing.assert_array_equal(mixed.w_bits, [8, 4, 8, 4])
  np.testing.assert_array_equal(mixed.slot, [1, 2, 1, 2])
  assert mixed.block(2) == (8, 8, 1)


def test_a_plan_read_as_numpy_keeps_its_values():
  traced = jax.jit(lambda: qnn.make_plan([4, 8], [2, 8], [2, 1], num_slots=5))()
  plan = traced.numpy()
  assert isinstance(plan, qnn.PrecisionPlan)
  assert all(isinstance(a, np.ndarray) for a in plan)
  np.testing.assert_array_equal(plan.w_bits, [4, 8])
  np.testing.assert_array_equal(plan.slot, [2, 1])
