"""Switchable BatchNorm: one set of statistics and affine parameters per bit-width.

Yu et al., "Slimmable Neural Networks" (switchable BN), 2019; Jin et al.,
"AdaBits", 2020; used by AAO (Sun et al.).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qflax.nn._src.precision import check_slot


def select_slot(stacked: jax.Array, slot) -> jax.Array:
  """``stacked[slot]`` for a traced slot (leading axis = slots)."""
  return jax.lax.dynamic_index_in_dim(stacked, slot, axis=0, keepdims=False)


def update_slot(stacked: jax.Array, slot, value: jax.Array) -> jax.Array:
  """``stacked`` with row ``slot`` replaced by ``value``."""
  return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), slot, axis=0)


class SwitchableBatchNorm(nn.Module):
  """BatchNorm over the last axis with ``num_slots`` private parameter sets.

  ``y = (x - mu_s) / sqrt(var_s + eps) * gamma_s + beta_s`` where ``s`` is the
  traced slot. In training mode the batch statistics are used and only slot
  ``s``'s running averages move (``m * old + (1 - m) * batch``); the other
  slots, and their gradients, are untouched. Under ``jit`` over a sharded batch
  the mean is global, so this is sync-BN. Parameters and running statistics are
  float32 and the normalisation runs in float32 whatever ``x``'s dtype (bfloat16
  under a ``compute_dtype``); the output has ``x``'s dtype.

  Example:
    >>> bn = SwitchableBatchNorm(num_slots=4)
    >>> y, updates = bn.apply(variables, x, slot=2, use_running_average=False,
    ...                       mutable=["batch_stats"])
  """
  num_slots: int
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_running_average: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, slot, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    slot = check_slot(slot, self.num_slots)
    features = x.shape[-1]
    shape = (self.num_slots, features)
    scale = self.param("scale", nn.initializers.ones, shape)
    bias = self.param("bias", nn.initializers.zeros, shape)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32)

    x32 = x.astype(jnp.float32)
    if use_running_average:
      mean, var = select_slot(running_mean.value, slot), select_slot(running_var.value, slot)
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = update_slot(
            running_mean.value, slot, m * select_slot(running_mean.value, slot) + (1 - m) * mean)
        running_var.value = update_slot(
            running_var.value, slot, m * select_slot(running_var.value, slot) + (1 - m) * var)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * select_slot(scale, slot) + select_slot(bias, slot)
    return y.astype(x.dtype)
