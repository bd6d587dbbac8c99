"""rebuild: the float forward of the exported codes reproduces the fake-quantized logits exactly."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from export_nets import CASES, build, inputs, random_variables, variants

from qflax import export, models, quant
from qflax import nn as qnn


def _jitted(model):
  return jax.jit(lambda v, x, p: model.apply(v, x, p, train=False))


@pytest.mark.parametrize("case", [c for c in CASES if c != "convnet-lsq-qilsigned-int8"])   # that one: integer tests
def test_rebuilt_logits_equal_fake_quantized(case):
  model, variables, plans, im = build(case)
  x = inputs(im.input_shape, batch=8)
  reference, rebuilt = _jitted(model), None
  for variant in variants(case):
    model_r, variables_r, plan_r = export.rebuild(im, variant)
    rebuilt = rebuilt or _jitted(model_r)   # one program per side: the plan is data
    # The dequantized codes equal the fake-quantized kernels bit for bit, and both programs run
    # the same activation quantizers, convolutions and BatchNorms on them: equal, not just close
    # (also eagerly, op by op; jitted here because one compile is cheaper than hundreds of ops).
    np.testing.assert_array_equal(rebuilt(variables_r, x, plan_r), reference(variables, x, plans[variant]),
                                  err_msg=f"{case} {variant}")


def test_rebuilt_model_has_no_weight_quantizer_and_one_slot():
  _, _, _, im = build("convnet-uniform-hwgq-int8")
  model, variables, plan = export.rebuild(im, "w4a4")
  assert model.spec.weight_quantizer == "none" and model.spec.num_slots == 1
  assert model.spec.fixed_layer_settings()[0]["weight_quantizer"] == "none"   # the int8 stem / classifier too
  assert np.all(np.asarray(plan.slot) == 0) and np.all(np.asarray(plan.w_bits) == 4)
  assert variables["batch_stats"]["blocks_0"]["bn"]["mean"].shape == (1, 4)


def test_export_rejects_a_model_it_does_not_name():
  model, variables, plans, im = build("convnet-sat-pact-fp")
  with pytest.raises(ValueError, match="model is not models.get_model"):
    export.integer_model(model, variables, plans, model_name="convnet", model_options={"widths": (4, 8, 16)},
                         num_classes=10, spec=model.spec, input_shape=im.input_shape)
  with pytest.raises(ValueError, match="rebuild|variant"):
    export.rebuild(im, "w3a3")


@pytest.mark.skipif("sat_fp_normalized" not in quant.quantizer_names("weight"), reason="quantizer not registered")
def test_full_precision_variant_stores_the_effective_kernel():
  spec = models.QuantSpec(bit_set=(32, 4), weight_quantizer="sat_fp_normalized", act_quantizer="pact")
  model = models.get_model("convnet", 10, spec, widths=(4, 4, 4))
  variables = random_variables("convnet", {"widths": (4, 4, 4)}, (8, 8, 1), spec)
  plans = {"fp32": qnn.uniform_plan(3, 32, spec.bit_set)}
  im = export.integer_model(model, variables, plans, model_name="convnet", model_options={"widths": (4, 4, 4)},
                            num_classes=10, spec=spec, input_shape=(8, 8, 1))
  rebuilt, rebuilt_variables, plan = export.rebuild(im, "fp32")
  x = inputs((8, 8, 1), batch=2)
  np.testing.assert_array_equal(_jitted(rebuilt)(rebuilt_variables, x, plan),
                                _jitted(model)(variables, x, plans["fp32"]))
