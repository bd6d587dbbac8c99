"""Pieces every method uses: losses, model and plan construction, export size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qflax import models
from qflax import nn as qnn


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def quant_spec(config, bit_set) -> models.QuantSpec:
  q = config.quant
  return models.QuantSpec(bit_set=tuple(bit_set), weight_quantizer=q.weight_quantizer,
                          act_quantizer=q.act_quantizer, signed_act_quantizer=q.signed_act_quantizer,
                          act_param_init=tuple(sorted(dict(q.act_param_init).items())), first_last=q.first_last)


def build_model(config, num_classes: int, spec: models.QuantSpec) -> models.Network:
  return models.get_model(config.model.name, num_classes, spec, **dict(config.model.options))


def stacked_plans(model, bit_set) -> qnn.PrecisionPlan:
  """One uniform plan per bit-width in ``bit_set``, stacked: fields ``(K, num_blocks)``."""
  plans = [qnn.uniform_plan(models.num_blocks(model), b, bit_set) for b in bit_set]
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *plans)


def plan_at(plans: qnn.PrecisionPlan, index) -> qnn.PrecisionPlan:
  return jax.tree_util.tree_map(lambda a: a[index], plans)


BIT_AXIS_MODES = ("auto", "loop", "vmap")


def resolve_bit_axis(mode: str) -> str:
  """``auto`` is the faster mode measured per backend (BENCHMARKS.md): ``loop`` on
  CPU, where XLA runs convolutions with batched kernels as slow grouped
  convolutions, and ``vmap`` on GPU/TPU."""
  if mode == "auto":
    return "loop" if jax.default_backend() == "cpu" else "vmap"
  return mode


def map_bit_axis(fn, mode: str, *stacked):
  """``fn`` over the leading (bit-width) axis of ``stacked``, results stacked.

  ``mode="loop"`` unrolls a Python loop (one program per bit-width);
  ``mode="vmap"`` vectorises; ``mode="auto"`` picks per backend
  (:func:`resolve_bit_axis`). Both compute the same values up to float summation
  order (and max-pool tie-breaking, where pooled values tie exactly).
  """
  if resolve_bit_axis(mode) == "vmap":
    return jax.vmap(fn)(*stacked)
  size = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  outs = [fn(*jax.tree_util.tree_map(lambda a: a[k], stacked)) for k in range(size)]
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)


def variant_name(w_bits: int, a_bits: int) -> str:
  return "fp32" if w_bits >= 32 and a_bits >= 32 else f"w{w_bits}a{a_bits}"


def export_integer_model(model, variables, x, plan: qnn.PrecisionPlan):
  """Every layer's exported kernel for a concrete plan: integer codes with scale and
  zero point (or float32 where full precision), in the module tree of the model."""
  plan = qnn.PrecisionPlan(*(np.asarray(a) for a in plan))
  _, state = model.apply(variables, x[:1], plan, train=False, mutable=[qnn.EXPORT])
  return state[qnn.EXPORT]


def export_model_bytes(model, variables, x, plan: qnn.PrecisionPlan) -> int:
  """Bytes of the exported model for a concrete plan (see ``qflax.nn.EXPORT``)."""
  exported = export_integer_model(model, variables, x, plan)
  total = qnn.exported_bytes(exported)
  # BatchNorm (one slot) and biases travel as float32 beside the exported kernels.
  return total + 4 * models.count_params(variables["params"]) - 4 * qnn.exported_kernel_params(exported)
