"""A method's networks: models from the run settings, precision plans, stacked
replicas, the bit axis (a loop or ``vmap`` over per-bit-width computations), and
quantizer calibration of replicas."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qflax import models
from qflax import nn as qnn
from qflax import options
from qflax.methods.base import Variant
from qflax.options import RunSettings


def build_model(run: RunSettings, num_classes: int, bit_set=None) -> models.Network:
  """The run's model with its quantizers serving ``bit_set`` (``None``: full precision,
  no quantizers), in the run's ``compute_dtype``."""
  return run.model.build(num_classes, run.spec(bit_set))


variant_name = qnn.precision_name   # "fp32", or "w<W>a<A>"


def stacked_plans(model: models.Network, bit_set) -> qnn.PrecisionPlan:
  """One uniform plan per bit-width in ``bit_set``, stacked: fields ``(K, num_blocks)``."""
  plans = [qnn.uniform_plan(model.num_blocks, b, bit_set) for b in bit_set]
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *plans)


def replicas(run: RunSettings, num_classes: int, entries) -> tuple[models.Network, qnn.PrecisionPlan, tuple]:
  """``(model, stacked plans, variants)``: one replica per ``bits`` entry.

  Integer entries give the model the slots ``entries`` and uniform plans. Entries
  that mix precisions (``"w4a8"``, per-block plans) give it one slot per distinct
  weight bit-width (a block uses the slot of its weight bit-width; each replica has
  its own parameters, so slots are never shared between variants); a per-block plan's
  variant is named ``plan<k>`` and reports its lowest weight and activation bit-widths.
  """
  if options.is_uniform(entries):
    model = build_model(run, num_classes, entries)
    return model, stacked_plans(model, entries), tuple(Variant(variant_name(b, b), b, b) for b in entries)
  blocks = [[qnn.parse_precision(b) for b in (e if isinstance(e, tuple) else (e,))] for e in entries]
  bit_set = tuple(sorted({w for pairs in blocks for w, _ in pairs}, reverse=True))
  model = build_model(run, num_classes, bit_set)
  plans, variants = [], []
  for e, pairs in zip(entries, blocks):
    if isinstance(e, tuple):
      if len(pairs) != model.num_blocks:
        options.invalid("bits", e, f"a per-block plan of {model.num_blocks} entries for model {run.model.name}")
      w, a = (min(x) for x in zip(*pairs))
      variants.append(Variant(f"plan{sum(isinstance(v, tuple) for v in entries[:len(plans)])}", w, a))
    else:
      pairs, (w, a) = pairs * model.num_blocks, pairs[0]
      variants.append(Variant(variant_name(w, a), w, a))
    plans.append(qnn.make_plan([w for w, _ in pairs], [a for _, a in pairs], [bit_set.index(w) for w, _ in pairs],
                               len(bit_set)))
  return model, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *plans), tuple(variants)


def plan_at(plans: qnn.PrecisionPlan, index) -> qnn.PrecisionPlan:
  """Plan ``index`` (static or traced) of stacked plans."""
  return jax.tree_util.tree_map(lambda a: a[index], plans)


def replica(tree, index):
  """Replica ``index`` (traced or static) of a tree stacked on its leading axis."""
  return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), tree)


def stack_replicas(tree, count: int):
  """``count`` identical replicas of ``tree`` on a new leading axis."""
  return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (count,) + jnp.shape(a)), tree)


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


def calibration_apply(model: models.Network):
  """``apply(variables, x, plan, mutable)`` for :func:`qflax.nn.calibrate`: the forward
  pass normalises with batch statistics, as in training (BatchNorm's running
  averages are still at their initial values before the first step), and leaves the
  running statistics as they were."""
  def apply(variables, x, plan, mutable):
    out, state = model.apply(variables, x, plan, train=True, mutable=list(mutable) + ["batch_stats"])
    return out, {k: v for k, v in state.items() if k != "batch_stats"}
  return apply


def calibrate_replicas(model: models.Network, plans: qnn.PrecisionPlan, params, batch_stats, batches):
  """Quantizer scalars of stacked replicas (replica ``k`` at plan ``k``) from calibration batches."""
  calibrated, apply = [], calibration_apply(model)
  for k in range(plans.w_bits.shape[0]):
    variables = {"params": replica(params, k), "batch_stats": replica(batch_stats, k)}
    calibrated.append(qnn.calibrate(apply, variables, batches, [plan_at(plans, k)])["params"])
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *calibrated)
