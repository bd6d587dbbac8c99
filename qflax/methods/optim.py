"""Optimizers and learning-rate schedules from :class:`qflax.options.OptimizerSettings`.

One parameter group's update, with learning rate ``lr(t)`` and multiplier ``m``::

  kernels:                 w <- w - m lr(t) opt(g + wd w)        (adamw: decoupled wd)
  activation clips (PACT): a <- a - m lr(t) r_in  opt(g + wd_clip a)
  other quantizer scalars: s <- s - m lr(t) r opt(g)             r = r_in (inputs) or r_w (kernels)
  biases, BatchNorm:       b <- b - m lr(t) opt(g)

``wd`` is ``weight_decay``, ``wd_clip`` is ``clip_weight_decay`` (PACT's L2 penalty on
its clip, Choi et al. 2018), ``r_in`` is ``quantizer_lr_multiplier`` and ``r_w`` is
``weight_quantizer_lr_multiplier`` (QIL weight intervals need a smaller rate than
activation intervals). Scaling an update is the same as scaling the learning rate for
SGD, Adam and AdamW.

Example:
  >>> schedule = learning_rate_schedule(settings, total_steps=1000, steps_per_epoch=100)
  >>> tx = make_optimizer(settings, schedule, multiplier=0.1)
"""

from __future__ import annotations

import flax
import optax
from flax import traverse_util

from qflax import nn as qnn
from qflax.options import OptimizerSettings

CLIP_PARAMS = ("input_alpha",)   # PACT's clip value


def _mask(predicate):
  def mask(params):
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    return traverse_util.unflatten_dict({k: predicate(k) for k in flat})
  return mask


weight_decay_mask = _mask(lambda path: path[-1] == "kernel")
clip_mask = _mask(lambda path: path[-1] in CLIP_PARAMS)


def quantizer_mask(role: str):
  """True for the learnable scalars of the activation (``"input"``) or weight
  (``"kernel"``) quantizers."""
  return _mask(lambda path: qnn.quantizer_param(path) == role)


def learning_rate_schedule(settings: OptimizerSettings, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """``cosine`` (to 0), ``step`` (x0.1 at ``step_milestones`` fractions), or ``constant``,
  after ``warmup_epochs`` of linear warm-up."""
  lr = settings.learning_rate
  warmup = min(int(settings.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  if settings.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps)
  elif settings.schedule == "step":
    main = optax.piecewise_constant_schedule(lr, {int(f * decay_steps): 0.1 for f in settings.step_milestones})
  else:
    main = optax.constant_schedule(lr)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _base(settings: OptimizerSettings, schedule) -> optax.GradientTransformation:
  decay = optax.add_decayed_weights(settings.weight_decay, weight_decay_mask)
  if settings.name == "sgd":
    return optax.chain(decay, optax.sgd(schedule, momentum=settings.momentum or None, nesterov=settings.nesterov))
  if settings.name == "adam":
    return optax.chain(decay, optax.adam(schedule))
  return optax.adamw(schedule, weight_decay=settings.weight_decay, mask=weight_decay_mask)


def make_optimizer(settings: OptimizerSettings, schedule: optax.Schedule,
                   multiplier: float = 1.0) -> optax.GradientTransformation:
  """One parameter group's optimizer (see the module docstring)."""
  parts = []
  if settings.clip_weight_decay:
    parts.append(optax.add_decayed_weights(settings.clip_weight_decay, clip_mask))
  parts.append(_base(settings, schedule))
  for role, rate in (("input", settings.quantizer_lr_multiplier),
                     ("kernel", settings.kernel_quantizer_lr_multiplier)):
    if rate != 1.0:
      parts.append(optax.masked(optax.scale(rate), quantizer_mask(role)))
  if multiplier != 1.0:
    parts.append(optax.scale(multiplier))
  return optax.chain(*parts)
