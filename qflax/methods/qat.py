"""Full-precision training (``fp``) and fixed bit-width quantization-aware training (``qat``).

``qat`` trains one dedicated model per bit-width in ``bits``, side by side: the
replicas' parameters are stacked on a leading axis (group ``"model"``) and the loss
is mapped over (parameters, precision plan) by a loop or ``vmap``
(``method.bit_axis``). Replicas start from the same initial weights and see the same
batches, so they are directly comparable; they share nothing else (each replica's
gradient comes from its own loss only). ``fp`` is ``qat`` with ``bits = (32,)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qflax import distill, options
from qflax import nn as qnn
from qflax.methods import networks
from qflax.methods.base import Method, MethodOptions, Variant, VariantNetwork


@dataclasses.dataclass(frozen=True)
class QATOptions(MethodOptions):
  """``qat`` has no fields of its own beyond ``method.bit_axis``. Its ``bits`` may mix
  precisions: ``"w4a8"`` entries and per-block plans (one entry per block)."""
  mixed_precision = True


@dataclasses.dataclass(frozen=True)
class FPOptions(MethodOptions):

  def check(self):
    if self.run.bits != (32,):
      options.invalid("bits", self.run.bits, "(32,) for method fp")


class QAT(Method):
  name = "qat"
  Options = QATOptions

  def __init__(self, opts, task):
    super().__init__(opts, task)
    self.bits = opts.bits
    if options.is_uniform(self.bits):
      self.model = networks.build_model(opts.run, task.num_classes, self.bits)
      self.plans = networks.stacked_plans(self.model, self.bits)
      self.variants = tuple(Variant(networks.variant_name(b, b), b, b) for b in self.bits)
    else:
      self.model, self.plans, self.variants = _mixed_precision(opts.run, task.num_classes, self.bits)
    self.phases = (self.phase("train", opts.run.num_epochs, {"model": 1.0}),)

  def init_state(self, rng):
    variables = self.model.init(rng, self.sample_input, networks.plan_at(self.plans, 0))
    k = len(self.bits)
    return self.new_state({"model": networks.stack_replicas(variables["params"], k)},
                          {"model": networks.stack_replicas(variables.get("batch_stats", {}), k)})

  def prepare(self, state, batches):
    """Each replica's quantizer scalars from calibration batches (``quant.calibrate_batches``)."""
    params = networks.calibrate_replicas(self.model, self.plans, state.params["model"], state.batch_stats["model"],
                                         batches)
    return state.replace(params={"model": params})

  def train_step(self, state, x, y, rng, phase_index):
    del rng

    def replica_loss(params, batch_stats, plan):
      logits, updates = self.model.apply({"params": params, "batch_stats": batch_stats}, x, plan, train=True,
                                         mutable=["batch_stats"])
      return distill.cross_entropy(logits, y), (updates["batch_stats"], distill.accuracy(logits, y))

    def loss_fn(params):
      losses, aux = networks.map_bit_axis(replica_loss, self.options.bit_axis, params, state.batch_stats["model"],
                                          self.plans)
      return jnp.sum(losses), (losses, *aux)

    (_, (losses, batch_stats, accuracies)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["model"])
    new_state = self.apply_gradients(state, phase_index, {"model": grads}, batch_stats={"model": batch_stats})
    metrics = {"loss": jnp.mean(losses), "accuracy": jnp.mean(accuracies)}
    for variant, loss, acc in zip(self.variants, losses, accuracies):
      metrics[f"loss/{variant.name}"] = loss
      metrics[f"accuracy/{variant.name}"] = acc
    return new_state, metrics

  def network(self, state, index):
    variables = {"params": networks.replica(state.params["model"], index),
                 "batch_stats": networks.replica(state.batch_stats["model"], index)}
    return VariantNetwork(self.model, variables, networks.plan_at(self.plans, index), self.options.run.model)


def _mixed_precision(run: options.RunSettings, num_classes: int, entries):
  """``(model, stacked plans, variants)`` for ``bits`` entries that mix precisions.

  The model's slots are the distinct weight bit-widths; a block uses the slot of its
  weight bit-width (each replica has its own parameters, so slots are never shared
  between variants). A per-block plan's variant is named ``plan<k>`` and reports its
  lowest weight and activation bit-widths.
  """
  per_block = [e for e in entries if isinstance(e, tuple)]
  pairs = [qnn.parse_precision(b) for e in entries for b in (e if isinstance(e, tuple) else (e,))]
  bit_set = tuple(sorted({w for w, _ in pairs}, reverse=True))
  model = networks.build_model(run, num_classes, bit_set)
  for plan in per_block:
    if len(plan) != model.num_blocks:
      options.invalid("bits", plan, f"a per-block plan of {model.num_blocks} entries for model {run.model.name}")
  plans, variants = [], []
  for e in entries:
    blocks = e if isinstance(e, tuple) else (e,) * model.num_blocks
    plans.append(qnn.block_plan(blocks, bit_set))
    if isinstance(e, tuple):
      w, a = (min(x) for x in zip(*(qnn.parse_precision(b) for b in e)))
      variants.append(Variant(f"plan{per_block.index(e)}", w, a))
    else:
      w, a = qnn.parse_precision(e)
      variants.append(Variant(networks.variant_name(w, a), w, a))
  return model, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *plans), tuple(variants)


class FullPrecision(QAT):
  name = "fp"
  Options = FPOptions
