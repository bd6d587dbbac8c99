"""Initialising quantizer parameters from calibration batches."""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterable

import flax
import jax
import numpy as np
from flax import traverse_util

from qflax import quant
from qflax.nn._src.layers import CALIBRATION
from qflax.nn._src.precision import PrecisionPlan


def calibrate(apply_fn: Callable[..., Any], variables, batches: Iterable[Any],
              plans: Iterable[PrecisionPlan]):
  """Sets every layer's quantizer scalars, per slot, from calibration data.

  For each plan and batch it runs ``apply_fn(variables, batch, plan,
  mutable=["calibration"])``; every quantized layer sows an estimate of its
  learnable quantizer scalars for the slot it ran at (PACT: the clip at or
  below the input's 99.9th percentile with the least error at the slot's bits;
  LSQ: ``2 mean|v| / sqrt(Q_P)``; QIL: the weight interval ``[0, r max|w|]`` with
  the least error, the activation interval ``[0, p99.9]``). Estimates are
  averaged over batches and written into ``params[layer]["input_<name>"][slot]`` (and ``kernel_<name>``).
  Slots no plan visits keep their values. ``apply_fn`` is jitted (once per function; the
  plan is a traced argument), so it must be a pure function of its arguments.

  Returns:
    ``variables`` with updated ``params``.

  Example:
    >>> apply = lambda v, x, p, **kw: model.apply(v, x, p, train=False, **kw)
    >>> variables = calibrate(apply, variables, batches[:4],
    ...                       [uniform_plan(n, b, bit_set) for b in bit_set])
  """
  sums: dict[tuple, float] = collections.defaultdict(float)
  counts: dict[tuple, int] = collections.defaultdict(int)
  batches = list(batches)
  if not batches:
    raise ValueError("calibrate needs at least one batch")
  plans = [_checked(plan) for plan in plans]
  clean = {k: v for k, v in flax.core.unfreeze(variables).items() if k != CALIBRATION}
  for plan in plans:
    for batch in batches:
      state = _sown(apply_fn, clean, batch, plan)
      sown = traverse_util.flatten_dict(flax.core.unfreeze(state.get(CALIBRATION, {})))
      for path, estimates in sown.items():
        *layer, operand = path
        for estimate in estimates:
          slot = int(np.asarray(estimate["slot"]))
          for name, value in estimate.items():
            if name != "slot":
              key = (tuple(layer), f"{operand}_{name}", slot)
              sums[key] += float(np.asarray(value))
              counts[key] += 1
  params = traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]))
  for (layer, param_name, slot), total in sums.items():
    path = (*layer, param_name)
    if path not in params:
      raise KeyError(f"calibration estimate for {'/'.join(path)} has no matching parameter")
    if not 0 <= slot < params[path].shape[0]:
      raise ValueError(f"slot={slot} is out of range: {'/'.join(path)} has {params[path].shape[0]} "
                       f"bit-width slot(s), allowed 0..{params[path].shape[0] - 1}")
    params[path] = params[path].at[slot].set(total / counts[(layer, param_name, slot)])
  new_variables = dict(clean)
  new_variables["params"] = traverse_util.unflatten_dict(params)
  return new_variables


def _checked(plan: PrecisionPlan) -> PrecisionPlan:
  """``plan`` with its bit-widths validated while they are concrete (inside the jitted pass
  they are traced, and the layers' checks let traced values through)."""
  return plan._replace(w_bits=quant.check_bits(plan.w_bits, "w_bits"), a_bits=quant.check_bits(plan.a_bits, "a_bits"))


# One compiled forward pass per ``apply_fn`` for every plan and batch (plans are data):
# op by op, the estimates' searches dispatch thousands of small programs.
@functools.partial(jax.jit, static_argnums=0)
def _sown(apply_fn, variables, batch, plan):
  return apply_fn(variables, batch, plan, mutable=[CALIBRATION])[1]
