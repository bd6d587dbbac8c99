"""Models: published sizes, segment-wise execution, precision plans, TSM."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from qflax import models
from qflax import nn as qnn

BIT_SET = (32, 4, 2)
QSPEC = models.QuantSpec(bit_set=BIT_SET, weight_quantizer="sat", act_quantizer="pact",
                         signed_act_quantizer="lsq_signed")
FP_SPEC = models.QuantSpec(bit_set=BIT_SET)


def _plan(model, bits, bit_set=BIT_SET):
  return qnn.uniform_plan(model.num_blocks, bits, bit_set)


@pytest.mark.parametrize("name,shape,classes,millions,tol", [
    ("resnet20", (1, 32, 32, 3), 10, 0.27, 0.01),
    ("resnet18", (1, 224, 224, 3), 1000, 11.69, 0.01),
    ("resnet50", (1, 224, 224, 3), 1000, 25.56, 0.01),
    ("mobilenet_v2", (1, 224, 224, 3), 1000, 3.50, 0.01),
])
def test_parameter_counts_match_published(name, shape, classes, millions, tol):
  model = models.get_model(name, classes, QSPEC)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), _plan(model, 4)))
  assert abs(models.count_params(variables["params"]) / 1e6 - millions) <= tol


def test_macs_resnet20():
  model = models.get_model("resnet20", 10)
  x = jnp.zeros((1, 32, 32, 3))
  plan = _plan(model, 32, (32,))
  variables = model.init(jax.random.key(0), x, plan)
  assert 40e6 <= models.count_macs(model, variables, x, plan) <= 42e6   # published ~41 M


SMALL = [
    ("resnet8", (2, 28, 28, 1), {}),
    ("preact_resnet8", (2, 16, 16, 3), {}),
    ("convnet", (2, 28, 28, 1), {"widths": (8, 16, 16)}),
    ("mobilenet_v2", (2, 32, 32, 3), {"width": 0.35, "cifar_stem": True}),
    ("tsm_resnet8", (2, 4, 16, 16, 3), {"num_frames": 4}),
]


def _small(name, shape, options, spec=QSPEC):
  model = models.get_model(name, 10, spec, **options)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  variables = model.init(jax.random.key(0), x, _plan(model, 4, spec.bit_set))
  return model, x, variables


@pytest.mark.parametrize("name,shape,options", SMALL, ids=[s[0] for s in SMALL])
def test_segments_compose_to_the_full_forward(name, shape, options):
  model, x, variables = _small(name, shape, options)
  plan = qnn.make_plan(*zip(*[(b, b, BIT_SET.index(b)) for b in
                              np.resize([4, 2, 32], model.num_blocks).tolist()]), num_slots=3)
  full, features = model.apply(variables, x, plan, return_features=True)
  assert len(features) == model.num_blocks
  h = model.apply(variables, x, method=model.stem)
  split = model.num_blocks // 2
  h = model.apply(variables, h, plan, 0, split, method=model.run_blocks)
  np.testing.assert_array_equal(h, features[split - 1])
  h = model.apply(variables, h, plan, split, model.num_blocks, method=model.run_blocks)
  np.testing.assert_array_equal(model.apply(variables, h, plan, method=model.head), full)


def _without_quantizer_scalars(params):
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not k[-1].startswith(("input_", "kernel_"))})


@pytest.mark.parametrize("name,shape,options", SMALL, ids=[s[0] for s in SMALL])
def test_all_bits_32_equals_the_unquantized_network(name, shape, options):
  model, x, variables = _small(name, shape, options)
  fp_model = models.get_model(name, 10, FP_SPEC, **options)
  fp_vars = {"params": _without_quantizer_scalars(variables["params"]), "batch_stats": variables["batch_stats"]}
  # Training mode (batch statistics) keeps activations at a useful scale at init.
  def run(m, v, bits):
    return m.apply(v, x, _plan(m, bits), train=True, mutable=["batch_stats"])[0]

  quantized32 = run(model, variables, 32)
  np.testing.assert_allclose(quantized32, run(fp_model, fp_vars, 32), rtol=1e-5, atol=1e-5)
  assert not np.allclose(run(model, variables, 2), quantized32, atol=1e-3 * float(jnp.abs(quantized32).max()))


def test_training_mode_updates_the_plans_slot_only():
  model, x, variables = _small("resnet8", (4, 28, 28, 1), {})
  _, updates = model.apply(variables, x, _plan(model, 2), train=True, mutable=["batch_stats"])
  mean = np.asarray(updates["batch_stats"]["blocks_0"]["bn1"]["mean"])
  assert np.any(mean[2] != 0) and np.all(mean[[0, 1]] == 0)


def test_first_last_int8():
  spec = models.QuantSpec(bit_set=BIT_SET, weight_quantizer="sat", act_quantizer="pact", first_last="int8")
  model, x, variables = _small("resnet8", (2, 28, 28, 1), {}, spec)
  fp_model, _, _ = _small("resnet8", (2, 28, 28, 1), {})
  a = model.apply(variables, x, _plan(model, 32))
  b = fp_model.apply(variables, x, _plan(model, 32))
  assert a.shape == b.shape and not np.allclose(a, b)
  np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.abs(b).max()))


def test_temporal_shift():
  x = jnp.arange(2 * 3 * 1 * 1 * 16, dtype=jnp.float32).reshape(6, 1, 1, 16)
  y = models.temporal_shift(x, 3).reshape(2, 3, 16)
  v = x.reshape(2, 3, 16)
  np.testing.assert_array_equal(y[:, 1:, :2], v[:, :-1, :2])     # forward in time
  np.testing.assert_array_equal(y[:, 0, :2], 0)
  np.testing.assert_array_equal(y[:, :-1, 2:4], v[:, 1:, 2:4])   # backward in time
  np.testing.assert_array_equal(y[:, -1, 2:4], 0)
  np.testing.assert_array_equal(y[..., 4:], v[..., 4:])


def test_tsm_clip_logits_are_the_mean_over_frames():
  model, x, variables = _small("tsm_resnet8", (2, 4, 16, 16, 3), {"num_frames": 4})
  plan = _plan(model, 4)
  logits = model.apply(variables, x, plan)
  assert logits.shape == (2, 10)
  h = model.apply(variables, x, method=model.stem)
  h = model.apply(variables, h, plan, 0, model.num_blocks, method=model.run_blocks)
  assert h.shape[0] == 8   # frames folded into the batch


def test_errors():
  with pytest.raises(ValueError, match="resnet21"):
    models.get_model("resnet21", 10)
  with pytest.raises(ValueError, match="first_last"):
    models.QuantSpec(first_last="int4")
  with pytest.raises(ValueError, match="bit_set"):
    models.QuantSpec(bit_set=(32, 12))
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("resnet20", 0)
  with pytest.raises(ValueError, match="bad options"):
    models.get_model("resnet20", 10, depth_multiplier=2)
  model, x, variables = _small("resnet8", (2, 28, 28, 1), {})
  with pytest.raises(ValueError, match="precision plan has 5 blocks"):
    model.apply(variables, x, qnn.uniform_plan(5, 4, BIT_SET))


def test_int8_classifier_input_is_quantized_unsigned():
  """Pooled ReLU features are non-negative: a signed 8-bit grid would waste half its codes."""
  import flax
  from flax import traverse_util
  spec = models.QuantSpec(bit_set=(4,), weight_quantizer="sat", act_quantizer="pact", first_last="int8")
  model = models.get_model("resnet8", 10, spec)
  plan = qnn.uniform_plan(model.num_blocks, 4, (4,))
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, plan)
  _, sown = model.apply(variables, x, plan, mutable=[qnn.QUANT_STATS])
  stats = {"/".join(k): v[0] for k, v in traverse_util.flatten_dict(flax.core.unfreeze(sown[qnn.QUANT_STATS])).items()}
  classifier = next(v for k, v in stats.items() if k.startswith("classifier") and k.endswith("input"))
  stem = next(v for k, v in stats.items() if k.startswith("stem") and k.endswith("input"))
  assert float(classifier["zero_point"]) == 0 and float(stem["zero_point"]) == 128
  # Zero point 0 and the largest feature at code 255: the 256 codes span [0, max], where a signed
  # grid would spend its lower half on negative values that never occur.
  assert float(classifier["top_fraction"]) > 0
