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
``(0, 0, E)`` (with a teacher that was loaded or trained first: tutoring from a
teacher that never trained is refused).

Options: :class:`QKDOptions`. The phase lengths (``teacher_epochs`` and
``phase_epochs``) are scaled to ``num_epochs`` when they do not add up to it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qflax import distill, models, options
from qflax.methods import networks
from qflax.methods.base import Method, MethodOptions, Start, Variant, VariantNetwork, apply_network

PHASES = ("self_studying", "co_studying", "tutoring")
# Which networks each phase trains, and whether the student's loss has the KD term.
_TRAINS = {"teacher": ("teacher",), "self_studying": ("student",), "co_studying": ("student", "teacher"),
           "tutoring": ("student",)}
_STUDENT_KD = ("co_studying", "tutoring")


@dataclasses.dataclass(frozen=True)
class QKDOptions(MethodOptions):
  teacher_model: str = options.choice("resnet56", models.model_names(), doc="the full-precision teacher's model")
  teacher_options: dict = options.mapping({}, doc="the teacher model's options")
  teacher_checkpoint: str = options.text("", doc="workdir of an fp run of the teacher model to start it from")
  teacher_epochs: int = options.integer(0, doc="epochs training the teacher with CE first (0: none)")
  student_checkpoint: str = options.text("", doc="workdir of an fp run of the student model to start it from")
  phase_epochs: tuple = options.integers((30, 100, 70), length=3, allowed="three epoch counts >= 0 (self-studying, "
                                         "co-studying, tutoring), not all 0")
  temperature: float = options.number(2.0, minimum=0.0, strict=True, doc="tau")
  kd_weight: float = options.number(1.0, minimum=0.0, doc="weight of the KD terms")
  teacher_lr_multiplier: float = options.number(0.1, minimum=0.0, strict=True,
                                                doc="the teacher's learning rate in co-studying, relative")

  def check(self):
    why = options.model_options_error(self.teacher_model, self.teacher_options)
    if why:
      self.fail("teacher_options", f"options of model {self.teacher_model!r} ({why})")
    if not sum(self.phase_epochs):
      self.fail("phase_epochs", "three epoch counts >= 0 (self-studying, co-studying, tutoring), not all 0")
    if self.teacher_epochs and self.teacher_checkpoint:
      self.fail("teacher_epochs", "0 when method.teacher_checkpoint is set (load the teacher or train it, not both)")
    _, co_studying, tutoring = self.phase_epochs
    if tutoring and not (co_studying or self.teacher_epochs or self.teacher_checkpoint):
      self.fail("phase_epochs", "a tutoring phase after the teacher has trained: a frozen teacher that never "
                "trained teaches nothing (set method.teacher_checkpoint, method.teacher_epochs or co-studying "
                "epochs)")
    try:
      self.epochs
    except ValueError as e:
      options.invalid("num_epochs", self.run.num_epochs, f"at least one per non-empty phase ({e})")

  @property
  def epochs(self) -> tuple[int, ...]:
    """Teacher, self-studying, co-studying and tutoring epochs, scaled to ``num_epochs``."""
    return options.scale_epochs((self.teacher_epochs,) + self.phase_epochs, self.run.num_epochs)

  @property
  def starts(self):
    out = []
    if self.teacher_checkpoint:
      out.append(Start("method.teacher_checkpoint", self.teacher_checkpoint,
                       options.ModelSettings(self.teacher_model, self.teacher_options), ("teacher",)))
    if self.student_checkpoint:
      out.append(Start("method.student_checkpoint", self.student_checkpoint, self.run.model, ("student",)))
    return tuple(out)


class QKD(Method):
  name = "qkd"
  Options = QKDOptions

  def __init__(self, opts, task):
    super().__init__(opts, task)
    self.bits = opts.bits
    self.student, self.student_plans, students = networks.replicas(opts.run, task.num_classes, self.bits)
    self.teacher_settings = options.ModelSettings(opts.teacher_model, opts.teacher_options)
    self.teacher = self.teacher_settings.build(task.num_classes, opts.run.spec())
    self.teacher_plan = networks.plan_at(networks.stacked_plans(self.teacher, (32,)), 0)
    groups = {"teacher": {"teacher": 1.0}, "self_studying": {"student": 1.0},
              "co_studying": {"student": 1.0, "teacher": opts.teacher_lr_multiplier}, "tutoring": {"student": 1.0}}
    self.phases = tuple(self.phase(name, epochs, groups[name])
                        for name, epochs in zip(("teacher",) + PHASES, opts.epochs) if epochs)
    # A teacher that is neither loaded nor trained is random: not reported (self-studying alone).
    teacher_known = opts.teacher_checkpoint or opts.teacher_epochs or opts.phase_epochs[1]
    self.variants = students + tuple(Variant(_teacher_name(v.name), 32, 32) for v in students if teacher_known)

  def init_state(self, rng):
    k_student, k_teacher = jax.random.split(rng)
    student = self.student.init(k_student, self.sample_input, networks.plan_at(self.student_plans, 0))
    teacher = self.teacher.init(k_teacher, self.sample_input, self.teacher_plan)
    k = len(self.bits)
    params = {"student": networks.stack_replicas(student["params"], k),
              "teacher": networks.stack_replicas(teacher["params"], k)}
    batch_stats = {"student": networks.stack_replicas(student.get("batch_stats", {}), k),
                   "teacher": networks.stack_replicas(teacher.get("batch_stats", {}), k)}
    return self.new_state(params, batch_stats)

  def prepare(self, state, batches):
    student = networks.calibrate_replicas(self.student, self.student_plans, state.params["student"],
                                          state.batch_stats["student"], batches)
    return state.replace(params={**state.params, "student": student})

  def pair_losses(self, params, batch_stats, x, y, phase: str):
    """Per (student, teacher) pair: ``(L_S, L_T, z_S, z_T, new batch stats)``, stacked.

    A network the phase does not train has a zero loss and keeps its statistics;
    the teacher runs in inference mode outside its own phases, and not at all in SS
    (its logits are then ``None``, like the student's in the teacher phase).
    """
    trains = _TRAINS[phase]
    tau, weight = self.options.temperature, self.options.kd_weight

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
        loss_s = distill.cross_entropy(z_s, y)
      if phase != "self_studying":
        z_t, bst = forward(self.teacher, pt, bst, self.teacher_plan, "teacher" in trains)
      if phase in _STUDENT_KD:
        loss_s += weight * distill.kd_kl(z_s, z_t, tau)
      if "teacher" in trains:
        loss_t = distill.cross_entropy(z_t, y)
      if phase == "co_studying":
        loss_t += weight * distill.kd_kl(z_t, z_s, tau)
      return loss_s, loss_t, z_s, z_t, {"student": bss, "teacher": bst}

    return networks.map_bit_axis(pair, self.options.bit_axis, params["student"], batch_stats["student"],
                                 params["teacher"], batch_stats["teacher"], self.student_plans)

  def train_step(self, state, x, y, rng, phase_index):
    del rng
    phase = self.phases[phase_index].name
    trains = _TRAINS[phase]

    def loss_fn(trained):
      loss_s, loss_t, z_s, z_t, batch_stats = self.pair_losses({**state.params, **trained}, state.batch_stats, x,
                                                               y, phase)
      return jnp.sum(loss_s) + jnp.sum(loss_t), (loss_s, loss_t, z_s, z_t, batch_stats)

    (_, (loss_s, loss_t, z_s, z_t, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {n: state.params[n] for n in trains})
    new_state = self.apply_gradients(state, phase_index, grads, batch_stats=batch_stats)
    metrics = {"loss": jnp.sum(loss_s) + jnp.sum(loss_t)}
    for role, logits, losses in (("student", z_s, loss_s), ("teacher", z_t, loss_t)):
      if logits is None:
        continue
      accuracies = jnp.mean(jnp.argmax(logits, -1) == y[None], axis=-1)
      if role == trains[0]:
        metrics["accuracy"] = jnp.mean(accuracies)
      for j, b in enumerate(self.bits):
        name = networks.variant_name(b, b)
        name = name if role == "student" else _teacher_name(name)
        metrics[f"accuracy/{name}"] = accuracies[j]
        if role in trains:
          metrics[f"loss/{name}"] = losses[j]
    return new_state, metrics

  def _role_network(self, state, role: str, replica) -> VariantNetwork:
    model, plan, settings = ((self.student, networks.plan_at(self.student_plans, replica), self.options.run.model)
                             if role == "student" else (self.teacher, self.teacher_plan, self.teacher_settings))
    variables = {"params": networks.replica(state.params[role], replica),
                 "batch_stats": networks.replica(state.batch_stats[role], replica)}
    return VariantNetwork(model, variables, plan, settings)

  def network(self, state, index):
    k = len(self.bits)
    return self._role_network(state, "student", index) if index < k else self._role_network(state, "teacher", index - k)

  def eval_logits(self, state, x, variant_index):
    k = len(self.bits)
    student = lambda i: apply_network(self._role_network(state, "student", i), x)
    teacher = lambda i: apply_network(self._role_network(state, "teacher", i - k), x)
    return jax.lax.cond(variant_index < k, student, teacher, variant_index)

  def finalize(self, state, workdir):
    return {**super().finalize(state, workdir), "teacher_model": self.options.teacher_model,
            "phases": [p.name for p in self.phases]}


def _teacher_name(student: str) -> str:
  """The full-precision teacher paired with ``student`` (``teacher_of_w2a2``: not a 2-bit teacher)."""
  return f"teacher_of_{student}"
