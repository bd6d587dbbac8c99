"""Pieces every method uses: losses, model and plan construction, export size."""

from __future__ import annotations

import json
import numbers
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from qflax import models
from qflax import nn as qnn


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def quant_spec(config, bit_set) -> models.QuantSpec:
  q = config.quant
  return models.QuantSpec(bit_set=tuple(bit_set), weight_quantizer=q.weight_quantizer,
                          act_quantizer=q.act_quantizer, signed_act_quantizer=q.signed_act_quantizer,
                          act_param_init=tuple(sorted(dict(q.act_param_init).items())), first_last=q.first_last)


def build_model(config, num_classes: int, spec: models.QuantSpec) -> models.Network:
  return models.get_model(config.model.name, num_classes, spec, **dict(config.model.options))


def stacked_plans(model, bit_set) -> qnn.PrecisionPlan:
  """One uniform plan per bit-width in ``bit_set``, stacked: fields ``(K, num_blocks)``."""
  plans = [qnn.uniform_plan(models.num_blocks(model), b, bit_set) for b in bit_set]
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *plans)


def plan_at(plans: qnn.PrecisionPlan, index) -> qnn.PrecisionPlan:
  return jax.tree_util.tree_map(lambda a: a[index], plans)


BIT_AXIS_MODES = ("auto", "loop", "vmap")


def resolve_bit_axis(mode: str) -> str:
  """``auto`` is the faster mode measured per backend (BENCHMARKS.md): ``loop`` on
  CPU, where XLA runs convolutions with batched kernels as slow grouped
  convolutions, and ``vmap`` on GPU/TPU."""
  if mode == "auto":
    return "loop" if jax.default_backend() == "cpu" else "vmap"
  return mode


def map_bit_axis(fn, mode: str, *stacked):
  """``fn`` over the leading (bit-width) axis of ``stacked``, results stacked.

  ``mode="loop"`` unrolls a Python loop (one program per bit-width);
  ``mode="vmap"`` vectorises; ``mode="auto"`` picks per backend
  (:func:`resolve_bit_axis`). Both compute the same values up to float summation
  order (and max-pool tie-breaking, where pooled values tie exactly).
  """
  if resolve_bit_axis(mode) == "vmap":
    return jax.vmap(fn)(*stacked)
  size = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  outs = [fn(*jax.tree_util.tree_map(lambda a: a[k], stacked)) for k in range(size)]
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)


def variant_name(w_bits: int, a_bits: int) -> str:
  return "fp32" if w_bits >= 32 and a_bits >= 32 else f"w{w_bits}a{a_bits}"


def export_integer_model(model, variables, x, plan: qnn.PrecisionPlan):
  """Every layer's exported kernel for a concrete plan: integer codes with scale and
  zero point (or float32 where full precision), in the module tree of the model."""
  plan = qnn.PrecisionPlan(*(np.asarray(a) for a in plan))
  _, state = model.apply(variables, x[:1], plan, train=False, mutable=[qnn.EXPORT])
  return state[qnn.EXPORT]


def export_model_bytes(model, variables, x, plan: qnn.PrecisionPlan) -> int:
  """Bytes of the exported model for a concrete plan (see ``qflax.nn.EXPORT``)."""
  exported = export_integer_model(model, variables, x, plan)
  total = qnn.exported_bytes(exported)
  # BatchNorm (one slot) and biases travel as float32 beside the exported kernels.
  return total + 4 * models.count_params(variables["params"]) - 4 * qnn.exported_kernel_params(exported)


def check_pretrained_run(workdir: str, model_name: str, model_options, field: str, error: type[Exception]) -> None:
  """Checks, before any compute, that ``workdir`` holds an ``fp`` run of
  ``model_name`` with ``model_options`` and at least one checkpoint; raises
  ``error`` naming ``field``."""
  def fail(why):
    raise error(f"config field {field}={workdir!r} is invalid: {why}; allowed: the --workdir of an fp run "
                f"of model {model_name!r} (python launch.py --config configs/... --config.method.name=fp)")
  config_path = os.path.join(workdir, "config.json")
  latest = os.path.join(workdir, "checkpoints", "latest")
  if not os.path.isfile(config_path):
    fail(f"{config_path} does not exist")
  with open(config_path) as f:
    saved = json.load(f)
  if saved.get("method", {}).get("name") != "fp":
    fail(f"it holds a {saved.get('method', {}).get('name')!r} run, not fp")
  if saved.get("model", {}).get("name") != model_name:
    fail(f"it holds model {saved.get('model', {}).get('name')!r}")
  wanted = json.loads(json.dumps(dict(model_options)))
  if saved["model"].get("options", {}) != wanted:
    fail(f"its model options {saved['model'].get('options')} differ from {wanted}")
  if not os.path.isdir(latest) or not any(d.isdigit() for d in os.listdir(latest)):
    fail(f"{latest} holds no checkpoint")


def fp_run_variables(arrays: dict) -> dict:
  """The variables of the single replica of a restored ``fp`` run (its leading axis dropped)."""
  first = lambda a: np.asarray(a)[0]
  return {"params": jax.tree_util.tree_map(first, arrays["params"]),
          "batch_stats": jax.tree_util.tree_map(first, arrays.get("batch_stats") or {})}


def merge_pretrained(target, source, what: str = "pretrained run"):
  """``target`` with every weight, bias and BatchNorm entry taken from ``source``.

  Quantizer scalars (``input_*``, ``kernel_*``) stay as they are in ``target``
  (re-estimate them with ``quant.calibrate_batches``). A single BatchNorm slot in
  ``source`` fills every slot of ``target``. A missing or mis-shaped entry raises.
  """
  flat_source = traverse_util.flatten_dict(flax.core.unfreeze(source))
  merged = {}
  for path, value in traverse_util.flatten_dict(flax.core.unfreeze(target)).items():
    if path[-1].startswith(("input_", "kernel_")):
      merged[path] = value
      continue
    if path not in flat_source:
      raise ValueError(f"the {what} has no {'/'.join(path)}; it was trained with another model")
    src = np.asarray(flat_source[path])
    if src.shape != value.shape:
      if src.ndim == value.ndim and src.shape[0] == 1 and src.shape[1:] == value.shape[1:]:
        src = np.broadcast_to(src, value.shape)
      else:
        raise ValueError(f"the {what} has {'/'.join(path)} of shape {src.shape}; this model needs {value.shape}")
    merged[path] = jnp.asarray(src, value.dtype)
  return traverse_util.unflatten_dict(merged)


class MethodOptions(dict):
  """``config.method.*`` over a method's ``defaults``, with checks that raise
  ``error`` naming the field and the allowed values. An unknown field raises at once.

  Example:
    >>> o = MethodOptions(config, {"temperature": 2.0}, "qkd", ConfigError)
    >>> o.number("temperature", strict=True)
  """

  def __init__(self, config, defaults: dict, method: str, error: type[Exception]):
    unknown = set(config.method.keys()) - set(defaults) - {"name", "bit_axis"}
    if unknown:
      raise error(f"config fields method.{sorted(unknown)} are unknown for {method}; allowed: {sorted(defaults)}")
    super().__init__({k: config.method.get(k, v) for k, v in defaults.items()})
    self.error = error

  def fail(self, field: str, allowed) -> None:
    raise self.error(f"config field method.{field}={self[field]!r} is invalid; allowed: {allowed}")

  def number(self, field: str, minimum: float = 0.0, *, strict: bool = False, maximum: float | None = None):
    value = self[field]
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or value < minimum
        or (strict and value == minimum) or (maximum is not None and value > maximum)):
      low = f"{'>' if strict else '>='} {minimum}"
      self.fail(field, f"a number {low}" + (f" and <= {maximum}" if maximum is not None else ""))
    return float(value)

  def integer(self, field: str, minimum: int = 0):
    value = self[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
      self.fail(field, f"an integer >= {minimum}")
    return int(value)

  def boolean(self, field: str) -> bool:
    if not isinstance(self[field], bool):
      self.fail(field, "True or False")
    return self[field]

  def choice(self, field: str, allowed):
    if self[field] not in allowed:
      self.fail(field, tuple(allowed))
    return self[field]


def calibrate_replicas(model, plans: qnn.PrecisionPlan, params, batch_stats, batches):
  """Quantizer scalars of stacked replicas (replica ``k`` at plan ``k``) from calibration batches."""
  calibrated = []
  for k in range(plans.w_bits.shape[0]):
    variables = {"params": jax.tree_util.tree_map(lambda a: a[k], params),
                 "batch_stats": jax.tree_util.tree_map(lambda a: a[k], batch_stats)}
    apply = lambda v, x, plan, **kw: model.apply(v, x, plan, train=False, **kw)
    calibrated.append(qnn.calibrate(apply, variables, batches, [plan_at(plans, k)])["params"])
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *calibrated)


def replica(tree, index):
  """Replica ``index`` (traced or static) of a tree stacked on its leading axis."""
  return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), tree)


def stack_replicas(tree, count: int):
  """``count`` identical replicas of ``tree`` on a new leading axis."""
  return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (count,) + jnp.shape(a)), tree)


def update_groups(txs: dict, grads: dict, opt_state: dict, params: dict) -> tuple[dict, dict]:
  """Applies each group's optimizer (``txs[name]``) to the groups in ``grads``;
  the other groups of ``params`` and ``opt_state`` are returned unchanged."""
  params, opt_state = dict(params), dict(opt_state)
  for name, grad in grads.items():
    updates, opt_state[name] = txs[name].update(grad, opt_state[name], params[name])
    params[name] = jax.tree_util.tree_map(lambda p, u: p + u, params[name], updates)
  return params, opt_state
