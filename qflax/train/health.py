"""Quantizer health: statistics of every quantizer while training, and warnings the
moment one degenerates.

Every ``log_every_steps`` the monitor runs each variant's network once on the
current training batch (BatchNorm on batch statistics, as in training) with the
``qflax.nn.QUANT_STATS`` collection open: every quantized layer reports, per
operand (``input``: the activation quantizer, ``kernel``: the weight quantizer),
its parameters at the variant's slot (clip, step, interval), the share of zero
codes, the share saturated, the number of levels in use and the code entropy.
They go to ``metrics.jsonl`` (split ``quant``) and TensorBoard, the last ones into
``results.json`` (``quantizer_health``), and one warning line per problem:

* **collapsed**: more than ``COLLAPSE`` of the codes in one level (e.g. a PACT clip
  far above the data at 2 bits: almost every activation rounds to 0);
* **saturated**: more than ``SATURATION`` of the codes at the clip (an interval
  below the data: the layer is binarised and gets no gradient);
* **few levels**: at 3 bits or more, a quarter (at 5 or more bits, a sixteenth) of
  the levels or fewer in use;
* **stuck**: a learnable quantizer parameter that has not moved since the first
  report while its layer's weights did (no gradient reaches it).
"""

from __future__ import annotations

import functools
from typing import Callable

import flax
import jax
import numpy as np
from flax import traverse_util

from qflax import nn as qnn
from qflax.methods.base import Method, TrainState

COLLAPSE = 0.9
SATURATION = 0.9


def _few_levels(bits: int, used: int) -> bool:
  if bits < 3:
    return False
  return used <= 2 ** bits // (4 if bits <= 4 else 16)


def variant_statistics(method: Method, index: int, plan: qnn.PrecisionPlan, state: TrainState, x: jax.Array) -> dict:
  """``{"layer/path/role": {stat: value}}`` of variant ``index`` on batch ``x``. ``plan`` is
  the variant's plan as NumPy arrays: the layers need concrete bits to take integer codes."""
  net = method.network(state, index)
  _, sown = net.model.apply(net.variables, x, plan, train=True, mutable=["batch_stats", qnn.QUANT_STATS])
  flat = traverse_util.flatten_dict(flax.core.unfreeze(sown.get(qnn.QUANT_STATS, {})))
  return {"/".join(path): stats[0] for path, stats in flat.items()}


def _variant_plan(method: Method, state: TrainState, index: int) -> qnn.PrecisionPlan:
  """Variant ``index``'s plan as NumPy arrays. Read through ``jit``, which drops the unused
  variables: building them op by op would cost more than the statistics (TQ's kernels are
  ``q(S) q(T)``, block by block)."""
  return jax.jit(lambda s: method.network(s, index).plan)(state).numpy()


class HealthMonitor:
  """Collects quantizer statistics for every variant and warns once per problem.

  Example:
    >>> monitor = HealthMonitor(method, print)
    >>> scalars = monitor.observe(step, state, x)     # also prints new warnings
  """

  def __init__(self, method: Method, warn: Callable[[str], None]):
    self.method, self.warn = method, warn
    self.fns = {}
    self.first: dict[tuple, tuple[dict, float]] = {}
    self.latest: dict[str, dict] = {}
    self.warnings: list[str] = []
    self._warned: set[tuple] = set()

  def observe(self, step: int, state: TrainState, x: jax.Array) -> dict[str, float]:
    """Statistics at ``step`` as flat scalars (``<variant>/<layer>/<role>/<stat>``)."""
    scalars = {}
    for k, variant in enumerate(self.method.variants):
      if k not in self.fns:   # the plan depends on the variant alone: read it once
        plan = _variant_plan(self.method, state, k)
        self.fns[k] = jax.jit(functools.partial(variant_statistics, self.method, k, plan))
      stats = {name: {s: float(np.asarray(v)) for s, v in values.items()}
               for name, values in jax.device_get(self.fns[k](state, x)).items()}
      self.latest[variant.name] = stats
      for name, values in stats.items():
        scalars.update({f"{variant.name}/{name}/{s}": v for s, v in values.items()})
        kernel_rms = stats.get(f"{name.rsplit('/', 1)[0]}/kernel", {}).get("rms")
        self._check(step, variant.name, name, values, kernel_rms)
    return scalars

  def _check(self, step: int, variant: str, name: str, values: dict, kernel_rms: float | None):
    bits = int(values["bits"])
    saturated = values["clip_fraction"] if bits > 1 and values["levels_used"] > 1 else 0.0
    problems = []
    if values["max_level_fraction"] > COLLAPSE:
      problems.append(("collapsed", f"{100 * values['max_level_fraction']:.0f}% of its codes in one level"))
    if saturated > SATURATION:
      problems.append(("saturated", f"{100 * saturated:.0f}% of its codes at the clip (interval below the data)"))
    if _few_levels(bits, int(values["levels_used"])):
      problems.append(("levels", f"only {int(values['levels_used'])} of {2 ** bits} levels in use"))
    params = {s: v for s, v in values.items() if s.startswith("param_")}
    key = (variant, name)
    if params and kernel_rms is not None:
      if key not in self.first:
        self.first[key] = (params, kernel_rms)
      else:
        first, rms = self.first[key]
        if params == first and kernel_rms != rms:
          problems.append(("stuck", f"{', '.join(p[6:] for p in params)} never moved from "
                                    f"{', '.join(f'{v:.4g}' for v in params.values())}"))
    for kind, text in problems:
      if (key, kind) not in self._warned:
        self._warned.add((key, kind))
        message = f"quantizer health: {variant} {name} ({bits}-bit) {text} at step {step}"
        self.warnings.append(message)
        self.warn("warning: " + message)

  def summary(self) -> dict:
    """``{"warnings": [...], "variants": {variant: {layer/role: stats}}}`` for ``results.json``."""
    return {"warnings": list(self.warnings), "variants": self.latest}
