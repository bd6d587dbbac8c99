"""Progressive quantization, stochastic precision and joint KD (Zhuang et al.)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import types

from batches import build, tiny_batch
from qflax import distill, train
from qflax.methods.progressive import stage_bits, stochastic_precision_ratio


def _progressive(c, bits=(2,), **options):
  c.method.name = "progressive"
  for k, v in options.items():
    c.method[k] = v
  c.bits = bits
  c.quant.weight_quantizer = "dorefa"
  c.quant.act_quantizer = "clamp"
  c.num_epochs = max(c.num_epochs, 4)
  method = build(c)
  x, y = tiny_batch()
  return method, jax.jit(method.init_state)(jax.random.key(0)), x, y


def _leaves_equal(a, b):
  return all(np.array_equal(u, v) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_stage_sequences():
  opts = types.SimpleNamespace(stochastic_precision=False, two_stage=False, progressive_bits=(32, 8, 4))
  assert stage_bits((4, 2), opts) == [[(32, 32)] * 2, [(8, 8)] * 2, [(4, 4)] * 2, [(4, 4), (2, 2)]]
  opts.two_stage, opts.progressive_bits = True, (8,)
  assert stage_bits((2,), opts) == [[(8, 32)], [(8, 8)], [(2, 32)], [(2, 2)]]
  opts.progressive_bits = ()
  assert stage_bits((2,), opts) == [[(2, 32)], [(2, 2)]]


def test_stage_transitions_carry_the_weights_and_change_only_the_bits(tiny_config):
  method, state, x, y = _progressive(tiny_config, two_stage=True, progressive_bits=(8,))
  assert [p.name for p in method.phases] == ["stage1_w8a32", "stage2_w8a8", "stage3_w2a32", "stage4_w2a2"]
  plans = method.stage_plans
  for before, after in zip(plans, plans[1:]):
    np.testing.assert_array_equal(before.slot, after.slot)
    assert np.any(before.w_bits != after.w_bits) or np.any(before.a_bits != after.a_bits)
  step = jax.jit(method.train_step, static_argnums=4)
  state, _ = step(state, x, y, jax.random.key(0), 0)
  moved = method.start_phase(state, 1)
  assert _leaves_equal(moved.params, state.params) and _leaves_equal(moved.batch_stats, state.batch_stats)
  assert _leaves_equal(moved.opt_state, method.phases[1].optimizer.init({"students": state.params["students"]}))
  # The same weights give other outputs under the next stage's plan (the bits changed).
  apply = lambda plan: method.student.apply(method.network(moved, 0).variables, x, jax.tree_util.tree_map(
      lambda a: a[0], plan), train=False)
  assert not np.allclose(apply(plans[0]), apply(plans[1]))


def test_stochastic_precision_quantizes_the_expected_fraction_and_compiles_once(tiny_config):
  method, state, x, y = _progressive(tiny_config, stochastic_precision=True)
  total = method.phases[0].num_epochs * 3
  traces = []

  def step(state, rng):
    traces.append(1)
    return method.train_step(state, x, y, rng, 0)

  step = jax.jit(step)
  ratios = []
  for i in range(total):
    state, metrics = step(state, jax.random.key(i))
    ratios.append(float(metrics["quantized_ratio"]))
  assert len(traces) == 1
  assert ratios[0] == 0.5 and ratios[-1] == 1.0 and sorted(ratios) == ratios

  draw = jax.jit(lambda step, key: method.step_plans(state.replace(step=step), key, 0)[0].w_bits < 32)
  for step_index, expected in ((0, 0.5), (total // 4, 0.75), (total // 2, 0.875), (total - 1, 1.0)):
    quantized = np.mean([np.asarray(draw(step_index, jax.random.key(k))) for k in range(2000)])
    assert abs(quantized - expected) < 0.02, (step_index, quantized)
  linear = [float(stochastic_precision_ratio(s, 100, "linear", 0.7)) for s in (0, 35, 70, 99)]
  np.testing.assert_allclose(linear, [0.5, 0.75, 1.0, 1.0], rtol=1e-6)


def test_full_precision_blocks_use_their_own_batch_norm_slot(tiny_config):
  method, state, x, y = _progressive(tiny_config, stochastic_precision=True)
  assert int(method.fp_plans.slot[0, 0]) == 1 and int(method.stage_plans[0].slot[0, 0]) == 0
  fp_only = jax.tree_util.tree_map(lambda a: a[0], method.fp_plans)
  _, updates = method.student.apply(method.network(state, 0).variables, x, fp_only, train=True,
                                    mutable=["batch_stats"])
  mean = next(v for k, v in jax.tree_util.tree_leaves_with_path(updates["batch_stats"]) if "mean" in str(k[-1]))
  assert np.all(mean[0] == 0) and np.any(mean[1] != 0)   # only the full-precision slot moved


def test_recalibration_phase_changes_only_batch_norm_statistics(tiny_config):
  method, state, x, y = _progressive(tiny_config, stochastic_precision=True, sp_batch_norm="recalibrate")
  assert [p.name for p in method.phases] == ["stochastic_precision", "bn_recalibration"]
  new_state, _ = jax.jit(method.train_step, static_argnums=4)(method.start_phase(state, 1), x, y,
                                                               jax.random.key(0), 1)
  assert _leaves_equal(new_state.params, state.params)
  assert not _leaves_equal(new_state.batch_stats, state.batch_stats)


@pytest.mark.parametrize("joint_kd", ["mutual", "guided"])
def test_joint_kd_updates_both_networks_from_their_own_losses(tiny_config, joint_kd):
  method, state, x, y = _progressive(tiny_config, bits=(4, 2), joint_kd=joint_kd)
  plans = method.stage_plans[0]

  def grads(role, which):
    def f(p):
      total, (low, *_) = method.losses({**state.params, role: p}, state.batch_stats, x, y, plans)
      return jnp.sum(low) if which == "students' losses" else total - jnp.sum(low)
    return jax.tree_util.tree_leaves(jax.grad(f)(state.params[role]))

  assert all(np.all(g == 0) for g in grads("teacher", "students' losses"))
  assert all(np.all(g == 0) for g in grads("students", "teacher's loss"))
  assert any(np.any(g != 0) for g in grads("teacher", "teacher's loss"))
  new_state, metrics = jax.jit(method.train_step, static_argnums=4)(state, x, y, jax.random.key(0), 0)
  assert np.isfinite(float(metrics["loss"])) and "accuracy/fp32" in metrics
  for role in ("students", "teacher"):
    assert not _leaves_equal(new_state.params[role], state.params[role]), role


def test_mutual_loss_matches_the_formula(tiny_config):
  method, state, x, y = _progressive(tiny_config, joint_kd="mutual", temperature=2.0)
  total, (low, z, z_fp, _) = method.losses(state.params, state.batch_stats, x, y, method.stage_plans[0])

  def kl(target, z):
    p = jax.nn.softmax(target / 2.0)
    return 4.0 * np.mean(np.sum(p * (jax.nn.log_softmax(target / 2.0) - jax.nn.log_softmax(z / 2.0)), -1))

  ce = lambda z: -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(z)), np.asarray(y)[:, None], -1))
  np.testing.assert_allclose(low[0], 0.7 * ce(z[0]) + 0.7 * kl(z_fp, z[0]), rtol=1e-5)
  np.testing.assert_allclose(total, low[0] + 1.0 * ce(z_fp) + 0.5 * kl(z[0], z_fp), rtol=1e-5)


def test_hint_loss_and_stage_outputs():
  rng = np.random.default_rng(0)
  a, b = jnp.asarray(rng.normal(size=(2, 4, 4, 3))), jnp.asarray(rng.normal(size=(2, 2, 2, 5)))
  assert float(distill.hint_loss([a, b], [a, b])) == 0.0
  c = a + 1.0
  np.testing.assert_allclose(distill.hint_loss([a], [c]), 0.5, rtol=1e-6)
  assert np.all(jax.grad(lambda t: distill.hint_loss([a], [t]))(c) == 0)   # the target is a constant
  features = [a, a, b, b, b[..., :2]]
  outputs = distill.stage_outputs(features)
  assert len(outputs) == 2 and outputs[0] is features[3] and outputs[1] is features[4]


@pytest.mark.parametrize("field,value,match", [
    ("method.progressive_bits", (4, 8), "progressive_bits"),
    ("method.progressive_bits", (2,), "progressive_bits"),
    ("method.stochastic_precision", "yes", "stochastic_precision"),
    ("method.joint_kd", "hints", "joint_kd"),
    ("method.stage_epochs", (1, 1, 1), "stage_epochs"),
    ("bits", (32, 2), "bits"),
    ("method.lambda", 1.0, "unknown"),
])
def test_bad_progressive_fields_are_named(tiny_config, field, value, match):
  tiny_config.method.name = "progressive"
  tiny_config.bits = (2,)
  tiny_config.quant.weight_quantizer = "dorefa"
  if field == "bits":
    tiny_config.bits = value
  else:
    tiny_config.method[field.split(".", 1)[1]] = value
  with pytest.raises(train.ConfigError, match=match):
    train.validate(tiny_config)


def test_stochastic_precision_replaces_the_stages(tiny_config):
  tiny_config.method.name = "progressive"
  tiny_config.bits = (2,)
  tiny_config.method.two_stage = True
  tiny_config.method.stochastic_precision = True
  with pytest.raises(train.ConfigError, match="stochastic_precision"):
    train.validate(tiny_config)


def test_guided_hints_compare_quantized_with_quantized(tiny_config):
  method, state, x, y = _progressive(tiny_config, joint_kd="guided")
  features = [jax.random.normal(jax.random.key(k), (4, 2, 2, 8)) for k in range(2)]
  assert float(method.hint(features, features, 2)) == 0.0
  # The old hint compared the quantized target with the raw signed feature: a floor above 0.
  raw = distill.hint_loss(features, [method.hint_quantizer(h, 2) for h in features])
  assert float(raw) > 0.1


def test_every_student_has_its_own_slot(tiny_config):
  method, state, x, y = _progressive(tiny_config, bits=(4, 2), stochastic_precision=True)
  assert method.bit_set == (4, 2, 32)
  np.testing.assert_array_equal(np.asarray(method.eval_plans.slot)[:, 0], [0, 1])   # 4-bit, 2-bit
  np.testing.assert_array_equal(np.asarray(method.fp_plans.slot)[:, 0], [2, 2])
