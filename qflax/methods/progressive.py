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
    guided:  R = 0.5 sum_{last two stages} mean((Q(psi_fp) - Q(psi_low))^2)
             L_low = CE + lambda R(psi_fp under sg);  L_fp = CE + lambda mean_students R(psi_low under sg)

  ``Q`` is the students' activation quantizer at the student's activation bits,
  applied to both sides, so the hint compares post-activation features in one range
  (a quantized ``[0, 1]`` feature against a raw signed block output never matches).

Stages are phases (fresh optimizer, restarted schedule, the full-precision
partner's too); their lengths are ``stage_epochs`` (scaled to ``num_epochs`` when
they do not add up to it) or an equal split of ``num_epochs``. Each student is
evaluated at its target bit-width and has its own BatchNorm and quantizer slot.
``pretrained_checkpoint`` starts the students (and the partner) from an ``fp``
run; ``teacher_lr_multiplier`` gives the partner its own learning rate.
Options: :class:`ProgressiveOptions`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qflax import distill, options, quant
from qflax import nn as qnn
from qflax.methods import networks
from qflax.methods.base import Method, MethodOptions, Start, Variant, VariantNetwork, apply_network

JOINT_KD = ("none", "mutual", "guided")
SP_SCHEDULES = ("staircase", "linear")
SP_BATCH_NORM = ("separate", "recalibrate")
_STAIRCASE = (0.5, 0.75, 0.875, 1.0)


@dataclasses.dataclass(frozen=True)
class ProgressiveOptions(MethodOptions):
  two_stage: bool = options.boolean(False, doc="weights first (activations at 32 bits), then both")
  progressive_bits: tuple = options.bit_widths((), min_count=0, order="decreasing",
                                               doc="stages before the target, e.g. (32, 8, 4)")
  stage_epochs: tuple = options.integers((), minimum=1, doc="epochs per stage; (): an equal split of num_epochs")
  stochastic_precision: bool = options.boolean(False, doc="one stage, blocks quantized with probability r")
  sp_schedule: str = options.choice("staircase", SP_SCHEDULES, doc="r: 0.5/0.75/0.875/1 or linear")
  sp_linear_end: float = options.number(0.7, minimum=0.0, maximum=1.0, strict=True,
                                        doc="fraction of the stage where the linear r reaches 1")
  sp_batch_norm: str = options.choice("separate", SP_BATCH_NORM, doc="FP BatchNorm slot, or recalibrate after")
  recalibration_epochs: int = options.integer(1, 1, doc="BN-only epochs of sp_batch_norm=recalibrate")
  joint_kd: str = options.choice("none", JOINT_KD, doc="the full-precision partner")
  temperature: float = options.number(1.0, minimum=0.0, strict=True, doc="T of the mutual KL")
  lambda_s: float = options.number(0.7, minimum=0.0)
  lambda_sk: float = options.number(0.7, minimum=0.0)
  lambda_t: float = options.number(1.0, minimum=0.0)
  lambda_tk: float = options.number(0.5, minimum=0.0)
  hint_weight: float = options.number(0.1, minimum=0.0, doc="lambda of the guided hint loss")
  teacher_lr_multiplier: float = options.number(1.0, minimum=0.0, strict=True,
                                                doc="the full-precision partner's learning rate, relative")
  pretrained_checkpoint: str = options.text("", doc="workdir of an fp run that starts the students and partner")

  def check(self):
    bits = self.run.bits
    if any(b >= 32 for b in bits):
      options.invalid("bits", bits, "the low bit-widths of the students (1..8); the full-precision model is "
                      "method.joint_kd")
    p = self.progressive_bits
    if p and p[-1] <= min(bits):
      self.fail("progressive_bits", f"distinct bit-widths in decreasing order, each above the lowest target "
                f"{min(bits)}, e.g. (32, 8, 4)")
    if self.stochastic_precision and (p or self.two_stage):
      self.fail("stochastic_precision", "False when two_stage or progressive_bits is set (it replaces the stages)")
    count = len(stage_bits(bits, self))
    if self.stage_epochs and len(self.stage_epochs) != count:
      self.fail("stage_epochs", f"{count} positive epoch counts (one per stage) or () for an equal split")
    if self.run.num_epochs < count:
      options.invalid("num_epochs", self.run.num_epochs, f"at least {count} (one per stage)")

  @property
  def epochs(self) -> tuple[int, ...]:
    count = len(stage_bits(self.run.bits, self))
    return options.scale_epochs(self.stage_epochs or (1,) * count, self.run.num_epochs)

  @property
  def starts(self):
    if not self.pretrained_checkpoint:
      return ()
    groups = ("students",) + (("teacher",) if self.joint_kd != "none" else ())
    return (Start("method.pretrained_checkpoint", self.pretrained_checkpoint, self.run.model, groups),)


def stage_bits(targets, opts) -> list[list[tuple[int, int]]]:
  """Per stage, per student: ``(weight bits, activation bits)``."""
  if opts.stochastic_precision:
    return [[(t, t) for t in targets]]
  stages = []
  for p in tuple(opts.progressive_bits) + (0,):
    bits = [(max(p, t), max(p, t)) for t in targets]
    if opts.two_stage and any(w < 32 for w, _ in bits):
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
  Options = ProgressiveOptions

  def __init__(self, opts, task):
    super().__init__(opts, task)
    o = opts
    self.bits = o.bits
    self.separate_fp_slot = o.stochastic_precision and o.sp_batch_norm == "separate"
    # One slot per target bit-width (each student's quantized mode), plus the
    # full-precision slot of stochastic precision.
    self.bit_set = tuple(sorted(set(self.bits), reverse=True)) + ((32,) if self.separate_fp_slot else ())
    self.student = networks.build_model(o.run, task.num_classes, self.bit_set)
    self.num_blocks = self.student.num_blocks
    self.teacher = None if o.joint_kd == "none" else networks.build_model(o.run, task.num_classes)
    self.teacher_plan = qnn.uniform_plan(self.num_blocks, 32, (32,))
    act = quant.get_quantizer(o.run.quant.act_quantizer, "activation")
    self.hint_quantizer = lambda h, bits: act.apply(h, bits, {**act.defaults, **o.run.quant.act_param_init})

    stages = stage_bits(self.bits, o)
    slots = [self.bit_set.index(t) for t in self.bits]
    self.stage_plans = [self._plans(bits, slots) for bits in stages]
    fp_slot = len(self.bit_set) - 1
    self.fp_plans = self._plans([(32, 32)] * len(self.bits), [fp_slot] * len(self.bits))
    self.eval_plans = self._plans([(t, t) for t in self.bits], slots)
    groups = {"students": 1.0, **({"teacher": o.teacher_lr_multiplier} if self.teacher is not None else {})}
    epochs = o.epochs
    if o.stochastic_precision:
      self.phases = (self.phase("stochastic_precision", epochs[0], groups),)
      if o.sp_batch_norm == "recalibrate":
        self.phases += (self.phase("bn_recalibration", o.recalibration_epochs, {}),)
        self.stage_plans.append(self.stage_plans[0])
    else:
      low = [bits[-1] for bits in stages]
      self.phases = tuple(self.phase(f"stage{i + 1}_w{w}a{a}", e, groups)
                          for i, ((w, a), e) in enumerate(zip(low, epochs)))
    students = [Variant(networks.variant_name(b, b), b, b) for b in self.bits]
    self.variants = tuple(students + ([Variant("fp32", 32, 32)] if self.teacher is not None else []))

  def _plans(self, bits, slots) -> qnn.PrecisionPlan:
    """Stacked per-student plans: every block of student ``j`` at ``bits[j]``, slot ``slots[j]``."""
    n = self.num_blocks
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[
        qnn.make_plan([w] * n, [a] * n, [s] * n, len(self.bit_set)) for (w, a), s in zip(bits, slots)])

  def init_state(self, rng):
    k_student, k_teacher = jax.random.split(rng)
    student = self.student.init(k_student, self.sample_input, networks.plan_at(self.eval_plans, 0))
    params = {"students": networks.stack_replicas(student["params"], len(self.bits))}
    batch_stats = {"students": networks.stack_replicas(student.get("batch_stats", {}), len(self.bits))}
    if self.teacher is not None:
      teacher = self.teacher.init(k_teacher, self.sample_input, self.teacher_plan)
      params["teacher"], batch_stats["teacher"] = teacher["params"], teacher.get("batch_stats", {})
    return self.new_state(params, batch_stats)

  def prepare(self, state, batches):
    students = networks.calibrate_replicas(self.student, self.eval_plans, state.params["students"],
                                           state.batch_stats["students"], batches)
    return state.replace(params={**state.params, "students": students})

  def step_plans(self, state, rng, phase_index):
    """The students' plans for this step (stochastic precision draws the masks);
    returns ``(plans, ratio)``."""
    plans = self.stage_plans[phase_index]
    phase = self.phases[phase_index]
    if phase.name != "stochastic_precision":
      return plans, jnp.float32(1.0)
    total = phase.num_epochs * self.task.steps_per_epoch
    ratio = stochastic_precision_ratio(state.step, total, self.options.sp_schedule, self.options.sp_linear_end)
    masks = jnp.stack([distill.swap_mask(jax.random.fold_in(rng, k), self.num_blocks, ratio)
                       for k in range(len(self.bits))])
    return qnn.mix_plans(masks, plans, self.fp_plans), ratio

  def losses(self, params, batch_stats, x, y, plans):
    """``(sum of losses, (per-student losses, student logits, teacher logits, new stats))``."""
    o = self.options

    def forward(model, p, bs, plan):
      (logits, features), updates = model.apply({"params": p, "batch_stats": bs}, x, plan, train=True,
                                                return_features=True, mutable=["batch_stats"])
      return logits, distill.stage_outputs(features), updates["batch_stats"]

    z_fp = psi_fp = None
    if self.teacher is not None:
      z_fp, psi_fp, teacher_stats = forward(self.teacher, params["teacher"], batch_stats["teacher"],
                                            self.teacher_plan)

    def student(p, bs, plan):
      z, psi, bs = forward(self.student, p, bs, plan)
      ce = distill.cross_entropy(z, y)
      if o.joint_kd == "none":
        return ce, jnp.zeros(()), z, bs
      if o.joint_kd == "mutual":
        low = o.lambda_s * ce + o.lambda_sk * distill.kd_kl(z, z_fp, o.temperature)
        to_fp = distill.kd_kl(z_fp, z, o.temperature)
      else:
        low = ce + o.hint_weight * self.hint(psi, psi_fp, plan.a_bits[-1])
        to_fp = self.hint(psi_fp, psi, plan.a_bits[-1])
      return low, to_fp, z, bs

    low, to_fp, z, student_stats = networks.map_bit_axis(student, o.bit_axis, params["students"],
                                                         batch_stats["students"], plans)
    new_stats = {"students": student_stats}
    total = jnp.sum(low)
    if self.teacher is not None:
      new_stats["teacher"] = teacher_stats
      ce_fp = distill.cross_entropy(z_fp, y)
      if o.joint_kd == "guided":
        total += ce_fp + o.hint_weight * jnp.mean(to_fp)
      else:
        total += o.lambda_t * ce_fp + o.lambda_tk * jnp.mean(to_fp)
    return total, (low, z, z_fp, new_stats)

  def hint(self, features, targets, a_bits) -> jax.Array:
    """Guided training's ``R = 0.5 sum_k mean((Q(target_k) - Q(feature_k))^2)`` (targets
    under stop-gradient), both sides at the student's activation levels ``a_bits``."""
    q = lambda hs: [self.hint_quantizer(h, a_bits) for h in hs]
    return distill.hint_loss(q(features), q(targets))

  def _recalibrate(self, state, x, plans):
    def stats(p, bs, plan):
      return self.student.apply({"params": p, "batch_stats": bs}, x, plan, train=True,
                                mutable=["batch_stats"])[1]["batch_stats"]
    student_stats = networks.map_bit_axis(stats, self.options.bit_axis, state.params["students"],
                                          state.batch_stats["students"], plans)
    new_state = state.replace(step=state.step + 1, batch_stats={**state.batch_stats, "students": student_stats})
    return new_state, {"loss": jnp.zeros(()), "accuracy": jnp.zeros(())}

  def train_step(self, state, x, y, rng, phase_index):
    plans, ratio = self.step_plans(state, rng, phase_index)
    if self.phases[phase_index].name == "bn_recalibration":
      return self._recalibrate(state, x, plans)
    trains = self.phases[phase_index].trains

    def loss_fn(trained):
      return self.losses({**state.params, **trained}, state.batch_stats, x, y, plans)

    (loss, (low, z, z_fp, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {g: state.params[g] for g in trains})
    new_state = self.apply_gradients(state, phase_index, grads, batch_stats=batch_stats)
    accuracies = jnp.mean(jnp.argmax(z, -1) == y[None], axis=-1)
    metrics = {"loss": loss, "accuracy": jnp.mean(accuracies), "quantized_ratio": ratio}
    for j, variant in enumerate(self.variants[:len(self.bits)]):
      metrics[f"accuracy/{variant.name}"] = accuracies[j]
      metrics[f"loss/{variant.name}"] = low[j]
    if z_fp is not None:
      metrics["accuracy/fp32"] = distill.accuracy(z_fp, y)
    return new_state, metrics

  def _student_network(self, state, index) -> VariantNetwork:
    variables = {"params": networks.replica(state.params["students"], index),
                 "batch_stats": networks.replica(state.batch_stats["students"], index)}
    return VariantNetwork(self.student, variables, networks.plan_at(self.eval_plans, index), self.options.run.model)

  def _teacher_network(self, state) -> VariantNetwork:
    variables = {"params": state.params["teacher"], "batch_stats": state.batch_stats["teacher"]}
    return VariantNetwork(self.teacher, variables, self.teacher_plan, self.options.run.model)

  def network(self, state, index):
    return self._student_network(state, index) if index < len(self.bits) else self._teacher_network(state)

  def eval_logits(self, state, x, variant_index):
    if self.teacher is None:
      return apply_network(self._student_network(state, variant_index), x)
    return jax.lax.cond(variant_index < len(self.bits), lambda i: apply_network(self._student_network(state, i), x),
                        lambda i: apply_network(self._teacher_network(state), x), variant_index)

  def finalize(self, state, workdir):
    return {**super().finalize(state, workdir), "stages": [p.name for p in self.phases],
            "joint_kd": self.options.joint_kd}
