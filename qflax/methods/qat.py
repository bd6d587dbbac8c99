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
from qflax.methods import networks
from qflax.methods.base import Method, MethodOptions, VariantNetwork


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
    self.model, self.plans, self.variants = networks.replicas(opts.run, task.num_classes, self.bits)
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


class FullPrecision(QAT):
  name = "fp"
  Options = FPOptions
