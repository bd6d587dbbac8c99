"""QKD: quantization-aware knowledge distillation.

Kim, Bhalgat, Lee, Patel, Kwak, "QKD: Quantization-aware Knowledge
Distillation", arXiv 1911.12491, 2019.

A quantized student (QIL learnable-interval quantizers in the configs, first and
last layers at 8 bits) and a separate full-precision teacher go through three
phases, each with a fresh optimizer and a restarted schedule::

  self_studying (SS):  L_S = CE(y, z_S)
  co_studying (CS):    L_S = CE(y, z_S) + a KD(z_S, sg(z_T))
                       L_T = CE(y, z_T) + a KD(z_T, sg(z_S))      both update, one step
  tutoring (TU):       L_S = CE(y, z_S) + a KD(z_S, z_T)          teacher frozen, BN in inference mode
  KD(z_s, z_t) = tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau))

The teacher is any registered model (``method.teacher_model``), loaded from the
final checkpoint of an ``fp`` run (``method.teacher_checkpoint``) or trained
first with CE in a ``teacher`` phase (``method.teacher_epochs``). The student
may start from an ``fp`` run of its own architecture (``method.student_checkpoint``).
Every bit-width in ``config.bits`` gets its own (student, teacher) pair, stacked
and mapped like ``qat`` replicas. Phases of 0 epochs are skipped, so SS only
(plain QAT) is ``phase_epochs=(E, 0, 0)`` and plain KD from a fixed teacher is
``(0, 0, E)``.

Options (``method.*``): ``teacher_model`` (``resnet56``), ``teacher_options``
(model options), ``teacher_checkpoint`` (``""``), ``teacher_epochs`` (0),
``student_checkpoint`` (``""``), ``phase_epochs`` ((30, 100, 70); with
``teacher_epochs`` they must add up to ``num_epochs``), ``temperature`` (2.0),
``kd_weight`` (a, 1.0), ``teacher_lr_multiplier`` (0.1, the teacher's learning
rate in CS relative to the student's).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from qflax import distill, models
from qflax.methods import common
from qflax.methods.base import Method, Phase, TrainState, Variant
from qflax.methods.optim import make_optimizer

PHASES = ("self_studying", "co_studying", "tutoring")
DEFAULTS = {"teacher_model": "resnet56", "teacher_options": {}, "teacher_checkpoint": "", "teacher_epochs": 0,
            "student_checkpoint": "", "phase_epochs": (30, 100, 70), "temperature": 2.0, "kd_weight": 1.0,
            "teacher_lr_multiplier": 0.1}
# Which networks each phase trains, and whether the student's loss has the KD term.
_TRAINS = {"teacher": ("teacher",), "self_studying": ("student",), "co_studying": ("student", "teacher"),
           "tutoring": ("student",)}
_STUDENT_KD = ("co_studying", "tutoring")


class QKD(Method):
  name = "qkd"

  @classmethod
  def validate_config(cls, config, error):
    o = common.MethodOptions(config, DEFAULTS, cls.name, error)
    o.choice("teacher_model", models.model_names())
    try:
      models.get_model(o["teacher_model"], 10, models.QuantSpec(), **dict(o["teacher_options"]))
    except (TypeError, ValueError) as e:
      o.fail("teacher_options", f"options of model {o['teacher_model']!r} ({e})")
    epochs = o["phase_epochs"]
    if (not isinstance(epochs, (tuple, list)) or len(epochs) != 3
        or any(isinstance(e, bool) or not isinstance(e, numbers.Integral) or e < 0 for e in epochs)
        or not sum(epochs)):
      o.fail("phase_epochs", "three epoch counts >= 0 (self-studying, co-studying, tutoring), not all 0")
    teacher_epochs = o.integer("teacher_epochs")
    if teacher_epochs and o["teacher_checkpoint"]:
      o.fail("teacher_epochs", "0 when method.teacher_checkpoint is set (load the teacher or train it, not both)")
    if config.num_epochs != teacher_epochs + sum(epochs):
      raise error(f"config field num_epochs={config.num_epochs} is invalid for qkd; allowed: "
                  f"{teacher_epochs + sum(epochs)} (method.teacher_epochs + sum(method.phase_epochs))")
    o.number("temperature", strict=True)
    o.number("kd_weight")
    o.number("teacher_lr_multiplier", strict=True)
    if o["teacher_checkpoint"]:
      common.check_pretrained_run(o["teacher_checkpoint"], o["teacher_model"], o["teacher_options"],
                                  "method.teacher_checkpoint", error)
    if o["student_checkpoint"]:
      common.check_pretrained_run(o["student_checkpoint"], config.model.name, config.model.options,
                                  "method.student_checkpoint", error)

  def __init__(self, config, num_classes: int, steps_per_epoch: int):
    self.config = config
    self.opts = o = common.MethodOptions(config, DEFAULTS, self.name, ValueError)
    self.bits = tuple(int(b) for b in config.bits)
    self.student = common.build_model(config, num_classes, common.quant_spec(config, self.bits))
    self.teacher = models.get_model(o["teacher_model"], num_classes, models.QuantSpec(),
                                    **dict(o["teacher_options"]))
    self.student_plans = common.stacked_plans(self.student, self.bits)
    self.teacher_plans = common.stacked_plans(self.teacher, (32,))
    self.steps_per_epoch = steps_per_epoch
    phases = [Phase("teacher", int(o["teacher_epochs"]))] + [Phase(n, int(e)) for n, e in zip(PHASES, o["phase_epochs"])]
    self._phases = [p for p in phases if p.num_epochs]

  def phases(self):
    return list(self._phases)

  def _optimizers(self, phase_index):
    """``{"student": tx, "teacher": tx}`` of a phase; the teacher's learning rate is
    scaled by ``teacher_lr_multiplier`` while it co-studies."""
    phase = self._phases[phase_index]
    steps = phase.num_epochs * self.steps_per_epoch
    teacher_config = self.config.optimizer.copy_and_resolve_references()
    if phase.name == "co_studying":
      teacher_config.learning_rate *= self.opts["teacher_lr_multiplier"]
    return {"student": make_optimizer(self.config.optimizer, steps, self.steps_per_epoch),
            "teacher": make_optimizer(teacher_config, steps, self.steps_per_epoch)}

  def init_state(self, rng, sample_x):
    k_student, k_teacher = jax.random.split(rng)
    student = self.student.init(k_student, sample_x, common.plan_at(self.student_plans, 0))
    teacher = self.teacher.init(k_teacher, sample_x, common.plan_at(self.teacher_plans, 0))
    k = len(self.bits)
    params = {"student": common.stack_replicas(student["params"], k),
              "teacher": common.stack_replicas(teacher["params"], k)}
    batch_stats = {"student": common.stack_replicas(student.get("batch_stats", {}), k),
                   "teacher": common.stack_replicas(teacher.get("batch_stats", {}), k)}
    return self.start_phase(TrainState(jnp.int32(0), params, batch_stats, None, {}), 0)

  def start_phase(self, state, phase_index):
    txs = self._optimizers(phase_index)
    return state.replace(opt_state={n: txs[n].init(state.params[n]) for n in txs})

  def pretrained_checkpoints(self):
    roles = {"teacher": self.opts["teacher_checkpoint"], "student": self.opts["student_checkpoint"]}
    return {role: path for role, path in roles.items() if path}

  def load_pretrained(self, state, role, arrays):
    source = common.fp_run_variables(arrays)
    target = {"params": common.replica(state.params[role], 0),
              "batch_stats": common.replica(state.batch_stats[role], 0)}
    merged = {c: common.merge_pretrained(target[c], source[c], f"{role} checkpoint") for c in target}
    k = len(self.bits)
    params = {**state.params, role: common.stack_replicas(merged["params"], k)}
    batch_stats = {**state.batch_stats, role: common.stack_replicas(merged["batch_stats"], k)}
    return self.start_phase(state.replace(params=params, batch_stats=batch_stats), 0)

  def calibrate(self, state, batches):
    student = common.calibrate_replicas(self.student, self.student_plans, state.params["student"],
                                        state.batch_stats["student"], batches)
    return state.replace(params={**state.params, "student": student})

  def pair_losses(self, params, batch_stats, x, y, phase: str):
    """Per (student, teacher) pair: ``(L_S, L_T, z_S, z_T, new batch stats)``, stacked.

    A network the phase does not train has a zero loss and keeps its statistics;
    the teacher runs in inference mode outside its own phases, and not at all in SS
    (its logits are then ``None``, like the student's in the teacher phase).
    """
    trains = _TRAINS[phase]
    tau, weight = self.opts["temperature"], self.opts["kd_weight"]
    teacher_plan = common.plan_at(self.teacher_plans, 0)

    def forward(model, p, bs, plan, train):
      if not train:
        return model.apply({"params": p, "batch_stats": bs}, x, plan, train=False), bs
      logits, updates = model.apply({"params": p, "batch_stats": bs}, x, plan, train=True, mutable=["batch_stats"])
      return logits, updates["batch_stats"]

    def pair(ps, bss, pt, bst, plan):
      z_s = z_t = None
      loss_s = loss_t = jnp.zeros(())
      if phase != "teacher":
        z_s, bss = forward(self.student, ps, bss, plan, "student" in trains)
        loss_s = common.cross_entropy(z_s, y)
      if phase != "self_studying":
        z_t, bst = forward(self.teacher, pt, bst, teacher_plan, "teacher" in trains)
      if phase in _STUDENT_KD:
        loss_s += weight * distill.kd_kl(z_s, z_t, tau)
      if "teacher" in trains:
        loss_t = common.cross_entropy(z_t, y)
      if phase == "co_studying":
        loss_t += weight * distill.kd_kl(z_t, z_s, tau)
      return loss_s, loss_t, z_s, z_t, {"student": bss, "teacher": bst}

    return common.map_bit_axis(pair, self.config.method.bit_axis, params["student"], batch_stats["student"],
                               params["teacher"], batch_stats["teacher"], self.student_plans)

  def train_step(self, state, x, y, rng, phase_index):
    del rng
    phase = self._phases[phase_index].name
    trains = _TRAINS[phase]
    txs = self._optimizers(phase_index)

    def loss_fn(trained):
      loss_s, loss_t, z_s, z_t, batch_stats = self.pair_losses({**state.params, **trained}, state.batch_stats, x,
                                                               y, phase)
      return jnp.sum(loss_s) + jnp.sum(loss_t), (loss_s, loss_t, z_s, z_t, batch_stats)

    trained = {n: state.params[n] for n in trains}
    (_, (loss_s, loss_t, z_s, z_t, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    params, opt_state = common.update_groups(txs, grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"loss": jnp.sum(loss_s) + jnp.sum(loss_t)}
    for role, logits, losses in (("student", z_s, loss_s), ("teacher", z_t, loss_t)):
      if logits is None:
        continue
      accuracies = jnp.mean(jnp.argmax(logits, -1) == y[None], axis=-1)
      if role == trains[0]:
        metrics["accuracy"] = jnp.mean(accuracies)
      for j, b in enumerate(self.bits):
        name = common.variant_name(b, b) if role == "student" else f"teacher_{common.variant_name(b, b)}"
        metrics[f"accuracy/{name}"] = accuracies[j]
        if role in trains:
          metrics[f"loss/{name}"] = losses[j]
    return new_state, metrics

  def variants(self):
    students = [Variant(common.variant_name(b, b), b, b) for b in self.bits]
    return students + [Variant(f"teacher_{v.name}", 32, 32) for v in students]

  def _variables(self, state, role, index):
    return {"params": common.replica(state.params[role], index),
            "batch_stats": common.replica(state.batch_stats[role], index)}

  def eval_logits(self, state, x, variant_index):
    k = len(self.bits)
    student = lambda i: self.student.apply(self._variables(state, "student", i), x,
                                           common.plan_at(self.student_plans, i), train=False)
    teacher = lambda i: self.teacher.apply(self._variables(state, "teacher", i - k), x,
                                           common.plan_at(self.teacher_plans, 0), train=False)
    return jax.lax.cond(variant_index < k, student, teacher, variant_index)

  def model_bytes(self, state, variant_index, sample_x):
    k = len(self.bits)
    if variant_index < k:
      model, role, plan = self.student, "student", common.plan_at(self.student_plans, variant_index)
    else:
      model, role, plan = self.teacher, "teacher", common.plan_at(self.teacher_plans, 0)
    variables = jax.tree_util.tree_map(np.asarray, self._variables(state, role, variant_index % k))
    return common.export_model_bytes(model, variables, sample_x, plan)

  def report(self, state):
    del state
    return {"teacher_model": self.opts["teacher_model"], "phases": [p.name for p in self._phases]}
