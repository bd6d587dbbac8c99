"""CMT-KD: fusion, importance gradients, MinLogit, vmapped teachers, ablations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batches import build, tiny_batch
from qflax import distill, quant, train
from qflax.methods import networks


def _cmtkd(c, weight_quantizer="uniform_layer", **options):
  c.method.name = "cmtkd"
  c.method.teacher_bits = (8, 6, 4)
  c.method.fusion_points = (1, 2)
  for k, v in options.items():
    c.method[k] = v
  c.model.options = {"widths": (4, 8, 16)} if c.model.name == "convnet" else {"width": 0.25}
  c.bits = (2,)
  c.quant.weight_quantizer = weight_quantizer
  c.quant.act_quantizer = "hwgq"
  method = build(c)
  x, y = tiny_batch()
  state = jax.jit(method.init_state)(jax.random.key(0))
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32)
  state = state.replace(params={**state.params, "importance": {"logits": logits}})
  return method, state, x, y


def _equal(a, b):
  return all(np.array_equal(u, v) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_fused_feature_is_the_weighted_sum_and_enters_every_teacher(tiny_config):
  method, state, x, y = _cmtkd(tiny_config)
  _, _, fused, _, teacher_features, _ = method.forward(state.params, state.batch_stats, x, fuse=True,
                                                       train_teachers=False)
  pi = jax.nn.softmax(state.params["importance"]["logits"], axis=-1)
  hwgq = quant.get_quantizer("hwgq", "activation")
  model = method.model

  def teacher(i):
    variables = {"params": jax.tree_util.tree_map(lambda a: a[i], state.params["teachers"]),
                 "batch_stats": jax.tree_util.tree_map(lambda a: a[i], state.batch_stats["teachers"])}
    return variables, networks.plan_at(method.teacher_plans, i)

  by_hand = []
  for i, bits in enumerate((8, 6, 4)):
    variables, plan = teacher(i)
    h = model.apply(variables, x, train=False, method=model.stem)
    h = model.apply(variables, h, plan, 0, 1, train=False, method=model.run_blocks)
    np.testing.assert_allclose(teacher_features[0][i], h, rtol=1e-5, atol=1e-6)
    by_hand.append(hwgq.apply(h, bits, {}))
  expected = sum(pi[0, i] * by_hand[i] for i in range(3))
  np.testing.assert_allclose(fused[0], expected, rtol=1e-5, atol=1e-6)
  # Every teacher's second segment starts from the fused feature, not its own.
  for i in range(3):
    variables, plan = teacher(i)
    h = model.apply(variables, fused[0], plan, 1, 2, train=False, method=model.run_blocks)
    np.testing.assert_allclose(teacher_features[1][i], h, rtol=1e-5, atol=1e-6)


def test_importance_logits_receive_gradients(tiny_config):
  method, state, x, y = _cmtkd(tiny_config)
  grads = jax.grad(lambda p: method.loss({**state.params, "importance": p}, state.batch_stats, x, y, "cmtkd")[0])(
      state.params["importance"])
  assert np.all(np.isfinite(grads["logits"])) and np.any(grads["logits"] != 0)
  new_state, metrics = jax.jit(method.train_step, static_argnums=4)(state, x, y, jax.random.key(0), 0)
  assert not _equal(new_state.params["importance"], state.params["importance"])
  assert "importance/0/w8" in metrics


def test_min_logit_matches_a_hand_computation():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 5)
  expected = np.empty((5, 7), np.float32)
  for n in range(5):
    for c in range(7):
      expected[n, c] = min(logits[m, n, c] - logits[m, n, labels[n]] for m in range(4))
  np.testing.assert_allclose(distill.min_logit_ensemble(jnp.asarray(logits), jnp.asarray(labels)), expected)
  assert np.all(np.asarray(distill.min_logit_ensemble(jnp.asarray(logits), jnp.asarray(labels)))[
      np.arange(5), labels] == 0)


def test_attention_maps():
  a = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4, 5)), jnp.float32)
  at = distill.attention_map(a)
  assert at.shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(at, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(at, distill.attention_map(3.0 * a), rtol=1e-5)    # scale-free
  assert float(distill.attention_transfer_loss([a], [a])) == 0.0
  assert float(distill.attention_transfer_loss([a], [a[::-1]])) > 0


def test_vmapped_teachers_equal_teachers_run_one_by_one(tiny_config):
  # ResNet-8: no max-pool, whose ties between equal quantized values batched and
  # unbatched max-pool break differently (another valid subgradient).
  tiny_config.model.name = "resnet8"
  # And the abs-max weight scale: the MSE-optimal one is an argmin over candidate
  # scales, which float summation order can tip to a neighbour (a weight then leaves
  # the code range and its STE gradient is 0 on one side only).
  outputs = []
  # vmap with remat against the loop without: both pieces at once, two compiles.
  for mode, remat in (("loop", False), ("vmap", True)):
    config = tiny_config.copy_and_resolve_references()
    config.method.bit_axis = mode
    method, state, x, y = _cmtkd(config, remat_teachers=remat, weight_quantizer="uniform_layer_absmax")
    outputs.append(jax.jit(jax.value_and_grad(lambda p: method.loss(p, state.batch_stats, x, y, "cmtkd")[0]))(
        state.params))
  for loss, grads in outputs[1:]:
    np.testing.assert_allclose(outputs[0][0], loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), outputs[0][1], grads)


def test_ablations(tiny_config):
  method, state, x, y = _cmtkd(tiny_config.copy_and_resolve_references(), mutual_learning=False, warmup_epochs=1)
  assert [p.trains for p in method.phases] == [("student", "teachers"), ("student",)]
  step = jax.jit(method.train_step, static_argnums=4)
  new_state, _ = step(method.start_phase(state, 1), x, y, jax.random.key(0), 1)
  assert _equal(new_state.params["teachers"], state.params["teachers"])
  assert _equal(new_state.batch_stats["teachers"], state.batch_stats["teachers"])
  assert _equal(new_state.params["importance"], state.params["importance"])
  assert not _equal(new_state.params["student"], state.params["student"])

  method, state, x, y = _cmtkd(tiny_config.copy_and_resolve_references(), importance="equal")
  np.testing.assert_allclose(method.importance_weights(state.params), 1 / 3)
  assert "importance" not in method.phases[-1].trains
  _, (_, _, _, parts, _) = method.loss(state.params, state.batch_stats, x, y, "cmtkd")
  assert float(parts["feature"]) > 0

  losses = []
  for gamma in (1.0, 1000.0):
    method, state, x, y = _cmtkd(tiny_config.copy_and_resolve_references(), feature_loss=False,
                                 mutual_learning=True, gamma=gamma)
    loss, (_, _, _, parts, _) = method.loss(state.params, state.batch_stats, x, y, "cmtkd")
    assert float(parts["feature"]) == 0.0
    losses.append(float(loss))
  assert losses[0] == losses[1]


def test_warmup_then_cmtkd_in_the_loop(tiny_config, tmp_path):
  tiny_config.method.name = "cmtkd"
  tiny_config.method.teacher_bits = (8, 4)
  tiny_config.method.warmup_epochs = 1
  tiny_config.bits = (2,)
  tiny_config.quant.act_quantizer = "hwgq"
  result = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert [v["name"] for v in result["variants"]] == ["w2a2", "teacher_w8a8", "teacher_w4a4"]
  assert list(result["phase_accuracy"]) == ["warmup", "cmtkd"]
  assert result["fusion_points"] and set(result["importance"]["fusion_0"]) == {"w8", "w4"}


@pytest.mark.parametrize("field,value,match", [
    ("bits", (2, 4), "bits"),
    ("method.teacher_bits", (8, 2), "teacher_bits"),
    ("method.fusion_points", (2, 1), "fusion_points"),
    ("method.fusion_points", (3,), "fusion_points"),
    ("method.importance", "fixed", "importance"),
    ("method.warmup_epochs", 2, "warmup_epochs"),
    ("method.delta", 1.0, "unknown"),
    ("method.mutual_learning", False, "mutual_learning"),     # frozen teachers that never trained
])
def test_bad_cmtkd_fields_are_named(tiny_config, field, value, match):
  tiny_config.method.name = "cmtkd"
  tiny_config.bits = (2,)
  if field == "bits":
    tiny_config.bits = value
  else:
    tiny_config.method[field.split(".", 1)[1]] = value
  with pytest.raises(train.ConfigError, match=match):
    train.validate(tiny_config)
