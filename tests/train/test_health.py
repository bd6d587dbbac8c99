"""The quantizer health monitor catches the defects the recipes had, and stays quiet on
sane quantizers (issue "Recipes that work")."""

from __future__ import annotations

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qflax import methods, train
from qflax.train.health import HealthMonitor


def _method(config, **quant):
  config.quant.update(quant)
  train.load(config)
  return methods.create(config, methods.Task(4, (8, 8, 1), 3))


def _unit_batch():
  """Images whose first-layer activations after BatchNorm + ReLU are about unit scale."""
  return jnp.asarray(np.random.default_rng(0).normal(size=(32, 8, 8, 1)), jnp.float32)


def _observe(method, state, x, steps=(1,)):
  messages = []
  monitor = HealthMonitor(method, messages.append)
  for step in steps:
    monitor.observe(step, state, x)
  return monitor, messages


def _set(state, group, name, value):
  flat = traverse_util.flatten_dict(flax.core.unfreeze(state.params[group]))
  for path in flat:
    if path[-1] == name:
      flat[path] = jnp.full_like(flat[path], value)
  return state.replace(params={**state.params, group: traverse_util.unflatten_dict(flat)})


def test_pact_clip_far_above_the_data_collapses_at_2_bits_and_calibration_fixes_it(tiny_config):
  tiny_config.bits = (2,)
  method = _method(tiny_config, act_param_init={"alpha": 8.0})        # the old aao_cifar100 recipe
  state = method.init_state(jax.random.key(0))
  x = _unit_batch()
  _, messages = _observe(method, state, x)
  assert any("/input" in m and "in one level" in m for m in messages), messages
  calibrated = method.prepare(state, [x[:16], x[16:]])                 # the fix: a data-based clip
  _, messages = _observe(method, calibrated, x)
  assert not any("/input" in m and "in one level" in m for m in messages), messages


def test_a_clip_that_gets_no_gradient_is_reported_as_stuck(tiny_config):
  tiny_config.bits = (2,)
  method = _method(tiny_config, act_param_init={"alpha": 8.0})
  state = jax.jit(method.init_state)(jax.random.key(0))
  x = _unit_batch()
  y = jnp.zeros((32,), jnp.int32)
  monitor = HealthMonitor(method, lambda m: None)
  monitor.observe(1, state, x)
  step = jax.jit(method.train_step, static_argnums=4)
  for i in range(3):
    state, _ = step(state, x, y, jax.random.key(i), 0)
  monitor.observe(4, state, x)
  assert any("never moved from 8" in w for w in monitor.warnings), monitor.warnings


def test_qil_interval_below_the_data_is_saturated(tiny_config):
  tiny_config.bits = (4,)
  method = _method(tiny_config, weight_quantizer="qil", act_quantizer="qil")
  state = method.init_state(jax.random.key(0))
  x = _unit_batch()
  _, messages = _observe(method, state, x)
  assert not any("kernel" in m for m in messages), messages
  escaped = _set(_set(state, "model", "kernel_centre", 1e-4), "model", "kernel_half_width", 1e-4)
  _, messages = _observe(method, escaped, x)
  assert any("kernel" in m and "at the clip" in m for m in messages), messages


def test_abs_max_weight_scale_zeroes_most_2_bit_weights(tiny_config):
  tiny_config.bits = (2,)
  tiny_config.model.options.widths = (16, 32, 32)
  for quantizer, warned in (("uniform_layer_absmax", True), ("uniform_layer", False)):
    config = tiny_config.copy_and_resolve_references()
    method = _method(config, weight_quantizer=quantizer, act_quantizer="hwgq")
    state = method.init_state(jax.random.key(0))
    # A trained kernel has heavy tails: a few large weights set an abs-max scale.
    state = state.replace(params={**state.params, "model": jax.tree_util.tree_map_with_path(
        lambda p, a: a * (1 + 9 * (jax.random.uniform(jax.random.key(1), a.shape) > 0.995))
        if str(p[-1]) == "['kernel']" else a, state.params["model"])})
    _, messages = _observe(method, state, _unit_batch())
    kernel_warnings = [m for m in messages if "/kernel" in m and "in one level" in m]
    assert bool(kernel_warnings) == warned, (quantizer, messages)


def test_qil_weight_interval_at_abs_max_zeroes_most_2_bit_weights(tiny_config):
  # The qkd recipes calibrated weight intervals to [0, max|w|]: >90 % of 2-bit codes were 0.
  tiny_config.bits = (2,)
  tiny_config.model.options.widths = (16, 32, 32)
  method = _method(tiny_config, weight_quantizer="qil", act_quantizer="qil")
  state = method.init_state(jax.random.key(0))
  _, messages = _observe(method, state, _unit_batch())
  assert not any("/kernel" in m and "in one level" in m for m in messages), messages
  flat = traverse_util.flatten_dict(flax.core.unfreeze(state.params["model"]))
  for path in [p for p in flat if p[-1] in ("kernel_centre", "kernel_half_width")]:
    flat[path] = jnp.full_like(flat[path], jnp.max(jnp.abs(flat[path[:-1] + ("kernel",)])) / 2)
  absmax = state.replace(params={**state.params, "model": traverse_util.unflatten_dict(flat)})
  _, messages = _observe(method, absmax, _unit_batch())
  assert any("/kernel" in m and "in one level" in m for m in messages), messages


def test_the_loop_logs_health_and_summarises_it(tiny_config, tmp_path):
  tiny_config.quant.monitor = True
  tiny_config.quant.act_param_init.alpha = 8.0
  tiny_config.bits = (32, 2)
  tiny_config.num_epochs = 1
  results = train.train_and_evaluate(tiny_config, str(tmp_path))
  health = results["quantizer_health"]
  assert set(health["variants"]["w2a2"]) >= {"blocks_0/conv/input", "blocks_0/conv/kernel"}
  assert health["variants"]["fp32"] == {}
  assert any("w2a2" in w and "in one level" in w for w in health["warnings"])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  quant_records = [r for r in records if r["split"] == "quant"]
  assert quant_records and "w2a2/blocks_0/conv/input/zero_fraction" in quant_records[0]
  assert "Quantizer health" in (tmp_path / "results.md").read_text()
