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
(teachers frozen, BatchNorm in inference mode: only the student learns; refused
unless the teachers were trained first, by ``warmup_epochs`` or a
``pretrained_checkpoint``), ``feature_loss=False`` (``gamma = 0``).
``warmup_epochs`` first trains every network alone with CE (a short QAT warm-up);
``pretrained_checkpoint`` starts every network from an ``fp`` run of the same model.
Options: :class:`CMTKDOptions`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qflax import distill, models, options, quant
from qflax.methods import networks
from qflax.methods.base import Method, MethodOptions, Start, Variant, VariantNetwork

IMPORTANCE = ("learned", "equal")


@dataclasses.dataclass(frozen=True)
class CMTKDOptions(MethodOptions):
  teacher_bits: tuple = options.bit_widths((8, 6, 4), allow_full_precision=False, doc="the teachers' bit-widths")
  fusion_points: tuple = options.integers((), minimum=1, order="increasing",
                                          doc="block counts after which features fuse; (): the model's stage ends")
  alpha: float = options.number(1.0, minimum=0.0, doc="weight of the CE terms")
  beta: float = options.number(0.5, minimum=0.0, doc="weight of the mutual-learning KL terms")
  gamma: float = options.number(100.0, minimum=0.0, doc="weight of the attention-transfer feature loss")
  temperature: float = options.number(4.0, minimum=0.0, strict=True, doc="T of the MinLogit ensemble")
  importance: str = options.choice("learned", IMPORTANCE, doc="learned importance pi, or equal (ablation)")
  importance_lr_multiplier: float = options.number(0.1, minimum=0.0, strict=True, doc="rho's learning rate")
  mutual_learning: bool = options.boolean(True, doc="False: frozen teachers (ablation)")
  feature_loss: bool = options.boolean(True, doc="False: no attention-transfer loss (ablation)")
  remat_teachers: bool = options.boolean(False, doc="jax.checkpoint on teacher segments (memory)")
  warmup_epochs: int = options.integer(0, doc="epochs of every network alone with CE first")
  pretrained_checkpoint: str = options.text("", doc="workdir of an fp run that starts every network")
  teacher_weight_decay: float = options.number(1e-4, minimum=0.0, doc="the teachers' (the spec's 1e-4 above 2 bits; "
                                               "optimizer.weight_decay is the student's)")

  def check(self):
    bits = self.run.bits
    if len(bits) != 1:
      options.invalid("bits", bits, "one bit-width for method cmtkd (the student's; the teachers' are "
                      "method.teacher_bits)")
    if bits[0] in self.teacher_bits:
      self.fail("teacher_bits", "distinct bit-widths in 1..8, other than the student's")
    num_blocks = self.run.model.build(10, models.QuantSpec()).num_blocks
    if self.fusion_points and self.fusion_points[-1] >= num_blocks:
      self.fail("fusion_points", f"block counts below the model's {num_blocks} blocks")
    if self.warmup_epochs >= self.run.num_epochs:
      self.fail("warmup_epochs", f"an integer in 0..{self.run.num_epochs - 1} (num_epochs - 1)")
    if not self.mutual_learning and not (self.warmup_epochs or self.pretrained_checkpoint):
      self.fail("mutual_learning", "True, unless the teachers are trained first (method.warmup_epochs > 0 or "
                "method.pretrained_checkpoint): frozen teachers that never trained teach nothing")

  @property
  def starts(self):
    if not self.pretrained_checkpoint:
      return ()
    return (Start("method.pretrained_checkpoint", self.pretrained_checkpoint, self.run.model, ("student", "teachers")),)


class CMTKD(Method):
  name = "cmtkd"
  Options = CMTKDOptions

  def __init__(self, opts, task):
    super().__init__(opts, task)
    o = opts
    self.student_bits = o.bits[0]
    self.teacher_bits = o.teacher_bits
    bit_set = self.teacher_bits + (self.student_bits,)
    self.model = networks.build_model(o.run, task.num_classes, bit_set)
    plans = networks.stacked_plans(self.model, bit_set)
    self.teacher_plans = jax.tree_util.tree_map(lambda a: a[:-1], plans)
    self.student_plan = networks.plan_at(plans, -1)
    self.num_blocks = self.model.num_blocks
    self.fusion_points = o.fusion_points or self.model.stage_ends
    self.act_quantizer = quant.get_quantizer(o.run.quant.act_quantizer, "activation")
    warmup = o.warmup_epochs
    cmtkd = {"student": 1.0}
    if o.mutual_learning:
      cmtkd.update(teachers=1.0, **({"importance": o.importance_lr_multiplier} if o.importance == "learned" else {}))
    teachers = {"teachers": dataclasses.replace(o.run.optimizer, weight_decay=o.teacher_weight_decay)}
    self.phases = ((self.phase("warmup", warmup, {"student": 1.0, "teachers": 1.0}, settings=teachers),)
                   if warmup else ()) + (self.phase("cmtkd", o.run.num_epochs - warmup, cmtkd, settings=teachers),)
    b = self.student_bits
    self.variants = (Variant(networks.variant_name(b, b), b, b),) + tuple(
        Variant(f"teacher_{networks.variant_name(t, t)}", t, t) for t in self.teacher_bits)

  def init_state(self, rng):
    k_student, k_teachers = jax.random.split(rng)
    student = self.model.init(k_student, self.sample_input, self.student_plan)
    teachers = jax.vmap(lambda k: self.model.init(k, self.sample_input, self.student_plan))(
        jax.random.split(k_teachers, len(self.teacher_bits)))
    params = {"student": student["params"], "teachers": teachers["params"],
              "importance": {"logits": jnp.zeros((len(self.fusion_points), len(self.teacher_bits)), jnp.float32)}}
    batch_stats = {"student": student.get("batch_stats", {}), "teachers": teachers.get("batch_stats", {})}
    return self.new_state(params, batch_stats)

  def importance_weights(self, params):
    """``pi``: ``(fusion points, teachers)``, softmax of the logits (or uniform)."""
    logits = params["importance"]["logits"]
    if self.options.importance == "equal":
      return jnp.full(logits.shape, 1.0 / len(self.teacher_bits))
    return jax.nn.softmax(logits, axis=-1)

  def forward(self, params, batch_stats, x, *, fuse: bool, train_teachers: bool):
    """Teachers (mapped over their stack) and student, segment by segment.

    Returns ``(z_student, z_teachers (n, ...), fused features, student
    features at the fusion points, teachers' features before each fusion, new
    batch stats)``. With ``fuse=False`` every network runs alone.
    """
    mode = self.options.bit_axis
    bounds = (0,) + self.fusion_points + (self.num_blocks,)
    pi = self.importance_weights(params)
    p_t, bs_t, p_s, bs_s = params["teachers"], batch_stats["teachers"], params["student"], batch_stats["student"]
    n = len(self.teacher_bits)
    h_t = jnp.zeros((n,) + x.shape, x.dtype)
    h_s = x
    fused, student_features, teacher_features = [], [], []
    for k in range(len(bounds) - 1):
      blocks = self._blocks_fn(bounds[k], bounds[k + 1], x)
      teacher_fn = jax.checkpoint(blocks(train_teachers)) if self.options.remat_teachers else blocks(train_teachers)
      h_t, bs_t = networks.map_bit_axis(teacher_fn, mode, p_t, bs_t, self.teacher_plans, h_t)
      h_s, bs_s = blocks(True)(p_s, bs_s, self.student_plan, h_s)
      if k < len(bounds) - 2 and fuse:
        h_t = h_t.astype(jnp.float32)   # quantized, fused and compared in float32 (compute_dtype)
        q = jnp.stack([self.act_quantizer.apply(h_t[i], self.teacher_bits[i], self.act_quantizer.defaults)
                       for i in range(n)])
        f = jnp.tensordot(pi[k], q, axes=1)
        teacher_features.append(h_t)
        fused.append(f)
        student_features.append(h_s.astype(jnp.float32))
        h_t = jnp.broadcast_to(f, h_t.shape)
    head = self._blocks_fn(self.num_blocks, None, x)
    z_t, bs_t = networks.map_bit_axis(head(train_teachers), mode, p_t, bs_t, self.teacher_plans, h_t)
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
    o = self.options
    fuse = phase == "cmtkd"
    train_teachers = not fuse or o.mutual_learning
    z_s, z_t, fused, h_s, _, new_stats = self.forward(params, batch_stats, x, fuse=fuse,
                                                      train_teachers=train_teachers)
    ce_s = distill.cross_entropy(z_s, y)
    ce_t = jax.vmap(lambda z: distill.cross_entropy(z, y))(z_t)
    if not fuse:
      return ce_s + jnp.sum(ce_t), (ce_s, z_s, z_t, {}, new_stats)
    ensemble = distill.min_logit_ensemble(jnp.concatenate([z_t, z_s[None]]), y)
    tau = o.temperature
    kl_s = distill.kd_kl(z_s, ensemble, tau)
    kl_t = jax.vmap(lambda z: distill.kd_kl(z, ensemble, tau))(z_t)
    feat = distill.attention_transfer_loss(h_s, fused) if o.feature_loss else jnp.zeros(())
    gamma = o.gamma if o.feature_loss else 0.0
    student = o.alpha * ce_s + o.beta * kl_s + gamma * feat
    teachers = o.alpha * jnp.sum(ce_t) + o.beta * jnp.sum(kl_t) if train_teachers else jnp.zeros(())
    parts = {"ce_student": ce_s, "kl_student": kl_s, "feature": feat, "teachers": teachers}
    return student + teachers, (student, z_s, z_t, parts, new_stats)

  def train_step(self, state, x, y, rng, phase_index):
    del rng
    phase = self.phases[phase_index]

    def loss_fn(trained):
      return self.loss({**state.params, **trained}, state.batch_stats, x, y, phase.name)

    (loss, (_, z_s, z_t, parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {g: state.params[g] for g in phase.trains})
    if "teachers" not in phase.trains:
      batch_stats = {**batch_stats, "teachers": state.batch_stats["teachers"]}
    new_state = self.apply_gradients(state, phase_index, grads, batch_stats=batch_stats)
    metrics = {"loss": loss, "accuracy": distill.accuracy(z_s, y), **{f"loss/{k}": v for k, v in parts.items()}}
    for i, b in enumerate(self.teacher_bits):
      metrics[f"accuracy/teacher_{networks.variant_name(b, b)}"] = distill.accuracy(z_t[i], y)
    pi = self.importance_weights(new_state.params)
    for k in range(pi.shape[0]):
      for i, b in enumerate(self.teacher_bits):
        metrics[f"importance/{k}/w{b}"] = pi[k, i]
    return new_state, metrics

  def network(self, state, index):
    """Variant ``index`` (0: the student, ``1..n``: teacher ``index - 1`` run alone)."""
    pick = lambda s, t: jax.tree_util.tree_map(
        lambda a, b: jnp.where(index == 0, a, jax.lax.dynamic_index_in_dim(b, jnp.maximum(index - 1, 0),
                                                                          keepdims=False)), s, t)
    variables = {"params": pick(state.params["student"], state.params["teachers"]),
                 "batch_stats": pick(state.batch_stats["student"], state.batch_stats["teachers"])}
    plans = jax.tree_util.tree_map(lambda s, t: jnp.concatenate([s[None], t]), self.student_plan, self.teacher_plans)
    return VariantNetwork(self.model, variables, networks.plan_at(plans, index), self.options.run.model)

  def finalize(self, state, workdir):
    pi = np.asarray(self.importance_weights(state.params))
    return {**super().finalize(state, workdir), "teacher_bits": list(self.teacher_bits),
            "fusion_points": list(self.fusion_points),
            "importance": {f"fusion_{k}": {f"w{b}": float(pi[k, i]) for i, b in enumerate(self.teacher_bits)}
                           for k in range(pi.shape[0])}}
