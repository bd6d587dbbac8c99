"""Integer inference against the fake-quantized float forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from export_nets import build, inputs

from qflax import export, quant
from qflax import nn as qnn
from qflax.export._src import inference

# (case, variant): every quantizer pair once; half-integer weight zero points (SAT, DoReFa), signed
# activation codes (QIL signed), int16 operands (8-bit unsigned codes), int8 first / last layers.
LAYER_CASES = [("convnet-sat-pact-fp", "w8a8"), ("resnet8-dorefa-clamp-int8", "w4a4"),
               ("convnet-lsq-qilsigned-int8", "w2a2"), ("convnet-uniform-hwgq-int8", "w2a2")]


@pytest.mark.parametrize("case,variant", LAYER_CASES)
def test_each_layer_agrees_to_float32_rounding(case, variant):
  """On the same input, ``|y_int - y_float| <= (fan_in + 8) u sum|x_q||w_q| + u (|y_int| + |y_float|)``
  per output (``u = 2^-24``): the int32 sum is exact, the float32 dot product of ``fan_in``
  terms is off by at most ``gamma_fan_in sum|x_q||w_q|`` in any order (see ``export.LayerError``)."""
  _, _, _, im = build(case)
  errors = export.layer_errors(im, variant, inputs(im.input_shape, batch=16, seed=2))
  assert set(errors) == set(export.integer_layers(im, variant)) and errors
  for path, e in errors.items():
    assert e.bound_ratio <= 1.0, (path, e)
    assert 255 * 255 * e.fan_in < export.ACCUMULATOR_LIMIT


@pytest.mark.parametrize("case,variant", [("convnet-sat-pact-fp", "w8a8"), ("convnet-sat-pact-fp", "w4a4"),
                                          ("resnet8-dorefa-clamp-int8", "w2a2")])
def test_logits_agree_with_fake_quantized(case, variant):
  """End to end the layers' rounding differences can flip a requantized code (an input within a
  few ulp of a rounding boundary), which moves one activation by one step ``range / (2^k - 1)``.
  So: argmax agreement >= 99 %; every logit within two such steps of the logit scale; and at
  <= 4 bits, where a flip needs an input within ~1e-6 of a boundary spaced >= 1/15 of the range
  apart, >= 99 % of the examples with all logits equal to 1e-5 of the logit scale."""
  model, variables, plans, im = build(case)
  x = inputs(im.input_shape, batch=256, seed=3)
  expected = np.asarray(jax.jit(lambda v, x, p: model.apply(v, x, p, train=False))(variables, x, plans[variant]))
  apply_fn, operands = export.integer_forward(im, variant)
  got = np.asarray(jax.jit(apply_fn)(operands, x))
  layers = [im.variants[variant].layers[p] for p in export.integer_layers(im, variant)]
  a_bits = min(layer.activation.bits for layer in layers)
  scale = np.abs(expected).max()
  assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.99
  np.testing.assert_allclose(got, expected, rtol=0, atol=2 * scale / (2**a_bits - 1))
  if a_bits <= 4:
    assert np.mean(np.all(np.abs(got - expected) <= 1e-5 * scale, axis=-1)) >= 0.99


def test_integer_path_runs_on_int8_codes_with_int32_sums():
  _, _, _, im = build("convnet-sat-pact-fp")
  assert export.integer_layers(im, "w32a32") == []   # full precision everywhere: the float forward as is
  _, operands = export.integer_forward(im, "w4a4")
  kernels = operands["kernels"]
  assert set(kernels) == {"blocks_0/conv", "blocks_1/conv", "blocks_2/conv"}   # the fp stem / classifier stay float
  assert all(k["w"].dtype == jnp.int8 for k in kernels.values())
  assert all(np.abs(np.asarray(k["w"])).max() <= 15 for k in kernels.values())   # SAT 4-bit doubled: odd, |w| <= 15
  assert "kernel" not in operands["variables"]["params"]["blocks_0"]["conv"]      # never read
  _, operands = export.integer_forward(im, "w8a8")
  assert all(k["w"].dtype == jnp.int16 for k in operands["kernels"].values())     # 8-bit codes do not fit int8


def test_grouped_convolution_on_integers():
  """A depthwise layer (MobileNetV2's) on integer operands equals the float conv of the dequantized ones."""
  rng = np.random.default_rng(0)
  conv = qnn.QuantConv(8, (3, 3), 2, "SAME", feature_group_count=8)
  codes = rng.integers(0, 16, (3, 3, 1, 8))
  w_scale, zp = np.float32(0.03), np.float32(7.5)
  act = export.Activation("lsq_signed", 4, {"step": 0.25})
  kernel = inference.IntegerKernel(act, 1, 8, jnp.int8, 9)
  arrays = {"w": jnp.asarray(2 * codes - 15, jnp.int8), "scale": jnp.asarray([w_scale / 2])}
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 8)), jnp.float32)
  got = inference.integer_layer(conv, x, kernel, arrays)
  x_q = quant.lsq(x, 0.25, 4, signed=True)
  w_q = jnp.asarray((codes - zp) * w_scale, jnp.float32)
  expected = jax.lax.conv_general_dilated(x_q, w_q, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          feature_group_count=8)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def _dense_model(fan_in: int):
  """A one-layer integer model: SAT-like 8-bit codes 0..255 with zero point 127.5 (|w_int| <= 255
  once doubled) behind 8-bit PACT codes 0..255: the worst case for the int32 accumulator."""
  codes = np.zeros((fan_in, 1), np.int64)
  codes[0, 0] = 255
  tensors = {"k": export.PackedCodes.pack(codes, 8), "s": np.float32(0.01), "z": np.float32(127.5)}
  layer = export.LinearLayer("k", "s", "z", None, export.Activation("pact", 8, {"alpha": 2.0}))
  return export.IntegerModel("convnet", {}, 1, None, (1,), {}, tensors), layer


def test_int32_accumulation_bound():
  """``255 * 255 * fan_in < 2^31`` holds up to fan_in = 33025 (ResNet-20's largest is 576)."""
  im, layer = _dense_model(33025)
  assert inference._prepare_layer(im, "dense", layer)[0].fan_in == 33025
  im, layer = _dense_model(33026)
  with pytest.raises(ValueError, match="overflow"):
    inference._prepare_layer(im, "dense", layer)


def test_raw_integer_images_are_refused():
  """Reported defect: ``integer_logits`` on uint8 images gave wrong logits without an error
  (it takes the normalised float input, like the float forward)."""
  _, _, _, im = build("convnet-sat-pact-fp")
  x = inputs(im.input_shape, batch=4, seed=1)
  raw = np.clip(np.asarray(x) * 64 + 128, 0, 255).astype(np.uint8)
  for fn in (export.integer_logits, export.layer_errors):
    with pytest.raises(TypeError, match=r"normalised as in training .* not uint8 images"):
      fn(im, "w4a4", raw)
  assert export.integer_logits(im, "w4a4", x).shape == (4, im.num_classes)


def test_inputs_the_model_cannot_take_are_refused():
  """Reported defect: NaN and inf inputs gave the logits of zeros, a 9x9 input on an 8x8 model
  gave logits, other shapes raised Flax's ScopeParamShapeError or a convolution TypeError from deep
  in the stack, and an empty batch raised ZeroDivisionError."""
  _, _, _, im = build("convnet-sat-pact-fp")
  x = np.asarray(inputs(im.input_shape, batch=4, seed=1))
  height, width, channels = im.input_shape
  for fn in (export.integer_logits, export.layer_errors):
    for bad in (np.full_like(x, np.nan), np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x)):
      with pytest.raises(ValueError, match="NaN or infinite"):
        fn(im, "w4a4", bad)
    for shape in ((4, height + 1, width + 1, channels), (4, height, width, channels + 2), (height, width, channels),
                  (4, height * width * channels)):
      with pytest.raises(ValueError, match=rf"input of shape \(batch, {height}, {width}, {channels}\) expected"):
        fn(im, "w4a4", np.zeros(shape, np.float32))
  assert export.integer_logits(im, "w4a4", x[:0]).shape == (0, im.num_classes)
  with pytest.raises(ValueError, match="at least one input"):
    export.layer_errors(im, "w4a4", x[:0])
  with pytest.raises(ValueError, match="w9a9"):
    export.integer_logits(im, "w9a9", x[:0])
  # Reported (review): the NaN check made integer_logits fail under jax.jit and jax.vmap.
  np.testing.assert_allclose(jax.jit(lambda x: export.integer_logits(im, "w4a4", x))(x),
                             export.integer_logits(im, "w4a4", x), rtol=1e-5, atol=1e-5)
