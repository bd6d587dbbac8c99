"""``tq``: transform quantization of a trained model, through the launcher.

Loads the final checkpoint of an ``fp`` run (``method.checkpoint``), analyses it
on ``quant.calibrate_batches`` training batches for every transform in
``method.transforms``, allocates bits for every rate in ``method.target_rates``
(bits per weight), evaluates each compressed model before fine-tuning, then
fine-tunes ``S`` and ``T`` for ``num_epochs`` with the straight-through estimator
(rates and steps fixed), and writes one compressed file per variant
(``<workdir>/compressed/``), the rate-distortion frontier (``frontier.md``,
``frontier.svg``) and the transform-domain MAC counts.

Variants: ``fp32`` (the loaded model) and ``<transform>@<rate>`` for each pair.
All compressed variants share one structure (per layer ``S``, ``T``, per-block
rates and steps, stacked on a leading axis), so one step trains them side by side.
"""

from __future__ import annotations

import math
import numbers
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from qflax import models, quant
from qflax import nn as qnn
from qflax.methods import common
from qflax.methods.base import Method, Phase, TrainState, Variant
from qflax.methods.optim import make_optimizer
from qflax.methods.tq import allocation, codec, compress
from qflax.methods.tq.transforms import TRANSFORMS, kernel_matrix, matrix_kernel

DEFAULTS = {"checkpoint": "", "transforms": ("identity", "klt", "elt"), "target_rates": (1.0, 2.0, 3.0, 4.0),
            "num_blocks": 16, "eps": 1e-3}


def _key(path):
  return "/".join(path)


class TransformQuantization(Method):
  name = "tq"
  initial_evaluation = "before_fine_tuning"

  @classmethod
  def validate_config(cls, config, error):
    o = common.MethodOptions(config, DEFAULTS, cls.name, error)
    transforms = tuple(o["transforms"])
    if not transforms or any(t not in TRANSFORMS for t in transforms) or len(set(transforms)) != len(transforms):
      o.fail("transforms", f"distinct names from {TRANSFORMS}")
    rates = o["target_rates"]
    if not rates or any(isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r <= 8 for r in rates):
      o.fail("target_rates", "bits per weight in (0, 8]")
    o.integer("num_blocks", 1)
    o.number("eps")
    if not config.quant.calibrate_batches:
      raise error("config field quant.calibrate_batches=0 is invalid for tq; allowed: >= 1 (the analysis "
                  "images are these training batches)")
    if not o["checkpoint"]:
      o.fail("checkpoint", "the --workdir of a finished fp run of the model to compress")
    common.check_pretrained_run(o["checkpoint"], config.model.name, config.model.options, "method.checkpoint", error)

  def __init__(self, config, num_classes: int, steps_per_epoch: int):
    self.config = config
    self.opts = common.MethodOptions(config, DEFAULTS, self.name, ValueError)
    self.model = models.get_model(config.model.name, num_classes, models.QuantSpec(), **dict(config.model.options))
    self.plan = qnn.uniform_plan(models.num_blocks(self.model), 32, (32,))
    self.steps_per_epoch = steps_per_epoch
    self.pairs = [(t, float(r)) for t in self.opts["transforms"] for r in self.opts["target_rates"]]

  def phases(self):
    return [Phase("fine_tune", int(self.config.num_epochs))]

  def _optimizer(self, phase_index):
    """The fine-tuning optimizer; weight decay applies to every entry of S and T
    (``make_optimizer`` alone decays only leaves named ``kernel``)."""
    steps = self.phases()[phase_index].num_epochs * self.steps_per_epoch
    no_decay = self.config.optimizer.copy_and_resolve_references()
    no_decay.weight_decay = 0.0
    return optax.chain(optax.add_decayed_weights(self.config.optimizer.weight_decay),
                       make_optimizer(no_decay, steps, self.steps_per_epoch))

  def _structure(self, params):
    """Per kernel: its path, shape, matrix shape and block bounds (static)."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    layers = []
    for path in compress.kernel_paths(params):
      rows, cols = kernel_matrix(np.zeros(flat[path].shape)).shape
      bounds = [(int(b[0]), int(b[-1]) + 1) for b in allocation.row_blocks(rows, self.opts["num_blocks"])]
      layers.append((path, tuple(flat[path].shape), rows, cols, bounds))
    return layers

  def init_state(self, rng, sample_x):
    variables = self.model.init(rng, sample_x, self.plan)
    self.layers = self._structure(variables["params"])
    k = len(self.pairs)
    S = {_key(p): jnp.broadcast_to(jnp.eye(r), (k, r, r)) for p, _, r, c, _ in self.layers}
    T = {_key(p): jnp.zeros((k, r, c)) for p, _, r, c, _ in self.layers}
    per_block = lambda dtype: {_key(p): jnp.zeros((k, len(b)), dtype) for p, _, _, _, b in self.layers}
    extra = {"t_rates": per_block(jnp.int32), "t_steps": per_block(jnp.float32), "s_rates": per_block(jnp.int32),
             "s_steps": per_block(jnp.float32),
             "s_identity": {_key(p): jnp.ones((k,), jnp.bool_) for p, *_ in self.layers},
             "rate": jnp.zeros((k,)), "entropy_rate": jnp.zeros((k,)),
             "frontier": jnp.zeros((len(self.opts["transforms"]), 81, 2))}
    trainable = {"S": S, "T": T}
    params = {"model": variables["params"], "compressed": trainable}
    state = TrainState(jnp.int32(0), params, variables.get("batch_stats", {}), None, extra)
    return self.start_phase(state, 0)

  def start_phase(self, state, phase_index):
    return state.replace(opt_state=self._optimizer(phase_index).init(state.params["compressed"]))

  def pretrained_checkpoints(self):
    return {"model": self.opts["checkpoint"]}

  def load_pretrained(self, state, role, arrays):
    source = common.fp_run_variables(arrays)
    params = common.merge_pretrained(state.params["model"], source["params"], "checkpoint")
    batch_stats = common.merge_pretrained(state.batch_stats, source["batch_stats"], "checkpoint")
    return state.replace(params={**state.params, "model": params}, batch_stats=batch_stats)

  def _logits_fn(self, batch_stats):
    return lambda p, x: self.model.apply({"params": p, "batch_stats": batch_stats}, x, self.plan, train=False)

  def calibrate(self, state, batches):
    """The analysis and allocation for every (transform, rate); S and T start unquantized."""
    images = jnp.concatenate(batches)
    params = jax.tree_util.tree_map(jnp.asarray, state.params["model"])
    logits_fn = self._logits_fn(state.batch_stats)
    extra = jax.tree_util.tree_map(np.array, state.extra)
    S = jax.tree_util.tree_map(np.array, state.params["compressed"]["S"])
    T = jax.tree_util.tree_map(np.array, state.params["compressed"]["T"])
    for ti, transform in enumerate(self.opts["transforms"]):
      layers = compress.analyse(logits_fn, params, images, transform=transform, num_blocks=self.opts["num_blocks"],
                                eps=self.opts["eps"], key=jax.random.key(self.config.seed),
                                progress=lambda m, t=transform: print(f"tq {t}: {m}", file=sys.stderr, flush=True))
      distortion, sizes = compress.block_table(layers)
      total = compress.total_weights(layers)
      points = allocation.lambda_sweep(distortion, sizes, total)
      extra["frontier"][ti] = [(p.rate, p.distortion) for p in points]
      for k, (t_name, rate) in enumerate(self.pairs):
        if t_name != transform:
          continue
        chosen = allocation.allocation_for_rate(points, rate, distortion, sizes, total)
        quantized = compress.quantize_layers(layers, chosen.rates)
        extra["rate"][k] = chosen.rate
        extra["entropy_rate"][k] = _entropy_rate(quantized, total)
        for layer, q in zip(layers, quantized):
          key = _key(layer.path)
          S[key][k], T[key][k] = layer.factorisation.S, layer.factorisation.T
          extra["t_rates"][key][k], extra["t_steps"][key][k] = q.t_rates, q.t_steps
          extra["s_identity"][key][k] = not q.s_rates
          if q.s_rates:
            extra["s_rates"][key][k], extra["s_steps"][key][k] = q.s_rates, q.s_steps
    compressed = jax.tree_util.tree_map(jnp.asarray, {"S": S, "T": T})
    return state.replace(params={**state.params, "compressed": compressed},
                         extra=jax.tree_util.tree_map(jnp.asarray, extra))

  def kernels(self, compressed, extra, k):
    """Variant ``k``'s kernels ``q(S) q(T)`` (straight-through quantizers, fixed rates and steps)."""
    out = {}
    for path, shape, rows, cols, bounds in self.layers:
      key = _key(path)
      s, t = compressed["S"][key][k], compressed["T"][key][k]
      t_q = jnp.concatenate([quant.midtread(t[lo:hi], extra["t_rates"][key][k, b], extra["t_steps"][key][k, b])
                             for b, (lo, hi) in enumerate(bounds)])
      s_q = jnp.concatenate([quant.midtread(s[:, lo:hi], extra["s_rates"][key][k, b], extra["s_steps"][key][k, b])
                             for b, (lo, hi) in enumerate(bounds)], axis=1)
      s_q = jnp.where(extra["s_identity"][key][k], jnp.eye(rows), s_q)
      out[path] = matrix_kernel(s_q @ t_q, shape, "row")
    return out

  def _params_with(self, params, kernels):
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    flat.update(kernels)
    return traverse_util.unflatten_dict(flat)

  def train_step(self, state, x, y, rng, phase_index):
    del rng
    tx = self._optimizer(phase_index)
    logits_fn = self._logits_fn(state.batch_stats)

    def loss_fn(compressed):
      losses, accuracies = [], []
      for k in range(len(self.pairs)):
        logits = logits_fn(self._params_with(state.params["model"], self.kernels(compressed, state.extra, k)), x)
        losses.append(common.cross_entropy(logits, y))
        accuracies.append(common.accuracy(logits, y))
      return jnp.sum(jnp.stack(losses)), (jnp.stack(losses), jnp.stack(accuracies))

    (_, (losses, accuracies)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["compressed"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params["compressed"])
    compressed = jax.tree_util.tree_map(lambda p, u: p + u, state.params["compressed"], updates)
    new_state = state.replace(step=state.step + 1, params={**state.params, "compressed": compressed},
                              opt_state=opt_state)
    metrics = {"loss": jnp.mean(losses), "accuracy": jnp.mean(accuracies)}
    for v, loss in zip(self.variants()[1:], losses):
      metrics[f"loss/{v.name}"] = loss
    return new_state, metrics

  def variants(self):
    return [Variant("fp32", 32, 32)] + [Variant(f"{t}@{r:g}", max(1, round(r)), 32) for t, r in self.pairs]

  def eval_logits(self, state, x, variant_index):
    logits_fn = self._logits_fn(state.batch_stats)
    branches = [lambda: logits_fn(state.params["model"], x)] + [
        (lambda k=k: logits_fn(self._params_with(state.params["model"],
                                                 self.kernels(state.params["compressed"], state.extra, k)), x))
        for k in range(len(self.pairs))]
    return jax.lax.switch(variant_index, branches)

  def quantized_layers(self, state, k) -> list[compress.QuantizedLayer]:
    """Variant ``k``'s layers as host arrays (the file's content)."""
    extra = jax.tree_util.tree_map(np.asarray, state.extra)
    compressed = jax.tree_util.tree_map(np.asarray, state.params["compressed"])
    out = []
    for path, shape, rows, cols, bounds in self.layers:
      key = _key(path)
      t_rates = [int(r) for r in extra["t_rates"][key][k]]
      t_steps = [float(s) for s in extra["t_steps"][key][k]]
      identity = bool(extra["s_identity"][key][k])
      s_rates = [] if identity else [int(r) for r in extra["s_rates"][key][k]]
      s_steps = [] if identity else [float(s) for s in extra["s_steps"][key][k]]
      t = np.concatenate([allocation.midtread_numpy(compressed["T"][key][k][lo:hi], t_rates[b], t_steps[b])
                          for b, (lo, hi) in enumerate(bounds)])
      s = np.eye(rows) if identity else np.concatenate(
          [allocation.midtread_numpy(compressed["S"][key][k][:, lo:hi], s_rates[b], s_steps[b])
           for b, (lo, hi) in enumerate(bounds)], axis=1)
      out.append(compress.QuantizedLayer(path, shape, "row", bounds, t_rates, t_steps, s_rates, s_steps, s, t))
    return out

  def _others(self, state):
    flat = traverse_util.flatten_dict(flax.core.unfreeze(jax.tree_util.tree_map(np.asarray, state.params["model"])))
    kernels = {p for p, *_ in self.layers}
    params = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in kernels})
    return {"params": params, "batch_stats": jax.tree_util.tree_map(np.asarray, state.batch_stats)}

  def model_bytes(self, state, variant_index, sample_x):
    if variant_index == 0:
      return 4 * sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(state.params["model"]))
    return len(codec.encode(self.quantized_layers(state, variant_index - 1), self._others(state)))

  def export(self, state, workdir, sample_x):
    """Compressed files, the frontier table and plot, and transform-domain MACs."""
    directory = os.path.join(workdir, "compressed")
    os.makedirs(directory, exist_ok=True)
    extra = jax.tree_util.tree_map(np.asarray, state.extra)
    variants, macs_original = {}, models.count_macs(self.model, {"params": state.params["model"],
                                                                 "batch_stats": state.batch_stats}, sample_x, self.plan)
    for k, (transform, rate) in enumerate(self.pairs):
      name = self.variants()[k + 1].name
      layers = self.quantized_layers(state, k)
      size = codec.save(os.path.join(directory, f"{name.replace('@', '_')}.tq"), layers, self._others(state))
      macs = {}
      params = compress.reconstruct(jax.tree_util.tree_map(np.asarray, state.params["model"]), layers)
      with compress.transform_domain(layers, macs):
        self.model.apply({"params": params, "batch_stats": state.batch_stats}, sample_x[:1], self.plan)
      variants[name] = {"transform": transform, "target_rate": rate, "rate": float(extra["rate"][k]),
                        "entropy_rate": float(extra["entropy_rate"][k]), "file_bytes": size,
                        "transform_domain_macs": int(sum(macs.values())) + _uncompressed_macs(
                            self.model, state, sample_x, self.plan, set(macs))}
    frontier = {t: [{"rate": float(r), "distortion": float(d)} for r, d in extra["frontier"][ti]]
                for ti, t in enumerate(self.opts["transforms"])}
    _write_frontier(workdir, frontier)
    return {"compressed": variants, "original_macs": int(macs_original), "frontier": frontier}


def _uncompressed_macs(model, state, sample_x, plan, compressed_paths) -> int:
  """MACs of layers that ran outside the transform domain (grouped convolutions)."""
  _, out = model.apply({"params": state.params["model"], "batch_stats": state.batch_stats}, sample_x[:1], plan,
                       train=False, mutable=[qnn.FLOPS])
  flat = traverse_util.flatten_dict(flax.core.unfreeze(out[qnn.FLOPS]))
  total = 0
  for path, value in flat.items():
    if path[:-1] + ("kernel",) not in compressed_paths:
      total += int(sum(value))
  return total


def _entropy_rate(layers: list[compress.QuantizedLayer], total: int) -> float:
  """Bits per weight if every block's codes were entropy coded (empirical entropy)."""
  bits = 0.0
  for layer in layers:
    for b, (lo, hi) in enumerate(layer.bounds):
      blocks = [(layer.T[lo:hi], layer.t_rates[b], layer.t_steps[b])]
      if layer.s_rates:
        blocks.append((layer.S[:, lo:hi], layer.s_rates[b], layer.s_steps[b]))
      for values, rate, step in blocks:
        if rate:
          bits += values.size * allocation.entropy_bits(np.round(values / step))
  return bits / total


def _write_frontier(workdir, frontier):
  lines = ["# Rate-distortion frontier (Lagrangian sweep)", "",
           "Predicted output MSE on the calibration images against fixed-length bits per weight.", "",
           "| transform | bits per weight | output MSE |", "|---|---:|---:|"]
  for t, points in frontier.items():
    seen = set()
    for p in points:
      if p["rate"] not in seen:
        seen.add(p["rate"])
        lines.append(f"| {t} | {p['rate']:.3f} | {p['distortion']:.4g} |")
  with open(os.path.join(workdir, "frontier.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  width, height, margin = 480, 300, 50
  curves = {t: sorted({(p["rate"], p["distortion"]) for p in points if p["distortion"] > 0 and p["rate"] > 0})
            for t, points in frontier.items()}
  values = [d for c in curves.values() for _, d in c] or [1.0]
  lo, hi = math.log10(min(values)), math.log10(max(values)) + 1e-9
  x_of = lambda r: margin + (width - 2 * margin) * r / 8.0
  y_of = lambda d: height - margin - (height - 2 * margin) * (math.log10(d) - lo) / (hi - lo)
  colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
  svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
         f'<text x="{width / 2}" y="20" text-anchor="middle">output MSE (log) against bits per weight</text>']
  for i, (t, c) in enumerate(curves.items()):
    pts = " ".join(f"{x_of(r):.1f},{y_of(d):.1f}" for r, d in c)
    svg.append(f'<polyline fill="none" stroke="{colours[i % 4]}" points="{pts}"/>')
    svg.append(f'<text x="{width - margin}" y="{40 + 15 * i}" fill="{colours[i % 4]}" text-anchor="end">{t}</text>')
  svg.append("</svg>")
  with open(os.path.join(workdir, "frontier.svg"), "w") as f:
    f.write("\n".join(svg) + "\n")
