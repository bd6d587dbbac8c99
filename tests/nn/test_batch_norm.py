"""SwitchableBatchNorm: per-slot statistics and parameters, sync-BN under sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from qflax import nn as qnn


def _x(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(16, 4, 4, 3)) * 2 + 1, jnp.float32)


def test_training_normalises_and_moves_only_its_slot():
  bn = qnn.SwitchableBatchNorm(num_slots=3, momentum=0.8)
  x = _x()
  variables = bn.init(jax.random.key(0), x, 0, use_running_average=False)
  y, updates = bn.apply(variables, x, 1, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 1, atol=1e-3)
  mean = np.asarray(updates["batch_stats"]["mean"])
  np.testing.assert_allclose(mean[1], 0.2 * np.asarray(x).mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_array_equal(mean[[0, 2]], 0)
  var = np.asarray(updates["batch_stats"]["var"])
  np.testing.assert_allclose(var[1], 0.8 + 0.2 * np.asarray(x).var(axis=(0, 1, 2)), rtol=1e-5)


def test_inference_uses_the_slot_statistics_and_affine():
  bn = qnn.SwitchableBatchNorm(num_slots=2)
  x = _x()
  variables = bn.init(jax.random.key(0), x, 0, use_running_average=True)
  variables = jax.tree_util.tree_map(lambda v: v, variables)
  stats = {"mean": jnp.array([[0., 0., 0.], [1., 2., 3.]]), "var": jnp.array([[1., 1., 1.], [4., 4., 4.]])}
  params = {"scale": jnp.array([[1., 1., 1.], [2., 2., 2.]]), "bias": jnp.array([[0., 0., 0.], [1., 1., 1.]])}
  y = bn.apply({"params": params, "batch_stats": stats}, x, 1, use_running_average=True)
  want = (np.asarray(x) - [1, 2, 3]) / np.sqrt(4 + 1e-5) * 2 + 1
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(bn.apply({"params": p, "batch_stats": stats}, x, 1,
                                              use_running_average=True)))(params)
  assert np.all(np.asarray(grads["scale"][0]) == 0) and np.all(np.asarray(grads["scale"][1]) != 0)


def test_sharded_batch_gives_global_statistics():
  assert jax.device_count() == 8
  bn = qnn.SwitchableBatchNorm(num_slots=2)
  x = _x()
  variables = bn.init(jax.random.key(0), x, 0, use_running_average=False)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  fn = jax.jit(lambda v, x: bn.apply(v, x, 1, use_running_average=False, mutable=["batch_stats"]))
  y_sharded, s_sharded = fn(variables, x_sharded)
  y, s = fn(variables, x)
  np.testing.assert_allclose(y_sharded, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_sharded["batch_stats"]["mean"], s["batch_stats"]["mean"], rtol=1e-5, atol=1e-6)
