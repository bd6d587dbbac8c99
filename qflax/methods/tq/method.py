"""``tq``: transform quantization of a trained model, through the launcher.

Starts from the final weights of an ``fp`` run (``method.checkpoint``), analyses them
(in :meth:`TransformQuantization.prepare`) on ``quant.calibrate_batches`` training
batches for every transform in
``method.transforms``, allocates bits for every rate in ``method.target_rates``
(bits per weight), evaluates each compressed model before fine-tuning, then
fine-tunes ``S`` and ``T`` (``method.fine_tune="all"``: also the biases and BatchNorm
parameters, BatchNorm in train mode) for ``num_epochs`` with the straight-through
estimator (rates and steps fixed), and writes one compressed file per variant
(``<workdir>/compressed/``), the rate-distortion frontier (``frontier.md``,
``frontier.svg``) and the transform-domain MAC counts.

Variants: ``fp32`` (the loaded model) and ``<transform>@<rate>`` for each pair.
All compressed variants share one structure (per layer ``S``, ``T``, per-block
rates and steps, stacked on a leading axis; with ``fine_tune="all"`` also their own
copies of the other parameters and of the BatchNorm statistics), so one step trains
them side by side.
The structure follows from the model's parameter shapes (``jax.eval_shape``) when
the method is built. Options: :class:`TQOptions`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from qflax import distill, models, options, quant
from qflax import nn as qnn
from qflax.methods import networks, optim
from qflax.methods.base import Method, MethodOptions, Start, Variant, VariantNetwork, apply_network
from qflax.methods.tq import allocation, codec, compress
from qflax.methods.tq.transforms import EPS_NORMS, MODES, TRANSFORMS, kernel_matrix, matrix_kernel

FINE_TUNE = ("transforms", "all")
RATE_BITS = 4     # side information per block: its bit-depth 0..8
STEP_BITS = 32    # and its step, a float32


@dataclasses.dataclass(frozen=True)
class TQOptions(MethodOptions):
  checkpoint: str = options.text("", doc="workdir of the finished fp run to compress",
                                 allowed="the --workdir of a finished fp run of the model to compress")
  transforms: tuple = dataclasses.field(default=("identity", "klt", "elt"), metadata={
      "check": options.Check(lambda v: _transforms(v), f"distinct names from {TRANSFORMS}"),
      "doc": "transforms to compare"})
  target_rates: tuple = options.numbers_field((1.0, 2.0, 3.0, 4.0), minimum=0.0, maximum=8.0, strict=True,
                                              min_length=1, doc="bits per weight")
  num_blocks: int = options.integer(16, 1, doc="blocks per layer (one bit-depth and step each)")
  eps: float = options.number(1e-3, minimum=0.0, doc="ELT regulariser of C_gg")
  # Young et al. (TPAMI 2021) report the row transform; the column transform is their option.
  mode: str = options.choice("row", MODES, doc="row (mix input channels) or column (mix output channels) transform")
  # The paper's allocation is by output distortion; weight error is the baseline it beats.
  distortion: str = options.choice("output", compress.DISTORTIONS,
                                   doc="allocate by the logits' MSE on calibration images (output) or by the "
                                       "weights' MSE (weight; no forward passes)")
  # The authors' released code regularises C_gg with its Frobenius norm.
  eps_norm: str = options.choice("frobenius", EPS_NORMS, doc="norm of C_gg in the ELT regulariser eps ||C_gg|| I")
  # Memory, not the result, depends on it: 8 images hold 8 x 25.5M floats (0.8 GB) for a ResNet-50.
  covariance_chunk: int = options.integer(8, 1, doc="images per chunk when accumulating the ELT's gradient "
                                                    "covariance (device memory: chunk x weights floats)")
  # The spec trains S and T (the default, unchanged); the authors' released script trains every
  # parameter with BatchNorm in train mode ("all").
  fine_tune: str = options.choice("transforms", FINE_TUNE,
                                  doc="train S and T with BatchNorm in inference mode (transforms), or also the "
                                      "biases and BatchNorm parameters with BatchNorm in train mode (all)")

  def check(self):
    if not self.run.quant.calibrate_batches:
      options.invalid("quant.calibrate_batches", 0, ">= 1 for tq (the analysis images are these training batches)")
    if not self.checkpoint:
      self.fail("checkpoint", "the --workdir of a finished fp run of the model to compress")

  @property
  def starts(self):
    return (Start("method.checkpoint", self.checkpoint, self.run.model, ("model",)),)


def _transforms(value):
  if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value:
    raise ValueError
  if any(t not in TRANSFORMS for t in value) or len(set(value)) != len(value):
    raise ValueError
  return tuple(value)


class Layer(NamedTuple):
  """A compressed kernel: its path, shape, ``T``'s matrix shape and block bounds."""
  path: tuple[str, ...]
  shape: tuple[int, ...]
  rows: int
  cols: int
  bounds: list[tuple[int, int]]


def _key(path):
  return "/".join(path)


class TransformQuantization(Method):
  name = "tq"
  Options = TQOptions

  def __init__(self, opts, task):
    super().__init__(opts, task)
    self.model = networks.build_model(opts.run, task.num_classes)
    self.plan = qnn.uniform_plan(self.model.num_blocks, 32, (32,))
    self.pairs = [(t, float(r)) for t in opts.transforms for r in opts.target_rates]
    shapes = jax.eval_shape(self.model.init, jax.random.key(0), self.sample_input, self.plan)["params"]
    self.layers = self._structure(shapes)
    kernels = {layer.path for layer in self.layers}
    # Trained per variant with fine_tune="all": every parameter but the kernels (and quantizer scalars).
    self.other_paths = [path for path in traverse_util.flatten_dict(flax.core.unfreeze(shapes))
                        if path not in kernels and not qnn.quantizer_param(path)]
    self.frontier_size = len(allocation.sweep_exponents())
    self.phases = (self.phase("fine_tuning", opts.run.num_epochs, {"compressed": 1.0}, evaluate_before=True,
                              optimizer=self._optimizer),)
    self.variants = (Variant("fp32", 32, 32),) + tuple(Variant(f"{t}@{r:g}", max(1, round(r)), 32)
                                                       for t, r in self.pairs)

  @property
  def tunes_all(self) -> bool:
    return self.options.fine_tune == "all"

  def _optimizer(self, schedule):
    """Fine-tuning: weight decay on every trained entry (S and T; with ``fine_tune="all"``
    also the biases and BatchNorm parameters, as in the authors' script); ``make_optimizer``
    alone decays only leaves named ``kernel``."""
    settings = self.options.run.optimizer
    return optax.chain(optax.add_decayed_weights(settings.weight_decay),
                       optim.make_optimizer(dataclasses.replace(settings, weight_decay=0.0), schedule))

  def _structure(self, params) -> list[Layer]:
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    layers = []
    for path in compress.kernel_paths(params):
      rows, cols = kernel_matrix(np.zeros(flat[path].shape), self.options.mode).shape
      bounds = [(int(b[0]), int(b[-1]) + 1) for b in allocation.row_blocks(rows, self.options.num_blocks)]
      layers.append(Layer(path, tuple(flat[path].shape), rows, cols, bounds))
    return layers

  def _copies(self, params, batch_stats):
    """With ``fine_tune="all"``: one copy per variant of the non-kernel parameters (flat, by
    key) and of the BatchNorm statistics."""
    k = len(self.pairs)
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    others = {_key(p): jnp.broadcast_to(flat[p], (k,) + flat[p].shape) for p in self.other_paths}
    return others, jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (k,) + a.shape), batch_stats)

  def init_state(self, rng):
    variables = self.model.init(rng, self.sample_input, self.plan)
    k = len(self.pairs)
    S = {_key(l.path): jnp.broadcast_to(jnp.eye(l.rows), (k, l.rows, l.rows)) for l in self.layers}
    T = {_key(l.path): jnp.zeros((k, l.rows, l.cols)) for l in self.layers}
    per_block = lambda dtype: {_key(l.path): jnp.zeros((k, len(l.bounds)), dtype) for l in self.layers}
    extra = {"t_rates": per_block(jnp.int32), "t_steps": per_block(jnp.float32), "s_rates": per_block(jnp.int32),
             "s_steps": per_block(jnp.float32),
             "s_identity": {_key(l.path): jnp.ones((k,), jnp.bool_) for l in self.layers},
             "rate": jnp.zeros((k,)), "entropy_rate": jnp.zeros((k,)),
             "frontier": jnp.zeros((len(self.options.transforms), self.frontier_size, 2))}
    params = {"model": variables["params"], "compressed": {"S": S, "T": T}}
    batch_stats = {"model": variables.get("batch_stats", {})}
    if self.tunes_all:
      params["compressed"]["others"], batch_stats["compressed"] = self._copies(variables["params"],
                                                                               batch_stats["model"])
    return self.new_state(params, batch_stats, extra)

  def _logits_fn(self, batch_stats):
    return lambda p, x: self.model.apply({"params": p, "batch_stats": batch_stats}, x, self.plan, train=False)

  def _analyse(self, transform, params, images, batch_stats):
    o = self.options
    return compress.analyse(self._logits_fn(batch_stats), params, images, transform=transform, mode=o.mode,
                            num_blocks=o.num_blocks, eps=o.eps, eps_norm=o.eps_norm, distortion=o.distortion,
                            chunk=o.covariance_chunk, key=jax.random.key(o.run.seed),
                            progress=lambda m: print(f"tq {transform}: {m}", file=sys.stderr, flush=True))

  def prepare(self, state, batches):
    """The analysis and allocation for every (transform, rate); S and T start unquantized
    (and, with ``fine_tune="all"``, every variant's other parameters at the loaded ones)."""
    images = jnp.concatenate(batches)
    params = jax.tree_util.tree_map(jnp.asarray, state.params["model"])
    extra = jax.tree_util.tree_map(np.array, state.extra)
    S = jax.tree_util.tree_map(np.array, state.params["compressed"]["S"])
    T = jax.tree_util.tree_map(np.array, state.params["compressed"]["T"])
    for ti, transform in enumerate(self.options.transforms):
      layers = self._analyse(transform, params, images, state.batch_stats["model"])
      distortion, sizes = compress.block_table(layers)
      total = compress.total_weights(layers)
      points = allocation.lambda_sweep(distortion, sizes, total)
      extra["frontier"][ti] = [(p.rate, p.distortion) for p in points]
      for k, (t_name, rate) in enumerate(self.pairs):
        if t_name == transform:
          chosen = allocation.allocation_for_rate(points, rate, distortion, sizes, total)
          quantized = compress.quantize_layers(layers, chosen.rates)
          extra["rate"][k] = chosen.rate
          extra["entropy_rate"][k] = _entropy_rate(quantized, total)
          _store(extra, S, T, k, layers, quantized)
    compressed = jax.tree_util.tree_map(jnp.asarray, {"S": S, "T": T})
    batch_stats = state.batch_stats
    if self.tunes_all:
      compressed["others"], copies = self._copies(state.params["model"], state.batch_stats["model"])
      batch_stats = {**batch_stats, "compressed": copies}
    return state.replace(params={**state.params, "compressed": compressed}, batch_stats=batch_stats,
                         extra=jax.tree_util.tree_map(jnp.asarray, extra))

  def kernels(self, compressed, extra, k):
    """Variant ``k``'s kernels ``q(S) q(T)`` (straight-through quantizers, fixed rates and steps)."""
    out = {}
    for layer in self.layers:
      key = _key(layer.path)
      s, t = compressed["S"][key][k], compressed["T"][key][k]
      t_q = jnp.concatenate([quant.midtread(t[lo:hi], extra["t_rates"][key][k, b], extra["t_steps"][key][k, b])
                             for b, (lo, hi) in enumerate(layer.bounds)])
      s_q = jnp.concatenate([quant.midtread(s[:, lo:hi], extra["s_rates"][key][k, b], extra["s_steps"][key][k, b])
                             for b, (lo, hi) in enumerate(layer.bounds)], axis=1)
      s_q = jnp.where(extra["s_identity"][key][k], jnp.eye(layer.rows), s_q)
      out[layer.path] = matrix_kernel(s_q @ t_q, layer.shape, self.options.mode)
    return out

  def _params_with(self, params, kernels):
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    flat.update(kernels)
    return traverse_util.unflatten_dict(flat)

  def _variables(self, model_params, compressed, batch_stats, extra, k, *, with_kernels: bool = True):
    """Variant ``k``'s ``{"params", "batch_stats"}``: the loaded model with its kernels
    ``q(S) q(T)`` (the loaded ones unless ``with_kernels``) and, with ``fine_tune="all"``,
    its own other parameters and statistics."""
    replaced = self.kernels(compressed, extra, k) if with_kernels else {}
    if not self.tunes_all:
      return {"params": self._params_with(model_params, replaced), "batch_stats": batch_stats["model"]}
    replaced.update({p: compressed["others"][_key(p)][k] for p in self.other_paths})
    return {"params": self._params_with(model_params, replaced),
            "batch_stats": jax.tree_util.tree_map(lambda a: a[k], batch_stats["compressed"])}

  def _variant_loss(self, state, compressed, x, y, k):
    """Variant ``k``'s ``(loss, accuracy, new BatchNorm statistics or None)`` on a batch."""
    variables = self._variables(state.params["model"], compressed, state.batch_stats, state.extra, k)
    if self.tunes_all:
      logits, updates = self.model.apply(variables, x, self.plan, train=True, mutable=["batch_stats"])
      stats = updates["batch_stats"]
    else:
      logits, stats = self.model.apply(variables, x, self.plan, train=False), None
    return distill.cross_entropy(logits, y), distill.accuracy(logits, y), stats

  def train_step(self, state, x, y, rng, phase_index):
    del rng

    def loss_fn(compressed):
      losses, accuracies, stats = zip(*[self._variant_loss(state, compressed, x, y, k)
                                        for k in range(len(self.pairs))])
      return jnp.sum(jnp.stack(losses)), (jnp.stack(losses), jnp.stack(accuracies), stats)

    (_, (losses, accuracies, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["compressed"])
    changes = {}
    if self.tunes_all:
      changes["batch_stats"] = {**state.batch_stats,
                                "compressed": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *stats)}
    new_state = self.apply_gradients(state, phase_index, {"compressed": grads}, **changes)
    metrics = {"loss": jnp.mean(losses), "accuracy": jnp.mean(accuracies)}
    for v, loss in zip(self.variants[1:], losses):
      metrics[f"loss/{v.name}"] = loss
    return new_state, metrics

  def network(self, state, index):
    """``fp32`` (index 0) or compressed variant ``index - 1`` (:meth:`_variables`)."""
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats["model"]}
    if index:
      variables = self._variables(state.params["model"], state.params["compressed"], state.batch_stats, state.extra,
                                  index - 1)
    return VariantNetwork(self.model, variables, self.plan, self.options.run.model)

  def eval_logits(self, state, x, variant_index):
    branches = [lambda k=k: apply_network(self.network(state, k), x) for k in range(len(self.variants))]
    return jax.lax.switch(variant_index, branches)

  def quantized_layers(self, state, k) -> list[compress.QuantizedLayer]:
    """Variant ``k``'s layers as host arrays (the file's content)."""
    extra = jax.tree_util.tree_map(np.asarray, state.extra)
    compressed = jax.tree_util.tree_map(np.asarray, {n: state.params["compressed"][n] for n in ("S", "T")})
    out = []
    for layer in self.layers:
      key, bounds = _key(layer.path), layer.bounds
      t_rates = [int(r) for r in extra["t_rates"][key][k]]
      t_steps = [float(s) for s in extra["t_steps"][key][k]]
      identity = bool(extra["s_identity"][key][k])
      s_rates = [] if identity else [int(r) for r in extra["s_rates"][key][k]]
      s_steps = [] if identity else [float(s) for s in extra["s_steps"][key][k]]
      t = np.concatenate([allocation.midtread_numpy(compressed["T"][key][k][lo:hi], t_rates[b], t_steps[b])
                          for b, (lo, hi) in enumerate(bounds)])
      s = np.eye(layer.rows) if identity else np.concatenate(
          [allocation.midtread_numpy(compressed["S"][key][k][:, lo:hi], s_rates[b], s_steps[b])
           for b, (lo, hi) in enumerate(bounds)], axis=1)
      out.append(compress.QuantizedLayer(layer.path, layer.shape, self.options.mode, bounds, t_rates, t_steps,
                                         s_rates, s_steps, s, t))
    return out

  def _others(self, variables):
    """``variables`` without the compressed kernels (what the file stores as float32)."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]))
    kernels = {layer.path for layer in self.layers}
    params = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in kernels})
    return {"params": params, "batch_stats": variables["batch_stats"]}

  def finalize(self, state, workdir):
    """Compressed files, the frontier table and plot, and transform-domain MACs; a
    compressed variant's size is its file's."""
    directory = os.path.join(workdir, "compressed")
    os.makedirs(directory, exist_ok=True)
    extra = jax.tree_util.tree_map(np.asarray, state.extra)
    fp_variables = {"params": state.params["model"], "batch_stats": state.batch_stats["model"]}
    fp_macs = models.macs_by_layer(self.model, fp_variables, self.sample_input, self.plan)
    macs_original = sum(jax.tree_util.tree_leaves(fp_macs))
    model_bytes = {"fp32": 4 * sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(state.params["model"]))}
    total = sum(math.prod(layer.shape) for layer in self.layers)
    variants, side_rates = {}, {}
    for k, (transform, rate) in enumerate(self.pairs):
      name = self.variants[k + 1].name
      layers = self.quantized_layers(state, k)
      # The compressed kernels are left out of the file and replaced for the MAC count: not computed.
      variables = jax.device_get(self._variables(state.params["model"], state.params["compressed"], state.batch_stats,
                                                 state.extra, k, with_kernels=False))
      model_bytes[name] = codec.save(os.path.join(directory, f"{name.replace('@', '_')}.tq"), layers,
                                     self._others(variables))
      macs = {}   # filled while tracing: shapes decide them
      with compress.transform_domain(layers, macs):
        jax.eval_shape(lambda v: self.model.apply(v, self.sample_input, self.plan),
                       {**variables, "params": compress.reconstruct(variables["params"], layers)})
      side_rates[transform] = _side_rate(layers, total)
      variants[name] = {"transform": transform, "target_rate": rate, "rate": float(extra["rate"][k]),
                        "entropy_rate": float(extra["entropy_rate"][k]), "side_rate": side_rates[transform],
                        "file_bytes": model_bytes[name],
                        "transform_domain_macs": int(sum(macs.values())) + _uncompressed_macs(fp_macs, set(macs))}
    frontier = {t: [{"rate": float(r), "distortion": float(d)} for r, d in extra["frontier"][ti]]
                for ti, t in enumerate(self.options.transforms)}
    _write_frontier(workdir, frontier, side_rates, self.options.distortion)
    return {"model_bytes": model_bytes, "compressed": variants, "original_macs": int(macs_original),
            "frontier": frontier}


def _store(extra, S, T, k, layers: list[compress.LayerAnalysis], quantized: list[compress.QuantizedLayer]):
  """Variant ``k``'s unquantized S and T, rates and steps into the host copies of the state."""
  for layer, q in zip(layers, quantized):
    key = _key(layer.path)
    S[key][k], T[key][k] = layer.factorisation.S, layer.factorisation.T
    extra["t_rates"][key][k], extra["t_steps"][key][k] = q.t_rates, q.t_steps
    extra["s_identity"][key][k] = not q.s_rates
    if q.s_rates:
      extra["s_rates"][key][k], extra["s_steps"][key][k] = q.s_rates, q.s_steps


def _side_rate(layers: list[compress.QuantizedLayer], total: int) -> float:
  """Bits per weight of the side information, not in ``rate``: for every stored block (each
  T block, and each S block where S is not the identity) its bit-depth in ``RATE_BITS`` bits
  and its step as a float32 (``STEP_BITS``): ``blocks * (4 + 32) / weights``."""
  blocks = sum(len(layer.t_rates) + len(layer.s_rates) for layer in layers)
  return blocks * (RATE_BITS + STEP_BITS) / total


def _uncompressed_macs(fp_macs: dict, compressed_paths) -> int:
  """MACs (of :func:`qflax.models.macs_by_layer`) of the layers that ran outside the transform
  domain (grouped convolutions)."""
  flat = traverse_util.flatten_dict(fp_macs)
  return sum(int(sum(value)) for path, value in flat.items() if path[:-1] + ("kernel",) not in compressed_paths)


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


def _write_frontier(workdir, frontier, side_rates, distortion="output"):
  measure = "output MSE on the calibration images" if distortion == "output" else "weight MSE"
  side = ", ".join(f"{t} {r:.4f}" for t, r in side_rates.items())
  lines = ["# Rate-distortion frontier (Lagrangian sweep)", "",
           f"Predicted {measure} against fixed-length bits per weight.", "",
           f"Side information (per block a {RATE_BITS}-bit bit-depth and a {STEP_BITS}-bit step), not in the "
           f"bits below: {side} bits per weight.", "",
           f"| transform | bits per weight | {measure.split(' on ')[0]} |", "|---|---:|---:|"]
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
