"""PyTorch reference implementations of the networks, quantizers and train steps
that ``benchmarks/torch_vs_qflax.py`` times against qflax.

Everything mirrors qflax (``qflax/models/{resnet,convnet}.py``,
``qflax/quant/_src/{sat,pact}.py``, ``qflax/methods/{qat,aao,cmtkd}.py``):

* SAT weights (``quant.sat_weight``, not centred): ``u = (tanh w + m) / 2m``,
  ``codes = clip(floor(2^k u), 0, 2^k - 1)``, ``w_q = (codes - 2^(k-1)) 2^(1-k) r``
  with the variance rescale ``r = 1 / (sqrt(fan_out) std(2 codes / 2^k - 1))``
  computed from exact integer sums in the same float32 order as qflax, so the codes
  and ``w_q`` are bit-identical. Straight-through gradient of ``(2u - 1) r``
  (``r`` constant). Raw weights at 32 bits.
* PACT activations (``quant.pact``, ``gradient="pact"``): ``alpha round(clip(x, 0,
  alpha) / alpha (2^k - 1)) / (2^k - 1)``, gradient 1 on ``[0, alpha)`` for ``x`` and
  ``sum(g [x >= alpha])`` for ``alpha``; one ``alpha`` per layer and bit-width slot.
* Switchable BatchNorm: private affine parameters and running statistics per slot
  (``momentum 0.9`` in Flax's convention is ``0.1`` in PyTorch's, ``eps 1e-5``).
  PyTorch moves the running variance with the *unbiased* batch variance and Flax with
  the biased one: the training loss does not depend on it.
* Bit-widths are Python ints (the PyTorch-idiomatic form): full-precision layers
  skip the quantizer, and ``torch.compile`` specialises on them.

The first convolution and the classifier are full precision (``quant.first_last="fp"``).
Tensors are NCHW (``channels_last`` memory format on request), kernels OIHW;
:func:`load_flax_params` copies a qflax parameter tree (NHWC / HWIO) in.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FULL = 32
_TINY = 1e-12
_MIN_ALPHA = 1e-6

# A block's precision: (w_bits, a_bits, slot); a plan is one per block.
Precision = tuple[int, int, int]


def uniform_plan(num_blocks: int, bits: int, slot: int) -> tuple[Precision, ...]:
  return tuple((bits, bits, slot) for _ in range(num_blocks))


# --- quantizers ---------------------------------------------------------------------


def _f32_sum(values: torch.Tensor) -> torch.Tensor:
  """Exact int64 sum rounded once to float32 (qflax's ``_exact_sum``)."""
  return values.sum(dtype=torch.int64).to(torch.float32)


def sat_codes(w: torch.Tensor, bits: int) -> torch.Tensor:
  """SAT integer codes in ``[0, 2^k - 1]`` (float tensor holding integers)."""
  n = float(2 ** bits)
  t = torch.tanh(w)
  m = t.abs().max().clamp_min(_TINY)
  u = (t + m) / (2.0 * m)
  return torch.clamp(torch.floor(n * u), 0.0, n - 1.0)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
  """Correctly rounded float32 square root (via float64; torch's float32 CPU ``sqrt`` can be
  one ulp off, XLA's is exact)."""
  return torch.sqrt(x.double()).float()


def sat_rescale(codes: torch.Tensor, bits: int, fan_out: int) -> torch.Tensor:
  """``1 / (sqrt(fan_out) std(e / 2^k))`` with ``e = 2 codes - 2^k``, in qflax's float32 order."""
  n = float(2 ** bits)
  size = codes.numel()
  inv_size = torch.tensor(1.0 / size, dtype=torch.float32)
  e = 2 * codes.to(torch.int64) - (1 << bits)
  shift = torch.round(_f32_sum(e) * inv_size).to(torch.int64)
  d = e - shift
  mean = torch.abs(_f32_sum(d) * inv_size)
  rms = _sqrt(_f32_sum(d * d) * inv_size)
  std = _sqrt(torch.clamp((rms - mean) * (rms + mean), min=0.0)) / n
  # A float32 sqrt(fan_out), as JAX rounds the Python float (torch would multiply in double).
  root = torch.tensor(math.sqrt(fan_out), dtype=torch.float32)
  return 1.0 / (root * torch.clamp(std, min=_TINY))


def sat_weight(w: torch.Tensor, bits: int, fan_out: int) -> torch.Tensor:
  """SAT fake-quantized weights (straight-through); ``w`` itself at 32 bits."""
  if bits >= FULL:
    return w
  n = float(2 ** bits)
  t = torch.tanh(w)
  m = t.abs().max().clamp_min(_TINY)
  u = (t + m) / (2.0 * m)
  with torch.no_grad():
    codes = torch.clamp(torch.floor(n * u), 0.0, n - 1.0)
    rescale = sat_rescale(codes, bits, fan_out)
    quantized = (codes - n / 2.0) * ((2.0 / n) * rescale)
  surrogate = (2.0 * u - 1.0) * rescale
  # Exactly ``quantized`` in the forward pass (s - s == 0), the gradient of ``surrogate``.
  return surrogate - surrogate.detach() + quantized


class _PACT(torch.autograd.Function):

  @staticmethod
  def forward(ctx, x, alpha, bits: int):
    top = float(2 ** bits - 1)
    a = alpha.clamp_min(_MIN_ALPHA)
    out = torch.round(torch.minimum(torch.clamp(x, min=0.0), a) / a * top) * (a / top)
    ctx.save_for_backward(x, alpha)
    return out

  @staticmethod
  def backward(ctx, g):
    x, alpha = ctx.saved_tensors
    grad_x = torch.where((x >= 0) & (x < alpha), g, 0.0)
    grad_alpha = torch.where(x >= alpha, g, 0.0).sum().reshape(alpha.shape) if ctx.needs_input_grad[1] else None
    return grad_x, grad_alpha, None


def pact(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
  """PACT with the clip gradient of Choi et al.; identity at 32 bits."""
  if bits >= FULL:
    return x
  return _PACT.apply(x, alpha, bits)


# --- layers -------------------------------------------------------------------------


class QConv(nn.Module):
  """Conv2d without bias; with ``quantize`` its input goes through PACT (one alpha per
  slot) and its kernel through SAT, as ``qflax.nn.QuantConv(weight_quantizer="sat",
  act_quantizer="pact")``."""

  def __init__(self, cin, cout, kernel, stride=1, padding=None, *, quantize=True, num_slots=1, alpha=8.0):
    super().__init__()
    self.stride, self.padding = stride, kernel // 2 if padding is None else padding
    self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
    nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
    self.quantize = quantize
    self.fan_out = cout * kernel * kernel
    if quantize:
      self.input_alpha = nn.Parameter(torch.full((num_slots,), float(alpha)))

  def forward(self, x, p: Precision = (FULL, FULL, 0)):
    w = self.weight
    if self.quantize:
      w_bits, a_bits, slot = p
      x = pact(x, self.input_alpha[slot], a_bits)
      w = sat_weight(w, w_bits, self.fan_out)
    return F.conv2d(x, w, None, self.stride, self.padding)


class SwitchableBN(nn.Module):
  """BatchNorm2d with ``num_slots`` private parameter sets and running statistics."""

  def __init__(self, channels, num_slots=1, momentum=0.1, eps=1e-5):
    super().__init__()
    self.momentum, self.eps = momentum, eps
    self.weight = nn.Parameter(torch.ones(num_slots, channels))
    self.bias = nn.Parameter(torch.zeros(num_slots, channels))
    self.register_buffer("running_mean", torch.zeros(num_slots, channels))
    self.register_buffer("running_var", torch.ones(num_slots, channels))

  def forward(self, x, slot: int = 0, update: bool = True):
    if self.training and not update:   # batch statistics, running averages untouched
      return F.batch_norm(x, None, None, self.weight[slot], self.bias[slot], True, 0.0, self.eps)
    return F.batch_norm(x, self.running_mean[slot], self.running_var[slot], self.weight[slot], self.bias[slot],
                        self.training, self.momentum, self.eps)


# --- networks -----------------------------------------------------------------------


class BasicBlock(nn.Module):
  """Post-activation block: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``."""

  def __init__(self, cin, cout, stride, *, quantize, num_slots, alpha):
    super().__init__()
    q = dict(quantize=quantize, num_slots=num_slots, alpha=alpha)
    self.conv1 = QConv(cin, cout, 3, stride, 1, **q)
    self.bn1 = SwitchableBN(cout, num_slots)
    self.conv2 = QConv(cout, cout, 3, 1, 1, **q)
    self.bn2 = SwitchableBN(cout, num_slots)
    self.has_shortcut = stride != 1 or cin != cout
    if self.has_shortcut:
      self.shortcut_conv = QConv(cin, cout, 1, stride, 0, **q)
      self.shortcut_bn = SwitchableBN(cout, num_slots)

  def forward(self, x, p: Precision, update: bool = True):
    slot = p[2]
    y = F.relu(self.bn1(self.conv1(x, p), slot, update))
    y = self.bn2(self.conv2(y, p), slot, update)
    s = self.shortcut_bn(self.shortcut_conv(x, p), slot, update) if self.has_shortcut else x
    return F.relu(y + s)


class ConvBlock(nn.Module):
  """``maxpool?(relu(bn(conv3x3 x)))``."""

  def __init__(self, cin, cout, pool, *, quantize, num_slots, alpha):
    super().__init__()
    self.conv = QConv(cin, cout, 3, 1, 1, quantize=quantize, num_slots=num_slots, alpha=alpha)
    self.bn = SwitchableBN(cout, num_slots)
    self.pool = pool

  def forward(self, x, p: Precision, update: bool = True):
    y = F.relu(self.bn(self.conv(x, p), p[2], update))
    return F.max_pool2d(y, 2) if self.pool else y


class Network(nn.Module):
  """Stem, blocks, head, runnable segment by segment like ``qflax.models.Network``."""

  def stem(self, x, update: bool = True):
    return F.relu(self.stem_bn(self.stem_conv(x), 0, update))

  def run_blocks(self, h, plan: Sequence[Precision], start: int, end: int, update: bool = True):
    for i in range(start, end):
      h = self.blocks[i](h, plan[i], update)
    return h

  def forward(self, x, plan: Sequence[Precision], update: bool = True, update_stem: bool | None = None):
    h = self.stem(x, update if update_stem is None else update_stem)
    return self.head(self.run_blocks(h, plan, 0, len(self.blocks), update))


class CifarResNet(Network):
  """CIFAR ResNet-(6n+2), post-activation, widths 16/32/64 (``models.cifar_resnet``)."""

  def __init__(self, depth=20, num_classes=100, *, quantize=True, num_slots=1, alpha=8.0, in_channels=3):
    super().__init__()
    n = (depth - 2) // 6
    q = dict(quantize=quantize, num_slots=num_slots, alpha=alpha)
    self.stem_conv = QConv(in_channels, 16, 3, 1, 1, quantize=False)
    self.stem_bn = SwitchableBN(16, 1)
    blocks, cin = [], 16
    for stage, width in enumerate((16, 32, 64)):
      for i in range(n):
        blocks.append(BasicBlock(cin, width, 2 if stage > 0 and i == 0 else 1, **q))
        cin = width
    self.blocks = nn.ModuleList(blocks)
    self.classifier = nn.Linear(64, num_classes)
    self.stage_ends = (n, 2 * n)

  def head(self, h):
    return self.classifier(h.mean(dim=(2, 3)))


class ConvNet(Network):
  """The quickstart ConvNet (``models.convnet``, ``head_type="flatten"``) for 28x28 inputs."""

  def __init__(self, num_classes=10, widths=(16, 32, 64), *, quantize=True, num_slots=1, alpha=4.0, in_channels=1,
               image_size=28):
    super().__init__()
    q = dict(quantize=quantize, num_slots=num_slots, alpha=alpha)
    self.stem_conv = QConv(in_channels, widths[0], 3, 1, 1, quantize=False)
    self.stem_bn = SwitchableBN(widths[0], 1)
    blocks, cin = [], widths[0]
    for i, w in enumerate(widths):
      blocks.append(ConvBlock(cin, w, i < 2, **q))
      cin = w
    self.blocks = nn.ModuleList(blocks)
    side = image_size // 4
    self.classifier = nn.Linear(side * side * widths[-1], num_classes)

  def head(self, h):
    # Flax flattens NHWC: keep that order so the classifier weights carry over.
    return self.classifier(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1))


# --- qflax parameters in ------------------------------------------------------------


def _torch_name(path) -> str:
  parts = []
  for key in path:
    key = str(key)
    if key.startswith("blocks_"):
      parts += ["blocks", key.split("_", 1)[1]]
    else:
      parts.append({"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}.get(key, key))
  return ".".join(parts)


def load_flax_params(model: nn.Module, params, batch_stats=None) -> None:
  """Copies one qflax network's ``params`` (and ``batch_stats``) into ``model``:
  HWIO conv kernels -> OIHW, ``(in, out)`` dense kernels -> ``(out, in)``, BatchNorm
  ``scale`` -> ``weight``, ``mean``/``var`` -> running statistics. Every tensor of
  ``model`` must be covered."""
  from flax import traverse_util
  flat = dict(traverse_util.flatten_dict(params))
  flat.update(traverse_util.flatten_dict(batch_stats or {}))
  state = model.state_dict()
  loaded = {}
  for path, value in flat.items():
    name = _torch_name(path)
    if name not in state:
      raise KeyError(f"{'/'.join(map(str, path))} -> {name} is not in the torch model")
    a = np.asarray(value, np.float32)
    if path[-1] == "kernel":
      a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    if tuple(a.shape) != tuple(state[name].shape):
      raise ValueError(f"{name}: qflax {a.shape} vs torch {tuple(state[name].shape)}")
    loaded[name] = torch.from_numpy(np.ascontiguousarray(a))
  missing = set(state) - set(loaded)
  if missing:
    raise KeyError(f"not set from qflax: {sorted(missing)}")
  model.load_state_dict(loaded)


# --- optimizers and steps ------------------------------------------------------------


def _is_kernel(name: str, p: torch.Tensor) -> bool:
  return name.endswith("weight") and p.ndim >= 2 and "bn" not in name


def sgd(modules, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True, groups=None):
  """Nesterov SGD with weight decay on conv/dense kernels only (qflax's ``optimizer``
  defaults; constant learning rate). ``groups``: extra ``(params, lr multiplier, wd)``."""
  decay, rest = [], []
  for m in modules:
    for name, p in m.named_parameters():
      (decay if _is_kernel(name, p) else rest).append(p)
  param_groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
  for params, multiplier, wd in groups or ():
    param_groups.append({"params": params, "lr": lr * multiplier, "weight_decay": wd})
  return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=True, fused=fused)


def adam(modules, lr=2e-3, fused=True):
  """Adam without weight decay (the quickstart config)."""
  return torch.optim.Adam([p for m in modules for p in m.parameters()], lr=lr, fused=fused)


def kd_kl(student, teacher, temperature=1.0):
  """``T^2 KL(sg softmax(z_t / T) || softmax(z_s / T))``, batch mean (``distill.kd_kl``)."""
  t = F.log_softmax(teacher.detach() / temperature, dim=-1)
  s = F.log_softmax(student / temperature, dim=-1)
  return temperature * temperature * (t.exp() * (t - s)).sum(-1).mean()


class QATStep:
  """``fp`` / ``qat`` at one bit-width: CE, backward, optimizer step."""

  def __init__(self, model, optimizer, plan, forward=None):
    self.model, self.optimizer, self.plan = model, optimizer, plan
    self.forward = model if forward is None else forward

  def loss(self, x, y):
    return F.cross_entropy(self.forward(x, self.plan), y)

  def __call__(self, x, y):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(x, y)
    loss.backward()
    self.optimizer.step()
    return loss.detach()


class AAOStep:
  """AAO (``methods.aao``) over ``bits`` (descending), one shared network with
  ``len(bits)`` slots: ``K`` pure forwards (forward ``k`` moves slot ``k``'s running
  statistics; the stem's move in forward 0) and, with ``swap``, ``K - 1`` hybrid
  forwards (each block at the teacher's bits and slot with probability ``p_swap``,
  batch statistics, running averages untouched), one backward.

  The teacher is *fixed*: the highest bit-width (qflax's ``method.teacher="fixed"``;
  qflax's default ``adaptive`` also picks index 0 until its running statistics
  differ, and the choice does not change the cost). Loss as qflax's::

    CE(y, z_0) + sum_j [(1 - beta) CE(y, z_j) + beta T^2 KL(sg p_t || p_j)]
               + lambda sum_j [(1 - beta) CE(y, z_hj) + beta T^2 KL(sg p_t || p_hj)]
  """

  def __init__(self, model, optimizer, bits=(32, 8, 6, 4, 2), *, swap=True, swap_probability=0.5, beta=1.0,
               temperature=1.0, swap_weight=1.0, seed=0):
    self.model, self.optimizer = model, optimizer
    self.bits = tuple(sorted(bits, reverse=True))
    self.num_blocks = len(model.blocks)
    self.plans = [uniform_plan(self.num_blocks, b, k) for k, b in enumerate(self.bits)]
    self.swap, self.p_swap, self.beta, self.temperature, self.swap_weight = (swap, swap_probability, beta,
                                                                            temperature, swap_weight)
    self.generator = torch.Generator().manual_seed(seed)

  def masks(self):
    draws = torch.rand(len(self.bits) - 1, self.num_blocks, generator=self.generator) < self.p_swap
    return draws.tolist()

  def student_terms(self, z, z_teacher, y):
    return (1 - self.beta) * F.cross_entropy(z, y) + self.beta * kd_kl(z, z_teacher, self.temperature)

  def loss(self, x, y, masks=None):
    logits = [self.model(x, plan, update=True, update_stem=(k == 0)) for k, plan in enumerate(self.plans)]
    teacher = logits[0]
    total = F.cross_entropy(logits[0], y)
    for j in range(1, len(self.bits)):
      total = total + self.student_terms(logits[j], teacher, y)
    if self.swap and self.swap_weight > 0:
      masks = self.masks() if masks is None else masks
      for j in range(1, len(self.bits)):
        plan = [self.plans[0][i] if masks[j - 1][i] else self.plans[j][i] for i in range(self.num_blocks)]
        z = self.model(x, plan, update=False)
        total = total + self.swap_weight * self.student_terms(z, teacher, y)
    return total, logits

  def __call__(self, x, y):
    self.optimizer.zero_grad(set_to_none=True)
    loss, _ = self.loss(x, y)
    loss.backward()
    self.optimizer.step()
    return loss.detach()


def attention_map(h, eps=1e-12):
  a = h.square().sum(1).reshape(h.shape[0], -1)   # NCHW: channels on axis 1
  return a / torch.clamp(torch.linalg.vector_norm(a, dim=-1, keepdim=True), min=eps)


class CMTKDStep:
  """CMT-KD (``methods.cmtkd``): ``len(teacher_bits)`` teachers and a student, each its
  own network with ``n + 1`` slots (teacher ``i`` at slot ``i``, the student at the
  last), run as a loop segment by segment; after every stage but the last the
  teachers' PACT-quantized features (clip 8, each at its bits) are fused with
  ``softmax(rho_k)`` and become every teacher's next input. Loss: ``alpha (CE_s +
  sum CE_i) + beta (T^2 KL(p_ens || p_s) + sum_i T^2 KL(p_ens || p_i)) + gamma
  sum_k mean((AT(sg F_k) - AT(h_s,k))^2)`` with the MinLogit ensemble ``p_ens``."""

  def __init__(self, teachers, student, optimizer_fn, teacher_bits=(8, 6, 4), student_bits=2, *, alpha=1.0, beta=0.5,
               gamma=100.0, temperature=4.0, fuse_alpha=8.0):
    self.teachers, self.student = teachers, student
    self.teacher_bits, self.student_bits = tuple(teacher_bits), student_bits
    n = len(teacher_bits)
    blocks = len(student.blocks)
    self.teacher_plans = [uniform_plan(blocks, b, i) for i, b in enumerate(teacher_bits)]
    self.student_plan = uniform_plan(blocks, student_bits, n)
    self.bounds = (0,) + tuple(student.stage_ends) + (blocks,)
    self.importance = nn.Parameter(torch.zeros(len(self.bounds) - 2, n))
    self.alpha, self.beta, self.gamma, self.temperature = alpha, beta, gamma, temperature
    self.fuse_alpha = torch.tensor(float(fuse_alpha))
    self.optimizer = optimizer_fn(self)

  def forward(self, x):
    n = len(self.teachers)
    pi = torch.softmax(self.importance, dim=-1)
    h_t, h_s = [x] * n, x
    fused, student_features = [], []
    for k in range(len(self.bounds) - 1):
      start, end = self.bounds[k], self.bounds[k + 1]
      h_t = [t.run_blocks(t.stem(h) if start == 0 else h, plan, start, end)
             for t, h, plan in zip(self.teachers, h_t, self.teacher_plans)]
      h_s = self.student.run_blocks(self.student.stem(h_s) if start == 0 else h_s, self.student_plan, start, end)
      if k < len(self.bounds) - 2:
        f = sum(pi[k, i] * pact(h_t[i], self.fuse_alpha, b) for i, b in enumerate(self.teacher_bits))
        fused.append(f)
        student_features.append(h_s)
        h_t = [f] * n
    z_t = [t.head(h) for t, h in zip(self.teachers, h_t)]
    return self.student.head(h_s), z_t, fused, student_features

  def loss(self, x, y):
    z_s, z_t, fused, h_s = self.forward(x)
    everything = torch.stack(z_t + [z_s])
    ensemble = (everything - everything.gather(-1, y[None, :, None].expand(len(everything), -1, 1))).amin(0)
    tau = self.temperature
    ce_t = sum(F.cross_entropy(z, y) for z in z_t)
    kl_t = sum(kd_kl(z, ensemble, tau) for z in z_t)
    feat = sum(((attention_map(f.detach()) - attention_map(h)) ** 2).mean() for f, h in zip(fused, h_s))
    student = self.alpha * F.cross_entropy(z_s, y) + self.beta * kd_kl(z_s, ensemble, tau) + self.gamma * feat
    return student + self.alpha * ce_t + self.beta * kl_t

  def __call__(self, x, y):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(x, y)
    loss.backward()
    self.optimizer.step()
    return loss.detach()


def cmtkd_sgd(step: CMTKDStep, lr=0.1, fused=True):
  """qflax's CMT-KD groups: student kernels wd 5e-4, teacher kernels wd 1e-4, the
  importance logits at 0.1 x the learning rate."""
  teacher_kernels, rest = [], []
  for t in step.teachers:
    for name, p in t.named_parameters():
      (teacher_kernels if _is_kernel(name, p) else rest).append(p)
  opt = sgd([step.student], lr=lr, fused=fused,
            groups=[(teacher_kernels, 1.0, 1e-4), (rest, 1.0, 0.0), ([step.importance], 0.1, 0.0)])
  return opt
