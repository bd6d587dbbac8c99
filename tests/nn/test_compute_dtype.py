"""bfloat16 compute: quantized products on the integer codes, float32 parameters.

bfloat16 has 8 significant bits, so every integer (and half-integer below 128) of
magnitude <= 256 is exact in it: the codes of an up-to-8-bit quantizer are. A
quantized convolution in bfloat16 therefore multiplies exactly and accumulates in
float32, and differs from the float32 layer only by float32 summation order and by
the final rounding of its output to bfloat16 (half an ulp: at most 2^-8 relative).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import models, quant
from qflax import nn as qnn

BF16_HALF_ULP = 2.0 ** -8        # rounding to bfloat16 (8 significant bits): |error| <= 2^-8 |y|
BIT_SET = (32, 8, 4, 2)


def _x(shape, seed=0, offset=0.0):
  return jax.random.normal(jax.random.key(seed), shape) + offset


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_every_quantizer_step_makes_exact_bfloat16_codes(role):
  """``apply / step`` is the integer form's ``codes - zero_point``: exact in bfloat16 at 1..8 bits."""
  x = _x((3, 3, 8, 16), offset=0.5 if role == "activation" else 0.0) * 0.5
  for name in quant.quantizer_names(role):
    q = quant.get_quantizer(name, role)
    quantize = jax.jit(lambda x, b, p, q=q: (q.apply(x, b, p), q.step(x, b, p)))   # one compilation for all bits
    for bits in (1, 2, 3, 4, 8):
      params = {k: jnp.asarray(v, jnp.float32) for k, v in (q.init(x, bits) if q.param_names else {}).items()}
      y, step = quantize(x, jnp.int32(bits), params)
      assert step.size == 1 or step.shape == (1, 1, 1, 16), (name, step.shape)
      codes = y / step
      assert float(jnp.max(jnp.abs(codes))) <= 256, (name, bits)
      if name != "none":
        exact = codes.astype(jnp.bfloat16).astype(jnp.float32) * step
        np.testing.assert_array_equal(exact, y, err_msg=f"{name} {bits}")
        if bits <= 4:
          encoded = q.integer(x, bits, params)
          np.testing.assert_allclose(step, jnp.broadcast_to(encoded.scale, step.shape), rtol=1e-6, err_msg=name)
    assert float(jnp.max(q.step(x, 32, params))) == 1.0, name


@pytest.mark.parametrize("weight,act", [("sat", "pact"), ("uniform", "uniform_unsigned"), ("dorefa", "hwgq"),
                                        ("qil", "qil"), ("lsq", "lsq")])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantized_product_on_codes_equals_float32(weight, act, bits):
  """Before the output is rounded, the bfloat16 product on codes is float32's up to summation order
  (rounding the fake-quantized operands to bfloat16 instead would be off by ~2^-9 per operand)."""
  wq, aq = quant.get_quantizer(weight, "weight"), quant.get_quantizer(act, "activation")
  x, w = jnp.abs(_x((64, 96), 1)), _x((96, 32), 2) * 0.1
  pa = {k: jnp.asarray(v, jnp.float32) for k, v in aq.init(x, bits).items()}
  pw = {k: jnp.asarray(v, jnp.float32) for k, v in wq.init(w, bits).items()}
  x_q, w_q = aq.apply(x, bits, pa), wq.apply(w, bits, pw)
  exact = x_q @ w_q
  ours = qnn.quantized_product(jnp.matmul, x_q, w_q, aq.step(x, bits, pa), wq.step(w, bits, pw), jnp.bfloat16)
  assert ours.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(exact)))
  np.testing.assert_allclose(ours, exact, rtol=1e-5, atol=1e-5 * scale)


def _conv_pair(weight_quantizer, act_quantizer, features=32, **kw):
  make = lambda dtype: qnn.QuantConv(features, (3, 3), weight_quantizer=weight_quantizer, act_quantizer=act_quantizer,
                                     bit_set=BIT_SET, act_param_init={"alpha": 3.0}, dtype=dtype, **kw)
  return make("float32"), make("bfloat16")


@pytest.mark.parametrize("weight,act", [("sat", "pact"), ("sat_centered", "pact_adabits"), ("uniform", "pact")])
def test_quantized_conv_in_bfloat16_agrees_with_float32(weight, act):
  """At 2, 4 and 8 bits the bfloat16 layer is the float32 layer rounded to bfloat16:
  ``|y_bf16 - y_fp32| <= 2^-8 |y_fp32|`` plus float32 summation noise; at full precision
  (operands rounded to bfloat16) the relative RMS error stays below 2^-7."""
  conv32, conv16 = _conv_pair(weight, act)
  x = _x((4, 12, 12, 16), 3)
  variables = conv32.init(jax.random.key(0), x, qnn.BlockPrecision(4, 4, 2))
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a: a.dtype == jnp.float32, variables))
  for bits in (8, 4, 2, 32):
    p = qnn.BlockPrecision(jnp.int32(bits), jnp.int32(bits), jnp.int32(BIT_SET.index(bits)))
    y32 = jax.jit(conv32.apply)(variables, x, p)
    y16 = jax.jit(conv16.apply)(variables, x.astype(jnp.bfloat16) if bits == 32 else x, p)
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    error = jnp.abs(y16.astype(jnp.float32) - y32)
    if bits < 32:
      bound = BF16_HALF_ULP * jnp.abs(y32) + 1e-5 * float(jnp.max(jnp.abs(y32)))
      assert bool(jnp.all(error <= bound)), (bits, float(jnp.max(error - bound)))
    else:
      assert float(jnp.linalg.norm(error) / jnp.linalg.norm(y32)) < 2.0 ** -7


def test_depthwise_and_dense_layers_in_bfloat16():
  x = jnp.abs(_x((4, 8, 8, 16), 4))
  conv32, conv16 = _conv_pair("uniform", "uniform_unsigned", features=16, feature_group_count=16)
  variables = conv32.init(jax.random.key(0), x, qnn.BlockPrecision(8, 8, 1))
  p = qnn.BlockPrecision(8, 8, 1)
  y32, y16 = jax.jit(conv32.apply)(variables, x, p), jax.jit(conv16.apply)(variables, x, p)
  assert bool(jnp.all(jnp.abs(y16.astype(jnp.float32) - y32) <= BF16_HALF_ULP * jnp.abs(y32) + 1e-5))
  dense = lambda dtype: qnn.QuantDense(10, weight_quantizer="uniform", act_quantizer="uniform_unsigned",
                                       bit_set=(8,), dtype=dtype)
  h = x.reshape(4, -1)
  variables = dense("float32").init(jax.random.key(1), h, qnn.BlockPrecision(8, 8, 0))
  z32 = jax.jit(dense("float32").apply)(variables, h, qnn.BlockPrecision(8, 8, 0))
  z16 = jax.jit(dense("bfloat16").apply)(variables, h, qnn.BlockPrecision(8, 8, 0))
  assert z16.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.abs(z16.astype(jnp.float32) - z32) <= BF16_HALF_ULP * jnp.abs(z32) + 1e-5))


def test_bfloat16_gradients_follow_the_float32_ones():
  """Gradients reach the kernel and PACT's clip through the same straight-through estimators."""
  conv32, conv16 = _conv_pair("sat", "pact")
  x = _x((4, 12, 12, 16), 5)
  variables = conv32.init(jax.random.key(0), x, qnn.BlockPrecision(4, 4, 2))

  def grads(conv):
    loss = lambda v: jnp.mean(jnp.square(conv.apply(v, x, qnn.BlockPrecision(4, 4, 2)).astype(jnp.float32) - 0.5))
    return jax.jit(jax.grad(loss))(variables)["params"]
  g32, g16 = grads(conv32), grads(conv16)
  for name in ("kernel", "input_alpha"):
    assert g16[name].dtype == jnp.float32
    cosine = jnp.vdot(g16[name], g32[name]) / (jnp.linalg.norm(g16[name]) * jnp.linalg.norm(g32[name]))
    assert float(cosine) > 0.999, name
    assert float(jnp.linalg.norm(g16[name]) / jnp.linalg.norm(g32[name])) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("name,options", [("resnet8", {}), ("convnet", {"widths": (8, 8, 8)})])
def test_models_in_bfloat16(name, options):
  """Activations between blocks are bfloat16; logits, the returned features, parameters
  and BatchNorm statistics float32. At full precision the logits agree with float32's
  to a few bfloat16 roundings per block (relative error < 2^-5). Quantized plans are
  not compared value by value: rounding an activation to bfloat16 moves it across a
  rounding threshold of the next quantizer now and then, a whole step, and deeper
  blocks amplify that; their agreement is an accuracy one (``tests/train``)."""
  shape = (2, 28, 28, 1) if name == "convnet" else (2, 8, 8, 3)
  spec = models.QuantSpec(bit_set=(32, 4), weight_quantizer="sat", act_quantizer="pact",
                          signed_act_quantizer="lsq_signed", act_param_init=(("alpha", 3.0),), first_last="int8")
  m32 = models.get_model(name, 10, spec, **options)
  m16 = models.get_model(name, 10, dataclasses.replace(spec, compute_dtype="bfloat16"), **options)
  x = _x(shape, 6)
  variables = jax.jit(m32.init)(jax.random.key(0), x, qnn.uniform_plan(m32.num_blocks, 4, spec.bit_set))

  @jax.jit
  def run(variables, x, plan):
    (logits, features), state = m16.apply(variables, x, plan, train=True, return_features=True,
                                          mutable=["batch_stats"])
    h = m16.apply(variables, m16.apply(variables, x, method=m16.stem), plan, 0, 1, method=m16.run_blocks)
    return logits, features, state, h, m16.apply(variables, x, plan), m32.apply(variables, x, plan)
  for bits in (4, 32):
    logits, features, state, h, ours, ref = run(variables, x, qnn.uniform_plan(m32.num_blocks, bits, spec.bit_set))
    assert logits.dtype == ours.dtype == jnp.float32 and all(f.dtype == jnp.float32 for f in features)
    assert h.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves({"v": variables, "s": state}))
    assert bool(jnp.all(jnp.isfinite(ours)))
  assert float(jnp.linalg.norm(ours - ref) / jnp.linalg.norm(ref)) < 2.0 ** -5


def test_bad_compute_dtype_is_refused():
  with pytest.raises(ValueError, match="compute_dtype"):
    models.QuantSpec(compute_dtype="float16")
  with pytest.raises(ValueError, match="not supported"):
    qnn.QuantConv(4, dtype="float16").init(jax.random.key(0), jnp.ones((1, 4, 4, 1)), qnn.BlockPrecision(32, 32, 0))
