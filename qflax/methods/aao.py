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

Options: :class:`AAOOptions` (defaults from ``aao.md``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qflax import distill, options
from qflax import nn as qnn
from qflax.methods import networks
from qflax.methods.base import Method, MethodOptions, Start, Variant, VariantNetwork


@dataclasses.dataclass(frozen=True)
class AAOOptions(MethodOptions):
  teacher: str = options.choice("adaptive", distill.TEACHER_STRATEGIES, doc="teacher of each lower bit-width")
  sample_teacher: bool = options.boolean(False, doc="draw the adaptive teacher from softmax(-KL / T_sel)")
  teacher_temperature: float = options.number(1.0, minimum=0.0, strict=True, doc="T_sel for sampled teachers")
  stats_momentum: float = options.number(0.9, minimum=0.0, below=1.0, doc="EMA of accuracies and KLs")
  beta: float = options.number(1.0, minimum=0.0, maximum=1.0, doc="weight of KD against CE for students")
  temperature: float = options.number(1.0, minimum=0.0, strict=True, doc="KD temperature T")
  swap: bool = options.boolean(True, doc="dynamic block swapping (hybrid networks)")
  swap_weight: float = options.number(1.0, minimum=0.0, doc="lambda_swap")
  swap_probability: float = options.number(0.5, minimum=0.0, maximum=1.0, doc="p_swap per block")
  swap_schedule: str = options.choice("constant", distill.SWAP_SCHEDULES, doc="p_swap constant or linear to 0")
  swap_mask: str = options.choice("bernoulli", distill.MASK_MODES, doc="independent blocks or a random prefix")
  pretrained_checkpoint: str = options.text("", doc="workdir of an fp run of the model to start the shared weights from")

  @property
  def starts(self):
    if not self.pretrained_checkpoint:
      return ()
    return (Start("method.pretrained_checkpoint", self.pretrained_checkpoint, self.run.model, ("model",)),)

  def check(self):
    if len(self.run.bits) < 2:
      options.invalid("bits", self.run.bits, "two or more bit-widths for method aao (the teachers and students "
                      "trained jointly)")


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
  Options = AAOOptions

  def __init__(self, opts, task):
    super().__init__(opts, task)
    self.bits = tuple(sorted(opts.bits, reverse=True))
    self.model = networks.build_model(opts.run, task.num_classes, self.bits)
    self.plans = networks.stacked_plans(self.model, self.bits)
    self.num_blocks = self.model.num_blocks
    self.phases = (self.phase("train", opts.run.num_epochs, {"model": 1.0}),)
    self.variants = tuple(Variant(networks.variant_name(b, b), b, b) for b in self.bits)
    self.total_steps = opts.run.num_epochs * task.steps_per_epoch

  def init_state(self, rng):
    variables = self.model.init(rng, self.sample_input, networks.plan_at(self.plans, 0))
    stats = distill.init_teacher_stats(len(self.bits))
    return self.new_state({"model": variables["params"]}, {"model": variables.get("batch_stats", {})},
                          {"accuracy_ema": stats.accuracy, "kl_ema": stats.kl})

  def prepare(self, state, batches):
    """Every bit-width slot's quantizer scalars from calibration batches."""
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats["model"]}
    plans = [networks.plan_at(self.plans, k) for k in range(len(self.bits))]
    calibrated = qnn.calibrate(networks.calibration_apply(self.model), variables, batches, plans)
    return state.replace(params={"model": calibrated["params"]})

  def _forward(self, params, batch_stats, x, plan):
    logits, updates = self.model.apply({"params": params, "batch_stats": batch_stats}, x, plan, train=True,
                                       mutable=["batch_stats"])
    return logits, updates["batch_stats"]

  def teachers_and_masks(self, state, rng):
    """Per student ``j = 1..K-1``: the teacher index and the swap mask (traced)."""
    o = self.options
    stats = distill.TeacherStats(state.extra["accuracy_ema"], state.extra["kl_ema"])
    p_swap = distill.swap_probability(o.swap_probability, state.step, self.total_steps, o.swap_schedule)
    teachers, masks = [], []
    for j in range(1, len(self.bits)):
      k_teacher, k_mask = jax.random.split(jax.random.fold_in(rng, j))
      teachers.append(distill.select_teacher(j, o.teacher, stats, key=k_teacher, sample=o.sample_teacher,
                                             temperature=o.teacher_temperature))
      masks.append(distill.swap_mask(k_mask, self.num_blocks, p_swap, o.swap_mask))
    return jnp.stack(teachers), jnp.stack(masks), p_swap

  def loss(self, params, batch_stats, x, y, teachers, masks):
    """The AAO objective over the shared ``params`` (group ``"model"``); returns
    ``(loss, (logits per bit-width, new batch stats))``."""
    o = self.options
    k = len(self.bits)
    pure = lambda plan: self._forward(params, batch_stats, x, plan)
    logits, per_bit_stats = networks.map_bit_axis(pure, o.bit_axis, self.plans)
    new_stats = merge_slot_updates(per_bit_stats, k)

    def student_terms(z, z_teacher):
      return (1 - o.beta) * distill.cross_entropy(z, y) + o.beta * distill.kd_kl(z, z_teacher, o.temperature)

    total = distill.cross_entropy(logits[0], y)
    teacher_logits = logits[teachers]                             # (K-1, batch, classes)
    for j in range(1, k):
      total += student_terms(logits[j], teacher_logits[j - 1])
    if o.swap and o.swap_weight > 0:
      students = networks.plan_at(self.plans, jnp.arange(1, k))
      hybrid_plans = qnn.mix_plans(masks, networks.plan_at(self.plans, teachers), students)
      hybrid = lambda plan: self._forward(params, batch_stats, x, plan)[0]
      hybrid_logits = networks.map_bit_axis(hybrid, o.bit_axis, hybrid_plans)
      for j in range(1, k):
        total += o.swap_weight * student_terms(hybrid_logits[j - 1], teacher_logits[j - 1])
    return total, (logits, new_stats)

  def train_step(self, state, x, y, rng, phase_index):
    teachers, masks, p_swap = self.teachers_and_masks(state, rng)
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state.params["model"], state.batch_stats["model"], x, y, teachers, masks)
    accuracies = jnp.mean(jnp.argmax(logits, -1) == y[None], axis=-1)
    kl = distill.pairwise_kl(jax.nn.log_softmax(jax.lax.stop_gradient(logits)))
    stats = distill.update_teacher_stats(distill.TeacherStats(state.extra["accuracy_ema"], state.extra["kl_ema"]),
                                         accuracies, kl, self.options.stats_momentum)
    new_state = self.apply_gradients(state, phase_index, {"model": grads}, batch_stats={"model": batch_stats},
                                     extra={"accuracy_ema": stats.accuracy, "kl_ema": stats.kl})
    metrics = {"loss": loss, "accuracy": jnp.mean(accuracies), "swap_probability": p_swap}
    bits = jnp.asarray(self.bits)
    for j, variant in enumerate(self.variants):
      metrics[f"accuracy/{variant.name}"] = accuracies[j]
      if j:
        metrics[f"teacher_bits/{variant.name}"] = bits[teachers[j - 1]]
    return new_state, metrics

  def network(self, state, index):
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats["model"]}
    return VariantNetwork(self.model, variables, networks.plan_at(self.plans, index), self.options.run.model)

  def finalize(self, state, workdir):
    accuracy = np.asarray(state.extra["accuracy_ema"])
    return {**super().finalize(state, workdir), "bit_set": list(self.bits), "switchable": True,
            "train_accuracy_ema": {v.name: float(a) for v, a in zip(self.variants, accuracy)}}
