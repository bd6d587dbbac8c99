"""Progressive quantization, stochastic precision and joint knowledge distillation.

Zhuang, Tan, Liu, Liu, Reid, Shen, "Effective Training of Convolutional Neural
Networks with Low-bitwidth Weights and Activations", TPAMI 2021 (arXiv
1908.04680); Zhuang, Shen, Tan, Liu, Reid, "Towards Effective Low-bitwidth
Convolutional Neural Networks", CVPR 2018.

Low-bit students, one per bit-width in ``config.bits`` (stacked replicas),
trained with any combination of:

* **two-stage** (``two_stage``): at each bit-width, weights only first
  (activations at 32 bits), then weights and activations;
* **progressive** (``progressive_bits``, e.g. ``(32, 8, 4)``): stages at each of
  these bit-widths before the target, each starting from the previous stage's
  weights (a student never goes below its target: stage bits ``max(p, target)``);
* **stochastic precision** (``stochastic_precision``): one stage in which every
  block is quantized with probability ``r`` and full precision otherwise (one
  Bernoulli per block and step, traced), ``r`` on the ``staircase``
  0.5/0.75/0.875/1.0 at equal fractions of the stage or ``linear`` from 0.5 to 1
  by ``sp_linear_end`` of it. BatchNorm keeps a quantized and a full-precision
  slot (``sp_batch_norm="separate"``), or one shared slot recalibrated in
  quantized mode afterwards (``"recalibrate"``: an extra BN-only phase of
  ``recalibration_epochs``);
* **joint KD** (``joint_kd``) with a full-precision model of the same
  architecture trained in the same step, both from their own losses::

    mutual:  L_low = ls CE(y, z_low) + lsk T^2 KL(sg p_fp || p_low)
             L_fp  = lt CE(y, z_fp)  + ltk T^2 mean_students KL(sg p_low || p_fp)
    guided:  R = 0.5 sum_{last two stages} mean((Q(psi_fp) - psi_low)^2)
             L_low = CE + lambda R(psi_fp under sg);  L_fp = CE + lambda mean_students R(psi_low under sg)

  ``Q`` is the students' activation quantizer at the student's activation bits.

Stages are phases (fresh optimizer, restarted schedule); their lengths are
``stage_epochs`` or an equal split of ``num_epochs``. Each student is evaluated
at its target bit-width.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from qflax import distill, models, quant
from qflax import nn as qnn
from qflax.methods import common
from qflax.methods.base import Method, Phase, TrainState, Variant
from qflax.methods.optim import make_optimizer

JOINT_KD = ("none", "mutual", "guided")
SP_SCHEDULES = ("staircase", "linear")
SP_BATCH_NORM = ("separate", "recalibrate")
DEFAULTS = {"two_stage": False, "progressive_bits": (), "stage_epochs": (), "stochastic_precision": False,
            "sp_schedule": "staircase", "sp_linear_end": 0.7, "sp_batch_norm": "separate",
            "recalibration_epochs": 1, "joint_kd": "none", "temperature": 1.0, "lambda_s": 0.7, "lambda_sk": 0.7,
            "lambda_t": 1.0, "lambda_tk": 0.5, "hint_weight": 0.1}
_STAIRCASE = (0.5, 0.75, 0.875, 1.0)


def stage_bits(targets, opts) -> list[list[tuple[int, int]]]:
  """Per stage, per student: ``(weight bits, activation bits)``."""
  if opts["stochastic_precision"]:
    return [[(t, t) for t in targets]]
  stages = []
  for p in tuple(opts["progressive_bits"]) + (0,):
    bits = [(max(p, t), max(p, t)) for t in targets]
    if opts["two_stage"] and any(w < 32 for w, _ in bits):
      stages.append([(w, 32) for w, _ in bits])
    stages.append(bits)
  return stages


def stochastic_precision_ratio(step, total_steps: int, schedule: str, linear_end: float = 0.7) -> jax.Array:
  """The probability ``r`` that a block is quantized at ``step`` of ``total_steps``.

  ``staircase``: 0.5, 0.75, 0.875, 1.0 over four equal parts; ``linear``: from 0.5
  to 1.0 at ``linear_end * total_steps``, then 1.0.
  """
  t = jnp.asarray(step, jnp.float32) / max(total_steps, 1)
  if schedule == "staircase":
    return jnp.asarray(_STAIRCASE)[jnp.clip(jnp.floor(t * 4).astype(jnp.int32), 0, 3)]
  return 0.5 + 0.5 * jnp.clip(t / linear_end, 0.0, 1.0)


class Progressive(Method):
  name = "progressive"

  @classmethod
  def validate_config(cls, config, error):
    o = common.MethodOptions(config, DEFAULTS, cls.name, error)
    if any(b >= 32 for b in config.bits):
      raise error(f"config field bits={tuple(config.bits)!r} is invalid for progressive; allowed: the low "
                  "bit-widths of the students (1..8); the full-precision model is method.joint_kd")
    o.boolean("two_stage")
    o.boolean("stochastic_precision")
    p = tuple(o["progressive_bits"])
    if any(not (b == 32 or 1 <= b <= 8) for b in p) or list(p) != sorted(set(p), reverse=True) or (
        p and p[-1] <= min(config.bits)):
      o.fail("progressive_bits", f"distinct bit-widths in decreasing order, each above the lowest target "
             f"{min(config.bits)}, e.g. (32, 8, 4)")
    if o["stochastic_precision"] and (p or o["two_stage"]):
      o.fail("stochastic_precision", "False when two_stage or progressive_bits is set (it replaces the stages)")
    o.choice("joint_kd", JOINT_KD)
    o.choice("sp_schedule", SP_SCHEDULES)
    o.choice("sp_batch_norm", SP_BATCH_NORM)
    o.number("temperature", strict=True)
    o.number("sp_linear_end", strict=True, maximum=1.0)
    for field in ("lambda_s", "lambda_sk", "lambda_t", "lambda_tk", "hint_weight"):
      o.number(field)
    o.integer("recalibration_epochs", 1)
    count = len(stage_bits(config.bits, o))
    epochs = tuple(o["stage_epochs"])
    if epochs:
      if len(epochs) != count or any(not isinstance(e, numbers.Integral) or e < 1 for e in epochs):
        o.fail("stage_epochs", f"{count} positive epoch counts (one per stage) or () for an equal split")
      if sum(epochs) != config.num_epochs:
        raise error(f"config field num_epochs={config.num_epochs} is invalid; allowed: {sum(epochs)} "
                    "(the sum of method.stage_epochs)")
    elif config.num_epochs < count:
      raise error(f"config field num_epochs={config.num_epochs} is invalid; allowed: at least {count} "
                  f"(one per stage)")

  def __init__(self, config, num_classes: int, steps_per_epoch: int):
    self.config = config
    self.opts = o = common.MethodOptions(config, DEFAULTS, self.name, ValueError)
    self.bits = tuple(int(b) for b in config.bits)
    self.steps_per_epoch = steps_per_epoch
    self.separate_fp_slot = o["stochastic_precision"] and o["sp_batch_norm"] == "separate"
    bit_set = (min(self.bits), 32) if self.separate_fp_slot else (min(self.bits),)
    self.student = common.build_model(config, num_classes, common.quant_spec(config, bit_set))
    self.num_blocks = models.num_blocks(self.student)
    self.teacher = None
    if o["joint_kd"] != "none":
      self.teacher = models.get_model(config.model.name, num_classes, models.QuantSpec(),
                                      **dict(config.model.options))
    self.act_quantizer = quant.get_quantizer(config.quant.act_quantizer, "activation")

    stages = stage_bits(self.bits, o)
    num_slots = len(bit_set)
    plan = lambda bits: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[
        qnn.make_plan([w] * self.num_blocks, [a] * self.num_blocks, [0] * self.num_blocks, num_slots)
        for w, a in bits])
    self.stage_plans = [plan(bits) for bits in stages]
    self.fp_plan = qnn.make_plan([32] * self.num_blocks, [32] * self.num_blocks,
                                 [num_slots - 1] * self.num_blocks, num_slots)
    self.eval_plans = plan([(t, t) for t in self.bits])
    epochs = list(o["stage_epochs"]) or self._equal_split(int(config.num_epochs), len(stages))
    if o["stochastic_precision"]:
      self._phases = [Phase("stochastic_precision", epochs[0])]
      if o["sp_batch_norm"] == "recalibrate":
        self._phases.append(Phase("bn_recalibration", int(o["recalibration_epochs"])))
        self.stage_plans.append(self.stage_plans[0])
    else:
      low = [bits[-1] for bits in stages]
      self._phases = [Phase(f"stage{i + 1}_w{w}a{a}", e) for i, ((w, a), e) in enumerate(zip(low, epochs))]

  @staticmethod
  def _equal_split(total, count):
    return [total // count] * (count - 1) + [total - (total // count) * (count - 1)]

  def phases(self):
    return list(self._phases)

  def _optimizer(self, phase_index):
    steps = self._phases[phase_index].num_epochs * self.steps_per_epoch
    return make_optimizer(self.config.optimizer, steps, self.steps_per_epoch)

  def init_state(self, rng, sample_x):
    k_student, k_teacher = jax.random.split(rng)
    student = self.student.init(k_student, sample_x, common.plan_at(self.eval_plans, 0))
    params = {"students": common.stack_replicas(student["params"], len(self.bits))}
    batch_stats = {"students": common.stack_replicas(student.get("batch_stats", {}), len(self.bits))}
    if self.teacher is not None:
      teacher = self.teacher.init(k_teacher, sample_x, self._teacher_plan())
      params["teacher"], batch_stats["teacher"] = teacher["params"], teacher.get("batch_stats", {})
    return self.start_phase(TrainState(jnp.int32(0), params, batch_stats, None, {}), 0)

  def _teacher_plan(self):
    return qnn.uniform_plan(self.num_blocks, 32, (32,))

  def start_phase(self, state, phase_index):
    """Carries parameters and statistics over; only the optimizer (and the plan) change."""
    return state.replace(opt_state=self._optimizer(phase_index).init(state.params))

  def calibrate(self, state, batches):
    students = common.calibrate_replicas(self.student, self.eval_plans, state.params["students"],
                                         state.batch_stats["students"], batches)
    return state.replace(params={**state.params, "students": students})

  def plans(self, state, rng, phase_index):
    """The students' plans for this step (stochastic precision draws the masks);
    returns ``(plans, ratio)``."""
    plans = self.stage_plans[phase_index]
    if self._phases[phase_index].name != "stochastic_precision":
      return plans, jnp.float32(1.0)
    total = self._phases[phase_index].num_epochs * self.steps_per_epoch
    ratio = stochastic_precision_ratio(state.step, total, self.opts["sp_schedule"], self.opts["sp_linear_end"])
    masks = jnp.stack([distill.swap_mask(jax.random.fold_in(rng, k), self.num_blocks, ratio)
                       for k in range(len(self.bits))])
    return qnn.mix_plans(masks, plans, self.fp_plan), ratio

  def losses(self, params, batch_stats, x, y, plans):
    """``(sum of losses, (per-student losses, student logits, teacher logits, new stats))``."""
    o = self.opts
    kd = o["joint_kd"]
    guided = kd == "guided"

    def forward(model, p, bs, plan):
      (logits, features), updates = model.apply({"params": p, "batch_stats": bs}, x, plan, train=True,
                                                return_features=True, mutable=["batch_stats"])
      return logits, distill.stage_outputs(features), updates["batch_stats"]

    z_fp = psi_fp = None
    if self.teacher is not None:
      z_fp, psi_fp, teacher_stats = forward(self.teacher, params["teacher"], batch_stats["teacher"],
                                            self._teacher_plan())

    def student(p, bs, plan):
      z, psi, bs = forward(self.student, p, bs, plan)
      ce = common.cross_entropy(z, y)
      if kd == "none":
        return ce, jnp.zeros(()), z, bs
      a_bits = plan.a_bits[-1]
      q = lambda h: self.act_quantizer.apply(h, a_bits, self.act_quantizer.defaults)
      if kd == "mutual":
        low = o["lambda_s"] * ce + o["lambda_sk"] * distill.kd_kl(z, z_fp, o["temperature"])
        to_fp = distill.kd_kl(z_fp, z, o["temperature"])
      else:
        low = ce + o["hint_weight"] * distill.hint_loss(psi, [q(h) for h in psi_fp])
        to_fp = distill.hint_loss([q(h) for h in psi_fp], psi)
      return low, to_fp, z, bs

    low, to_fp, z, student_stats = common.map_bit_axis(student, self.config.method.bit_axis, params["students"],
                                                       batch_stats["students"], plans)
    new_stats = {"students": student_stats}
    total = jnp.sum(low)
    if self.teacher is not None:
      new_stats["teacher"] = teacher_stats
      ce_fp = common.cross_entropy(z_fp, y)
      if guided:
        total += ce_fp + o["hint_weight"] * jnp.mean(to_fp)
      else:
        total += o["lambda_t"] * ce_fp + o["lambda_tk"] * jnp.mean(to_fp)
    return total, (low, z, z_fp, new_stats)

  def train_step(self, state, x, y, rng, phase_index):
    plans, ratio = self.plans(state, rng, phase_index)
    if self._phases[phase_index].name == "bn_recalibration":
      def stats(p, bs, plan):
        return self.student.apply({"params": p, "batch_stats": bs}, x, plan, train=True,
                                  mutable=["batch_stats"])[1]["batch_stats"]
      student_stats = common.map_bit_axis(stats, self.config.method.bit_axis, state.params["students"],
                                          state.batch_stats["students"], plans)
      new_state = state.replace(step=state.step + 1, batch_stats={**state.batch_stats, "students": student_stats})
      return new_state, {"loss": jnp.zeros(()), "accuracy": jnp.zeros(())}
    tx = self._optimizer(phase_index)
    (loss, (low, z, z_fp, batch_stats)), grads = jax.value_and_grad(self.losses, has_aux=True)(
        state.params, state.batch_stats, x, y, plans)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    accuracies = jnp.mean(jnp.argmax(z, -1) == y[None], axis=-1)
    metrics = {"loss": loss, "accuracy": jnp.mean(accuracies), "quantized_ratio": ratio}
    for j, variant in enumerate(self.variants()[:len(self.bits)]):
      metrics[f"accuracy/{variant.name}"] = accuracies[j]
      metrics[f"loss/{variant.name}"] = low[j]
    if z_fp is not None:
      metrics["accuracy/fp32"] = common.accuracy(z_fp, y)
    return new_state, metrics

  def variants(self):
    students = [Variant(common.variant_name(b, b), b, b) for b in self.bits]
    return students + ([Variant("fp32", 32, 32)] if self.teacher is not None else [])

  def _student_variables(self, state, index):
    return {"params": common.replica(state.params["students"], index),
            "batch_stats": common.replica(state.batch_stats["students"], index)}

  def eval_logits(self, state, x, variant_index):
    k = len(self.bits)
    student = lambda i: self.student.apply(self._student_variables(state, i), x, common.plan_at(self.eval_plans, i),
                                           train=False)
    if self.teacher is None:
      return student(variant_index)
    teacher = lambda i: self.teacher.apply({"params": state.params["teacher"],
                                            "batch_stats": state.batch_stats["teacher"]}, x, self._teacher_plan(),
                                           train=False)
    return jax.lax.cond(variant_index < k, student, teacher, variant_index)

  def model_bytes(self, state, variant_index, sample_x):
    if variant_index < len(self.bits):
      variables = jax.tree_util.tree_map(np.asarray, self._student_variables(state, variant_index))
      return common.export_model_bytes(self.student, variables, sample_x,
                                       common.plan_at(self.eval_plans, variant_index))
    variables = jax.tree_util.tree_map(np.asarray, {"params": state.params["teacher"],
                                                    "batch_stats": state.batch_stats["teacher"]})
    return common.export_model_bytes(self.teacher, variables, sample_x, self._teacher_plan())

  def report(self, state):
    del state
    return {"stages": [p.name for p in self._phases], "joint_kd": self.opts["joint_kd"]}
