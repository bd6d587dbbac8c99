"""Full-precision training (``fp``) and fixed bit-width quantization-aware training (``qat``).

``qat`` trains one dedicated model per bit-width in ``config.bits``, side by side:
the replicas' parameters are stacked on a leading axis and the loss is mapped over
(parameters, precision plan) by a loop or ``vmap`` (``method.bit_axis``). Replicas
start from the same initial weights and see the same batches, so they are directly
comparable; they share nothing else (each replica's gradient comes from its own
loss only). ``fp`` is ``qat`` with ``bits = (32,)`` and no quantizers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qflax.methods import common
from qflax.methods.base import Method, Phase, TrainState, Variant
from qflax.methods.optim import make_optimizer


class QAT(Method):
  name = "qat"

  def __init__(self, config, num_classes: int, steps_per_epoch: int):
    self.config = config
    self.bits = tuple(int(b) for b in config.bits)
    self.model = common.build_model(config, num_classes, common.quant_spec(config, self.bits))
    self.plans = common.stacked_plans(self.model, self.bits)
    self.steps_per_epoch = steps_per_epoch

  def phases(self):
    return [Phase("train", int(self.config.num_epochs))]

  def _optimizer(self, phase_index):
    return make_optimizer(self.config.optimizer, self.phases()[phase_index].num_epochs * self.steps_per_epoch,
                          self.steps_per_epoch)

  def init_state(self, rng, sample_x):
    variables = self.model.init(rng, sample_x, common.plan_at(self.plans, 0))
    params = common.stack_replicas(variables["params"], len(self.bits))
    batch_stats = common.stack_replicas(variables.get("batch_stats", {}), len(self.bits))
    return TrainState(jnp.int32(0), params, batch_stats, self._optimizer(0).init(params), {})

  def start_phase(self, state, phase_index):
    return state.replace(opt_state=self._optimizer(phase_index).init(state.params))

  def calibrate(self, state, batches):
    """Sets each replica's quantizer scalars from calibration batches (``quant.calibrate_batches``)."""
    return state.replace(params=common.calibrate_replicas(self.model, self.plans, state.params, state.batch_stats,
                                                          batches))

  def train_step(self, state, x, y, rng, phase_index):
    del rng
    tx = self._optimizer(phase_index)

    def replica_loss(params, batch_stats, plan):
      logits, updates = self.model.apply({"params": params, "batch_stats": batch_stats}, x, plan, train=True,
                                         mutable=["batch_stats"])
      return common.cross_entropy(logits, y), (updates["batch_stats"], common.accuracy(logits, y))

    def loss_fn(params):
      losses, (batch_stats, accuracies) = common.map_bit_axis(
          replica_loss, self.config.method.bit_axis, params, state.batch_stats, self.plans)
      return jnp.sum(losses), (losses, batch_stats, accuracies)

    (_, (losses, batch_stats, accuracies)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"loss": jnp.mean(losses), "accuracy": jnp.mean(accuracies)}
    for name, loss, acc in zip([v.name for v in self.variants()], losses, accuracies):
      metrics[f"loss/{name}"] = loss
      metrics[f"accuracy/{name}"] = acc
    return new_state, metrics

  def variants(self):
    return [Variant(common.variant_name(b, b), b, b) for b in self.bits]

  def _variables(self, state, index):
    return {"params": common.replica(state.params, index), "batch_stats": common.replica(state.batch_stats, index)}

  def eval_logits(self, state, x, variant_index):
    return self.model.apply(self._variables(state, variant_index), x, common.plan_at(self.plans, variant_index),
                            train=False)

  def model_bytes(self, state, variant_index, sample_x):
    variables = jax.tree_util.tree_map(np.asarray, self._variables(state, variant_index))
    return common.export_model_bytes(self.model, variables, sample_x, common.plan_at(self.plans, variant_index))


class FullPrecision(QAT):
  name = "fp"

  @classmethod
  def validate_config(cls, config, error):
    if tuple(config.bits) != (32,):
      raise error(f"config field bits={tuple(config.bits)!r} is invalid for method fp; allowed: (32,)")
