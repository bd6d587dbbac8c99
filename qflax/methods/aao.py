"""AAO: all-at-once quantization with adaptive teachers and dynamic block swapping.

Sun, Panda, Chen, Wang, Pan, Oliva, Feris, Saenko, "All at Once Network
Quantization via Collaborative Knowledge Transfer", arXiv 2103.01435, 2021
(later "Improved Techniques for Quantizing Deep Networks with Adaptive
Bit-Widths", WACV 2024).

One network, weights shared by every bit-width in ``B`` (sorted descending,
``b_1`` highest); BatchNorm and quantizer scalars are private per bit-width
(stacked slots). One jitted step computes::

  z[b_1] = f(x; all blocks at b_1);  L = CE(y, z[b_1])
  for b in B[1:]:
    t = select_teacher(b)
    z[b] = f(x; all blocks at b)
    L += (1 - beta) CE(y, z[b]) + beta T^2 KL(sg(p_t) || p_b)
    m ~ swap mask;  z_h = f(x; block k at t if m[k] else b)
    L += lambda_swap [(1 - beta) CE(y, z_h) + beta T^2 KL(sg(p_t) || p_h)]

Teachers, masks and bits are traced data; the step compiles once. The hybrid
passes normalise with batch statistics but do not move the running statistics
(their teacher blocks see student activations); gradients from them reach the
teacher's private parameters (the collaborative part).

Options (``method.*``; defaults from ``aao.md``): ``teacher`` (``adaptive``,
``fixed``, ``next``), ``sample_teacher`` (False), ``teacher_temperature`` (1.0,
for sampling), ``stats_momentum`` (0.9, EMA of accuracies and KLs), ``beta``
(1.0), ``temperature`` (1.0), ``swap`` (True), ``swap_weight`` (1.0),
``swap_probability`` (0.5), ``swap_schedule`` (``constant`` or ``linear`` to 0),
``swap_mask`` (``bernoulli`` or ``prefix``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qflax import distill
from qflax import nn as qnn
from qflax.methods import common
from qflax.methods.base import Method, Phase, TrainState, Variant
from qflax.methods.optim import make_optimizer

DEFAULTS = {"teacher": "adaptive", "sample_teacher": False, "teacher_temperature": 1.0, "stats_momentum": 0.9,
            "beta": 1.0, "temperature": 1.0, "swap": True, "swap_weight": 1.0, "swap_probability": 0.5,
            "swap_schedule": "constant", "swap_mask": "bernoulli"}


def merge_slot_updates(per_bit_stats, num_bits: int):
  """BatchNorm statistics after one pure forward per bit-width.

  ``per_bit_stats`` has a leading axis over the forwards; forward ``k`` ran every
  block in slot ``k``. Slotted statistics ``(K, C)`` take row ``k`` from
  forward ``k``; single-slot ones (the shared full-precision stem) take forward 0,
  whose input statistics are the same for every bit-width.
  """
  def merge(stacked):
    if stacked.ndim >= 2 and stacked.shape[1] == num_bits:
      return stacked[jnp.arange(num_bits), jnp.arange(num_bits)]
    return stacked[0]
  return jax.tree_util.tree_map(merge, per_bit_stats)


class AAO(Method):
  name = "aao"

  @classmethod
  def validate_config(cls, config, error):
    if len(config.bits) < 2:
      raise error(f"config field bits={tuple(config.bits)!r} is invalid for method aao; allowed: two or more "
                  "bit-widths (the teachers and students trained jointly)")
    o = common.MethodOptions(config, DEFAULTS, cls.name, error)
    o.choice("teacher", distill.TEACHER_STRATEGIES)
    o.choice("swap_mask", distill.MASK_MODES)
    o.choice("swap_schedule", distill.SWAP_SCHEDULES)
    o.number("beta", maximum=1.0)
    o.number("swap_probability", maximum=1.0)
    o.number("stats_momentum", maximum=0.999999)
    o.number("temperature", strict=True)
    o.number("teacher_temperature", strict=True)
    o.number("swap_weight")
    o.boolean("swap")
    o.boolean("sample_teacher")

  def __init__(self, config, num_classes: int, steps_per_epoch: int):
    self.config = config
    self.bits = tuple(sorted((int(b) for b in config.bits), reverse=True))
    self.model = common.build_model(config, num_classes, common.quant_spec(config, self.bits))
    self.plans = common.stacked_plans(self.model, self.bits)
    self.num_blocks = self.plans.w_bits.shape[1]
    self.steps_per_epoch = steps_per_epoch
    self.opts = common.MethodOptions(config, DEFAULTS, self.name, ValueError)

  def phases(self):
    return [Phase("train", int(self.config.num_epochs))]

  def _optimizer(self, phase_index):
    steps = self.phases()[phase_index].num_epochs * self.steps_per_epoch
    return make_optimizer(self.config.optimizer, steps, self.steps_per_epoch)

  def init_state(self, rng, sample_x):
    variables = self.model.init(rng, sample_x, common.plan_at(self.plans, 0))
    params = variables["params"]
    stats = distill.init_teacher_stats(len(self.bits))
    return TrainState(jnp.int32(0), params, variables.get("batch_stats", {}), self._optimizer(0).init(params),
                      {"accuracy_ema": stats.accuracy, "kl_ema": stats.kl})

  def start_phase(self, state, phase_index):
    return state.replace(opt_state=self._optimizer(phase_index).init(state.params))

  def calibrate(self, state, batches):
    apply = lambda v, x, plan, **kw: self.model.apply(v, x, plan, train=False, **kw)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    plans = [common.plan_at(self.plans, k) for k in range(len(self.bits))]
    return state.replace(params=qnn.calibrate(apply, variables, batches, plans)["params"])

  def _forward(self, params, batch_stats, x, plan):
    logits, updates = self.model.apply({"params": params, "batch_stats": batch_stats}, x, plan, train=True,
                                       mutable=["batch_stats"])
    return logits, updates["batch_stats"]

  def teachers_and_masks(self, state, rng):
    """Per student ``j = 1..K-1``: the teacher index and the swap mask (traced)."""
    o = self.opts
    stats = distill.TeacherStats(state.extra["accuracy_ema"], state.extra["kl_ema"])
    total = int(self.config.num_epochs) * self.steps_per_epoch
    p_swap = distill.swap_probability(o["swap_probability"], state.step, total, o["swap_schedule"])
    teachers, masks = [], []
    for j in range(1, len(self.bits)):
      k_teacher, k_mask = jax.random.split(jax.random.fold_in(rng, j))
      teachers.append(distill.select_teacher(j, o["teacher"], stats, key=k_teacher, sample=o["sample_teacher"],
                                             temperature=o["teacher_temperature"]))
      masks.append(distill.swap_mask(k_mask, self.num_blocks, p_swap, o["swap_mask"]))
    return jnp.stack(teachers), jnp.stack(masks), p_swap

  def loss(self, params, state, x, y, teachers, masks):
    """The AAO objective; returns ``(loss, (logits per bit-width, new batch stats))``."""
    o = self.opts
    mode = self.config.method.bit_axis
    beta, temperature, k = o["beta"], o["temperature"], len(self.bits)
    pure = lambda plan: self._forward(params, state.batch_stats, x, plan)
    logits, per_bit_stats = common.map_bit_axis(pure, mode, self.plans)
    batch_stats = merge_slot_updates(per_bit_stats, k)

    def student_terms(z, z_teacher):
      return (1 - beta) * common.cross_entropy(z, y) + beta * distill.kd_kl(z, z_teacher, temperature)

    total = common.cross_entropy(logits[0], y)
    teacher_logits = logits[teachers]                             # (K-1, batch, classes)
    for j in range(1, k):
      total += student_terms(logits[j], teacher_logits[j - 1])
    if o["swap"] and o["swap_weight"] > 0:
      students = common.plan_at(self.plans, jnp.arange(1, k))
      hybrid_plans = qnn.mix_plans(masks, common.plan_at(self.plans, teachers), students)
      hybrid = lambda plan: self._forward(params, state.batch_stats, x, plan)[0]
      hybrid_logits = common.map_bit_axis(hybrid, mode, hybrid_plans)
      for j in range(1, k):
        total += o["swap_weight"] * student_terms(hybrid_logits[j - 1], teacher_logits[j - 1])
    return total, (logits, batch_stats)

  def train_step(self, state, x, y, rng, phase_index):
    tx = self._optimizer(phase_index)
    teachers, masks, p_swap = self.teachers_and_masks(state, rng)
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state.params, state, x, y, teachers, masks)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    accuracies = jnp.mean(jnp.argmax(logits, -1) == y[None], axis=-1)
    kl = distill.pairwise_kl(jax.nn.log_softmax(jax.lax.stop_gradient(logits)))
    stats = distill.update_teacher_stats(distill.TeacherStats(state.extra["accuracy_ema"], state.extra["kl_ema"]),
                                         accuracies, kl, self.opts["stats_momentum"])
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              extra={"accuracy_ema": stats.accuracy, "kl_ema": stats.kl})
    metrics = {"loss": loss, "accuracy": jnp.mean(accuracies), "swap_probability": p_swap}
    bits = jnp.asarray(self.bits)
    for j, variant in enumerate(self.variants()):
      metrics[f"accuracy/{variant.name}"] = accuracies[j]
      if j:
        metrics[f"teacher_bits/{variant.name}"] = bits[teachers[j - 1]]
    return new_state, metrics

  def variants(self):
    return [Variant(common.variant_name(b, b), b, b) for b in self.bits]

  def eval_logits(self, state, x, variant_index):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return self.model.apply(variables, x, common.plan_at(self.plans, variant_index), train=False)

  def model_bytes(self, state, variant_index, sample_x):
    variables = jax.tree_util.tree_map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})
    return common.export_model_bytes(self.model, variables, sample_x, common.plan_at(self.plans, variant_index))

  def report(self, state):
    accuracy = np.asarray(state.extra["accuracy_ema"])
    return {"bit_set": list(self.bits),
            "train_accuracy_ema": {v.name: float(a) for v, a in zip(self.variants(), accuracy)}}
