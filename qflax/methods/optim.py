"""Optimizers and learning-rate schedules from the config."""

from __future__ import annotations

import flax
import optax
from flax import traverse_util

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


def weight_decay_mask(params):
  """True for convolution and dense kernels only (no biases, BatchNorm, quantizer scalars)."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def quantizer_mask(params):
  """True for learnable quantizer scalars (``input_*`` and ``kernel_*`` parameters)."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  return traverse_util.unflatten_dict({k: k[-1].startswith(("input_", "kernel_")) for k in flat})


def learning_rate_schedule(opt_config, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """``cosine`` (to 0), ``step`` (x0.1 at ``step_milestones`` fractions), or ``constant``,
  after ``warmup_epochs`` of linear warm-up."""
  lr = opt_config.learning_rate
  warmup = min(int(opt_config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  if opt_config.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps)
  elif opt_config.schedule == "step":
    main = optax.piecewise_constant_schedule(
        lr, {int(f * decay_steps): 0.1 for f in opt_config.step_milestones})
  else:
    main = optax.constant_schedule(lr)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(opt_config, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimizer of one phase; weight decay on kernels only, quantizer scalars at
  ``quantizer_lr_multiplier`` times the learning rate."""
  schedule = learning_rate_schedule(opt_config, total_steps, steps_per_epoch)
  name = opt_config.name
  if name == "sgd":
    base = optax.chain(optax.add_decayed_weights(opt_config.weight_decay, weight_decay_mask),
                       optax.sgd(schedule, momentum=opt_config.momentum or None, nesterov=opt_config.nesterov))
  elif name == "adam":
    base = optax.chain(optax.add_decayed_weights(opt_config.weight_decay, weight_decay_mask), optax.adam(schedule))
  else:
    base = optax.adamw(schedule, weight_decay=opt_config.weight_decay, mask=weight_decay_mask)
  multiplier = opt_config.quantizer_lr_multiplier
  if multiplier == 1.0:
    return base
  return optax.chain(base, optax.masked(optax.scale(multiplier), quantizer_mask))
