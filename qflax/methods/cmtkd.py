"""CMT-KD: collaborative multi-teacher knowledge distillation.

Pham, Hoang, Do, "Collaborative Multi-Teacher Knowledge Distillation for
Learning Low Bit-width Deep Neural Networks", WACV 2023 (arXiv 2210.16103).

``n`` quantized teachers (the student's architecture at ``teacher_bits``, e.g.
8/6/4) and a quantized student (``config.bits``, one bit-width) train in one
step. The network is cut into segments at ``fusion_points`` (block indices;
default: the end of every stage but the last). After segment ``k`` the teachers'
features are fused and the fusion becomes every teacher's next input::

  pi_k = softmax(rho_k);   F_k = sum_i pi_k[i] Q(h_i, b_i);   h_i <- F_k
  L_feat = sum_k mean((AT(sg F_k) - AT(h_s,k))^2)
  z_ens[c] = min_m (z_m[c] - z_m[y]) over teachers and student;  p = softmax(sg(z_ens) / T)
  L = alpha (CE(y, z_s) + sum_i CE(y, z_i)) + beta (T^2 KL(p || p_s) + sum_i T^2 KL(p || p_i)) + gamma L_feat

``Q`` is the activation quantizer (HWGQ in the configs) at each teacher's bits.
The teachers run as one ``vmap`` over their stacked parameters with the bits as
data, or as a loop (``method.bit_axis``), optionally rematerialised per segment
(``remat_teachers``). The importance logits ``rho`` learn at
``importance_lr_multiplier`` times the learning rate.

Ablations: ``importance="equal"`` (fixed ``pi = 1/n``), ``mutual_learning=False``
(teachers frozen, BatchNorm in inference mode: only the student learns),
``feature_loss=False`` (``gamma = 0``). ``warmup_epochs`` first trains every
network alone with CE (a short QAT warm-up); ``pretrained_checkpoint`` starts
every network from an ``fp`` run of the same model.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from qflax import distill, models, quant
from qflax.methods import common
from qflax.methods.base import Method, Phase, TrainState, Variant
from qflax.methods.optim import make_optimizer

IMPORTANCE = ("learned", "equal")
DEFAULTS = {"teacher_bits": (8, 6, 4), "fusion_points": (), "alpha": 1.0, "beta": 0.5, "gamma": 100.0,
            "temperature": 4.0, "importance": "learned", "importance_lr_multiplier": 0.1, "mutual_learning": True,
            "feature_loss": True, "remat_teachers": False, "warmup_epochs": 0, "pretrained_checkpoint": ""}


class CMTKD(Method):
  name = "cmtkd"

  @classmethod
  def validate_config(cls, config, error):
    o = common.MethodOptions(config, DEFAULTS, cls.name, error)
    if len(config.bits) != 1:
      raise error(f"config field bits={tuple(config.bits)!r} is invalid for cmtkd; allowed: one bit-width "
                  "(the student's; the teachers' are method.teacher_bits)")
    teacher_bits = tuple(o["teacher_bits"])
    if (not teacher_bits or any(isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 1 <= b <= 8
                                for b in teacher_bits) or len(set(teacher_bits)) != len(teacher_bits)
        or config.bits[0] in teacher_bits):
      o.fail("teacher_bits", "distinct bit-widths in 1..8, other than the student's")
    for field in ("alpha", "beta", "gamma"):
      o.number(field)
    o.number("temperature", strict=True)
    o.number("importance_lr_multiplier", strict=True)
    o.choice("importance", IMPORTANCE)
    for field in ("mutual_learning", "feature_loss", "remat_teachers"):
      o.boolean(field)
    points = tuple(o["fusion_points"])
    if any(isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1 for p in points) or list(
        points) != sorted(set(points)):
      o.fail("fusion_points", "increasing block indices >= 1 (fusion after that many blocks), or () for stage ends")
    num_blocks = models.num_blocks(common.build_model(config, 10, models.QuantSpec()))
    if points and points[-1] >= num_blocks:
      o.fail("fusion_points", f"block counts below the model's {num_blocks} blocks")
    if o.integer("warmup_epochs") >= config.num_epochs:
      o.fail("warmup_epochs", f"an integer in 0..{config.num_epochs - 1} (num_epochs - 1)")
    if o["pretrained_checkpoint"]:
      common.check_pretrained_run(o["pretrained_checkpoint"], config.model.name, config.model.options,
                                  "method.pretrained_checkpoint", error)

  def __init__(self, config, num_classes: int, steps_per_epoch: int):
    self.config = config
    self.opts = o = common.MethodOptions(config, DEFAULTS, self.name, ValueError)
    self.student_bits = int(config.bits[0])
    self.teacher_bits = tuple(int(b) for b in o["teacher_bits"])
    bit_set = self.teacher_bits + (self.student_bits,)
    self.model = common.build_model(config, num_classes, common.quant_spec(config, bit_set))
    plans = common.stacked_plans(self.model, bit_set)
    self.teacher_plans = jax.tree_util.tree_map(lambda a: a[:-1], plans)
    self.student_plan = common.plan_at(plans, -1)
    self.num_blocks = int(self.student_plan.num_blocks)
    self.act_quantizer = quant.get_quantizer(config.quant.act_quantizer, "activation")
    self.steps_per_epoch = steps_per_epoch
    warmup = int(o["warmup_epochs"])
    self._phases = ([Phase("warmup", warmup)] if warmup else []) + [Phase("cmtkd", int(config.num_epochs) - warmup)]
    self.fusion_points = tuple(o["fusion_points"])   # () until init_state finds the stage ends

  def _stage_ends(self, sample_x):
    """Block counts after which a stage ends, all but the last stage's."""
    _, features = jax.eval_shape(lambda v: self.model.apply(v, sample_x, self.student_plan, return_features=True),
                                 self._shapes)
    shapes = [f.shape for f in features]
    return tuple(i + 1 for i in range(len(shapes) - 1) if shapes[i + 1] != shapes[i])

  def phases(self):
    return list(self._phases)

  def _optimizers(self, phase_index):
    steps = self._phases[phase_index].num_epochs * self.steps_per_epoch
    importance = self.config.optimizer.copy_and_resolve_references()
    importance.learning_rate *= self.opts["importance_lr_multiplier"]
    tx = make_optimizer(self.config.optimizer, steps, self.steps_per_epoch)
    return {"student": tx, "teachers": tx, "importance": make_optimizer(importance, steps, self.steps_per_epoch)}

  def init_state(self, rng, sample_x):
    k_student, k_teachers = jax.random.split(rng)
    student = self.model.init(k_student, sample_x, self.student_plan)
    self._shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), student)
    if not self.fusion_points:
      self.fusion_points = self._stage_ends(sample_x)
    teachers = jax.vmap(lambda k: self.model.init(k, sample_x, self.student_plan))(
        jax.random.split(k_teachers, len(self.teacher_bits)))
    params = {"student": student["params"], "teachers": teachers["params"],
              "importance": {"logits": jnp.zeros((len(self.fusion_points), len(self.teacher_bits)), jnp.float32)}}
    batch_stats = {"student": student.get("batch_stats", {}), "teachers": teachers.get("batch_stats", {})}
    return self.start_phase(TrainState(jnp.int32(0), params, batch_stats, None, {}), 0)

  def start_phase(self, state, phase_index):
    txs = self._optimizers(phase_index)
    return state.replace(opt_state={n: txs[n].init(state.params[n]) for n in txs})

  def pretrained_checkpoints(self):
    path = self.opts["pretrained_checkpoint"]
    return {"all": path} if path else {}

  def load_pretrained(self, state, role, arrays):
    """Every teacher and the student start from the same full-precision network."""
    del role
    source = common.fp_run_variables(arrays)
    target = {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}
    merged = {c: common.merge_pretrained(target[c], source[c], "pretrained checkpoint") for c in target}
    n = len(self.teacher_bits)
    params = {**state.params, "student": merged["params"], "teachers": common.stack_replicas(merged["params"], n)}
    batch_stats = {"student": merged["batch_stats"], "teachers": common.stack_replicas(merged["batch_stats"], n)}
    return self.start_phase(state.replace(params=params, batch_stats=batch_stats), 0)

  def importance_weights(self, params):
    """``pi``: ``(fusion points, teachers)``, softmax of the logits (or uniform)."""
    logits = params["importance"]["logits"]
    if self.opts["importance"] == "equal":
      return jnp.full(logits.shape, 1.0 / len(self.teacher_bits))
    return jax.nn.softmax(logits, axis=-1)

  def forward(self, params, batch_stats, x, *, fuse: bool, train_teachers: bool):
    """Teachers (mapped over their stack) and student, segment by segment.

    Returns ``(z_student, z_teachers (n, ...), fused features, student
    features at the fusion points, teachers' features before each fusion, new
    batch stats)``. With ``fuse=False`` every network runs alone.
    """
    mode = self.config.method.bit_axis
    bounds = (0,) + self.fusion_points + (self.num_blocks,)
    pi = self.importance_weights(params)
    p_t, bs_t, p_s, bs_s = params["teachers"], batch_stats["teachers"], params["student"], batch_stats["student"]
    n = len(self.teacher_bits)
    h_t = jnp.zeros((n,) + x.shape, x.dtype)
    h_s = x
    fused, student_features, teacher_features = [], [], []
    for k in range(len(bounds) - 1):
      blocks = self._blocks_fn(bounds[k], bounds[k + 1], x)
      teacher_fn = jax.checkpoint(blocks(train_teachers)) if self.opts["remat_teachers"] else blocks(train_teachers)
      h_t, bs_t = common.map_bit_axis(teacher_fn, mode, p_t, bs_t, self.teacher_plans, h_t)
      h_s, bs_s = blocks(True)(p_s, bs_s, self.student_plan, h_s)
      if k < len(bounds) - 2 and fuse:
        q = jnp.stack([self.act_quantizer.apply(h_t[i], self.teacher_bits[i], self.act_quantizer.defaults)
                       for i in range(n)])
        f = jnp.tensordot(pi[k], q, axes=1)
        teacher_features.append(h_t)
        fused.append(f)
        student_features.append(h_s)
        h_t = jnp.broadcast_to(f, h_t.shape)
    head = self._blocks_fn(self.num_blocks, None, x)
    z_t, bs_t = common.map_bit_axis(head(train_teachers), mode, p_t, bs_t, self.teacher_plans, h_t)
    z_s, bs_s = head(True)(p_s, bs_s, self.student_plan, h_s)
    return z_s, z_t, fused, student_features, teacher_features, {"student": bs_s, "teachers": bs_t}

  def _blocks_fn(self, start, end, x):
    """``train -> ((params, stats, plan, h) -> (h, stats))`` for blocks ``start..end-1``
    (the stem first when ``start == 0``; the head when ``end`` is None)."""
    def make(train):
      def run(p, bs, plan, h):
        variables = {"params": p, "batch_stats": bs}
        mutable = ["batch_stats"] if train else False

        def apply(method, *args):
          nonlocal variables
          out = self.model.apply(variables, *args, train=train, method=method, mutable=mutable)
          if train:
            out, updates = out
            variables = {"params": p, "batch_stats": updates["batch_stats"]}
          return out
        if end is None:
          return apply(self.model.head, h, plan), variables["batch_stats"]
        if start == 0:
          h = apply(self.model.stem, x)
        h = apply(self.model.run_blocks, h, plan, start, end)
        return h, variables["batch_stats"]
      return run
    return make

  def loss(self, params, batch_stats, x, y, phase: str):
    o = self.opts
    fuse = phase == "cmtkd"
    train_teachers = not fuse or o["mutual_learning"]
    z_s, z_t, fused, h_s, _, new_stats = self.forward(params, batch_stats, x, fuse=fuse,
                                                      train_teachers=train_teachers)
    ce_s = common.cross_entropy(z_s, y)
    ce_t = jax.vmap(lambda z: common.cross_entropy(z, y))(z_t)
    if not fuse:
      return ce_s + jnp.sum(ce_t), (ce_s, z_s, z_t, {}, new_stats)
    ensemble = distill.min_logit_ensemble(jnp.concatenate([z_t, z_s[None]]), y)
    tau = o["temperature"]
    kl_s = distill.kd_kl(z_s, ensemble, tau)
    kl_t = jax.vmap(lambda z: distill.kd_kl(z, ensemble, tau))(z_t)
    feat = distill.attention_transfer_loss(h_s, fused) if o["feature_loss"] else jnp.zeros(())
    gamma = o["gamma"] if o["feature_loss"] else 0.0
    student = o["alpha"] * ce_s + o["beta"] * kl_s + gamma * feat
    teachers = o["alpha"] * jnp.sum(ce_t) + o["beta"] * jnp.sum(kl_t) if train_teachers else jnp.zeros(())
    parts = {"ce_student": ce_s, "kl_student": kl_s, "feature": feat, "teachers": teachers}
    return student + teachers, (student, z_s, z_t, parts, new_stats)

  def trained_groups(self, phase: str) -> tuple[str, ...]:
    if phase == "warmup":
      return ("student", "teachers")
    groups = ("student",)
    if self.opts["mutual_learning"]:
      groups += ("teachers",) + (("importance",) if self.opts["importance"] == "learned" else ())
    return groups

  def train_step(self, state, x, y, rng, phase_index):
    del rng
    phase = self._phases[phase_index].name
    groups = self.trained_groups(phase)

    def loss_fn(trained):
      return self.loss({**state.params, **trained}, state.batch_stats, x, y, phase)

    (loss, (_, z_s, z_t, parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {g: state.params[g] for g in groups})
    params, opt_state = common.update_groups(self._optimizers(phase_index), grads, state.opt_state, state.params)
    if "teachers" not in groups:
      batch_stats = {**batch_stats, "teachers": state.batch_stats["teachers"]}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"loss": loss, "accuracy": common.accuracy(z_s, y), **{f"loss/{k}": v for k, v in parts.items()}}
    for i, b in enumerate(self.teacher_bits):
      metrics[f"accuracy/teacher_{common.variant_name(b, b)}"] = common.accuracy(z_t[i], y)
    pi = self.importance_weights(params)
    for k in range(pi.shape[0]):
      for i, b in enumerate(self.teacher_bits):
        metrics[f"importance/{k}/w{b}"] = pi[k, i]
    return new_state, metrics

  def variants(self):
    b = self.student_bits
    return [Variant(common.variant_name(b, b), b, b)] + [
        Variant(f"teacher_{common.variant_name(t, t)}", t, t) for t in self.teacher_bits]

  def _variables(self, state, index):
    """Variant ``index`` (0: the student, ``1..n``: teacher ``index - 1`` run alone)."""
    pick = lambda s, t: jax.tree_util.tree_map(
        lambda a, b: jnp.where(index == 0, a, jax.lax.dynamic_index_in_dim(b, jnp.maximum(index - 1, 0),
                                                                          keepdims=False)), s, t)
    return {"params": pick(state.params["student"], state.params["teachers"]),
            "batch_stats": pick(state.batch_stats["student"], state.batch_stats["teachers"])}

  def _plan(self, index):
    plans = jax.tree_util.tree_map(lambda s, t: jnp.concatenate([s[None], t]), self.student_plan, self.teacher_plans)
    return common.plan_at(plans, index)

  def eval_logits(self, state, x, variant_index):
    return self.model.apply(self._variables(state, variant_index), x, self._plan(variant_index), train=False)

  def model_bytes(self, state, variant_index, sample_x):
    variables = jax.tree_util.tree_map(np.asarray, self._variables(state, variant_index))
    return common.export_model_bytes(self.model, variables, sample_x, self._plan(variant_index))

  def report(self, state):
    pi = np.asarray(self.importance_weights(state.params))
    return {"teacher_bits": list(self.teacher_bits), "fusion_points": list(self.fusion_points),
            "importance": {f"fusion_{k}": {f"w{b}": float(pi[k, i]) for i, b in enumerate(self.teacher_bits)}
                           for k in range(pi.shape[0])}}
