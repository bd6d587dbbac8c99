"""Where each quantized layer and BatchNorm of a network takes its precision from.

One abstract trace (``jax.eval_shape`` of ``init``, nothing allocated or compiled) with a
*probe plan* -- block ``i`` gets ``(w_bits, a_bits, slot) = (P + i, P + i, P + i)`` -- records,
for every :class:`~qflax.nn.QuantConv`, :class:`~qflax.nn.QuantDense` and
:class:`~qflax.nn.SwitchableBatchNorm`, which block's precision it receives (or the fixed
precision of a first / last layer), its kernel shape and its quantizers; the interceptor hands
the layer a valid precision instead. A variant's per-layer precision is then a table look-up,
so neither export nor the checks of a loaded file run a forward pass per variant.
"""

from __future__ import annotations

import functools
import json
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qflax import models
from qflax import nn as qnn

LINEAR = (qnn.QuantConv, qnn.QuantDense)
PROBE = 1000   # > any bit-width or slot: a probed value P + i names block i


class Site(NamedTuple):
  """One layer: its precision source (``block`` index, or ``fixed`` ``(w_bits, a_bits, slot)``), its
  parameter shape (kernel, or ``(channels,)`` for a BatchNorm) and its quantizers."""
  kind: str                                   # "linear" or "norm"
  block: int | None
  fixed: tuple[int | None, int | None, int] | None
  shape: tuple[int, ...]
  slots: int                                  # its BatchNorm / quantizer-parameter slots
  weight_quantizer: str | None
  act_quantizer: str | None
  use_bias: bool

  def precision(self, w_bits, a_bits, slots) -> tuple[int | None, int | None, int]:
    """``(w_bits, a_bits, slot)`` of this layer under a plan (a BatchNorm: ``(None, None, slot)``)."""
    if self.block is None:
      return self.fixed
    if self.kind == "norm":
      return None, None, int(slots[self.block])
    return int(w_bits[self.block]), int(a_bits[self.block]), int(slots[self.block])


def path_name(module: nn.Module) -> str:
  """``"blocks_0/conv"`` for a module at path ``("blocks_0", "conv")``."""
  return "/".join(module.path)


def _source(path: str, values) -> tuple[int | None, tuple | None]:
  values = [None if v is None else int(np.asarray(v)) for v in values]
  given = [v for v in values if v is not None]
  if all(v >= PROBE for v in given) and len(set(given)) == 1:
    return given[0] - PROBE, None
  if all(v < PROBE for v in given):
    return None, tuple(values)
  raise ValueError(f"layer {path} derives its precision from the plan in a way export does not support "
                   f"(probed {values}); layers must take one block's precision unchanged, or a fixed one")


def _argument(args, kwargs, index: int, name: str):
  return args[index] if len(args) > index else kwargs[name]


def _probing_interceptor(sources: dict):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (*LINEAR, qnn.SwitchableBatchNorm)):
      return next_fun(*args, **kwargs)
    path, args = path_name(module), list(args)
    if path in sources:
      raise ValueError(f"layer {path} is called twice in one forward pass; export supports layers called once")
    if isinstance(module, LINEAR):
      p = _argument(args, kwargs, 1, "precision")
      sources[path] = (module, _source(path, (p.w_bits, p.a_bits, p.slot)))
      valid = qnn.BlockPrecision(np.int32(32), np.int32(32), np.int32(0))
    else:
      sources[path] = (module, _source(path, (None, None, _argument(args, kwargs, 1, "slot"))))
      valid = np.int32(0)
    if len(args) > 1:
      args[1] = valid
    else:
      kwargs = {**kwargs, ("precision" if isinstance(module, LINEAR) else "slot"): valid}
    return next_fun(*args, **kwargs)
  return interceptor


def _site(module, source, shapes) -> Site:
  node = shapes
  for key in module.path:
    node = node[key]
  block, fixed = source
  if isinstance(module, qnn.SwitchableBatchNorm):
    return Site("norm", block, fixed, (int(node["scale"].shape[-1]),), int(module.num_slots), None, None, False)
  return Site("linear", block, fixed, tuple(int(d) for d in node["kernel"].shape), len(module.bit_set),
              module.weight_quantizer, module.act_quantizer, bool(module.use_bias))


def probe(model: models.Network, input_shape, num_blocks: int) -> dict[str, Site]:
  """Layer path -> :class:`Site`, in call order, from one abstract trace of ``model.init``."""
  plan = qnn.PrecisionPlan(*(np.arange(PROBE, PROBE + num_blocks, dtype=np.int32),) * 3)
  sources: dict = {}
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with nn.intercept_methods(_probing_interceptor(sources)):
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, plan, train=False), x)
  return {path: _site(module, source, shapes["params"]) for path, (module, source) in sources.items()}


@functools.lru_cache(maxsize=32)
def _probe_named(name: str, options_json: str, num_classes: int, spec, input_shape, num_blocks: int):
  options = _as_tuples(json.loads(options_json))
  return tuple(probe(models.get_model(name, num_classes, spec, **options), input_shape, num_blocks).items())


def probe_named(name: str, options, num_classes: int, spec, input_shape, num_blocks: int) -> dict[str, Site]:
  """:func:`probe` of ``models.get_model(name, num_classes, spec, **options)`` (cached)."""
  options_json = json.dumps(dict(options), sort_keys=True)
  return dict(_probe_named(name, options_json, num_classes, spec, tuple(input_shape), num_blocks))


def _as_tuples(value):
  if isinstance(value, list):
    return tuple(_as_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _as_tuples(v) for k, v in value.items()}
  return value


as_tuples = _as_tuples
