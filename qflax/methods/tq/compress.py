"""Compressing a trained Flax model's weights with transform quantization.

``analyse`` factorises every convolution and dense kernel (``W = S T``), cuts
``T`` (rows) and ``S`` (the matching columns) into blocks and measures, per
block and rate, the best step and the output MSE on calibration images (or, as
the baseline, the weight error).
``frontier`` traces the Lagrangian sweep (``allocation.allocation_for_rate`` picks
the allocation for a target rate) and ``quantize_layers`` quantizes the layers at
it; ``reconstruct`` gives ordinary parameters
(``W = S^ T^``) and ``transform_domain`` runs the network as a 1x1 basis
convolution and the transformed convolution (in that order for the row transform,
reversed for the column transform), pruned rows dropped.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qflax import nn as qnn
from qflax.methods.tq import allocation
from qflax.methods.tq.transforms import Factorisation, factorise, kernel_matrix, matrix_kernel

DISTORTIONS = ("output", "weight")


class LayerAnalysis(NamedTuple):
  path: tuple[str, ...]
  factorisation: Factorisation
  bounds: list[tuple[int, int]]    # row ranges of T (= column ranges of S), one per block
  t_choice: list[allocation.BlockChoice]
  s_choice: list[allocation.BlockChoice] | None   # None: S is the identity (not stored, not counted)


class QuantizedLayer(NamedTuple):
  """One layer at a chosen allocation (float arrays hold the dequantized values)."""
  path: tuple[str, ...]
  shape: tuple[int, ...]
  mode: str
  bounds: list[tuple[int, int]]
  t_rates: list[int]
  t_steps: list[float]
  s_rates: list[int]          # empty when S is the identity
  s_steps: list[float]
  S: np.ndarray
  T: np.ndarray


def kernel_paths(params) -> list[tuple[str, ...]]:
  """Paths of every convolution (4-D) and dense (2-D) kernel."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  return [k for k, v in flat.items() if k[-1] == "kernel" and np.ndim(v) in (2, 4)]


def replace_kernel(params, path, kernel):
  return with_kernels(params, {path: kernel})


def with_kernels(params, kernels: dict):
  """``params`` with the kernels at the paths of ``kernels`` replaced (float32; jittable)."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  flat.update({path: jnp.asarray(k, jnp.float32) for path, k in kernels.items()})
  return traverse_util.unflatten_dict(flat)


def stacked_matrices(g, mode: str = "row"):
  """:func:`~qflax.methods.tq.transforms.kernel_matrix` of a stack of kernels ``(c, *kernel)``
  on device: ``(c, rows, cols)``."""
  if g.ndim == 3:
    g = g[:, None, None]
  c, kh, kw, m, n = g.shape
  if mode == "row":
    return g.transpose(0, 3, 4, 1, 2).reshape(c, m, n * kh * kw)
  return g.transpose(0, 4, 3, 1, 2).reshape(c, n, m * kh * kw)


def gradient_covariances(logits_fn: Callable, params, images, key, paths, *, mode: str = "row",
                         chunk: int = 8) -> dict:
  """Per layer, ``C_gg = (1/N) sum_i G_i G_i^T`` of the output gradients ``G_i`` with respect
  to the rows of ``W`` (``mode`` as in ``kernel_matrix``), from one random projection
  ``v_i ~ N(0, I)`` per image: ``G_i = d(v_i . logits(x_i)) / dW``, whose covariance over ``v``
  is the Jacobian product ``E[J^T J]`` (Young et al., TPAMI 2021, the ELT's statistics).

  The sum is accumulated over chunks of ``chunk`` images: only one chunk's gradients are
  ever held (on device, then on the host, where ``G G^T`` is summed in float64); the last
  chunk is padded with ``v = 0``, whose gradients are zero.
  """
  n = len(images)
  logits = logits_fn(params, images[:1])
  v = jax.random.normal(key, (n, logits.shape[-1]))
  pad = -n % chunk
  images = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
  v = jnp.concatenate([v, jnp.zeros((pad, v.shape[1]), v.dtype)])
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  kernels = {path: flat[path] for path in paths}

  def projected(ks, x, vi):
    return jnp.sum(logits_fn(with_kernels(params, ks), x[None])[0] * vi)

  @jax.jit
  def chunk_rows(ks, xs, vs):
    grads = jax.vmap(jax.grad(projected), in_axes=(None, 0, 0))(ks, xs, vs)
    return {path: stacked_matrices(grads[path], mode) for path in paths}

  total = {}
  for lo in range(0, n + pad, chunk):
    for path, rows in chunk_rows(kernels, images[lo:lo + chunk], v[lo:lo + chunk]).items():
      r = np.asarray(rows, np.float64).transpose(1, 0, 2).reshape(rows.shape[1], -1)   # (m, chunk * cols)
      total[path] = total.get(path, 0.0) + r @ r.T
  return {path: total[path] / n for path in paths}


def _output_blocks(mse, params, path, f: Factorisation):
  """Per block, the output MSE with only that T block / S block replaced."""
  def measure(s, t):
    return float(mse(replace_kernel(params, path, matrix_kernel(s @ t, f.shape, f.mode))))

  def blocks(lo, hi):
    def t_block(q):
      t = f.T.copy()
      t[lo:hi] = q
      return measure(f.S, t)

    def s_block(q):
      s = f.S.copy()
      s[:, lo:hi] = q
      return measure(s, f.T)
    return t_block, s_block
  return blocks


def _weight_blocks(f: Factorisation, total: int):
  """Per block, the weight error ``||S_b (T^_b - T_b)||_F^2 / N`` (a T block) or
  ``||(S^_b - S_b) T_b||_F^2 / N`` (an S block), ``N`` the network's weight count: the
  block's share of the weight MSE, from the Gram matrices ``S_b^T S_b`` and ``T_b T_b^T``."""
  def blocks(lo, hi):
    gram_s = f.S[:, lo:hi].T @ f.S[:, lo:hi]
    gram_t = f.T[lo:hi] @ f.T[lo:hi].T

    def t_block(q):
      e = q - f.T[lo:hi]
      return float(np.sum(e * (gram_s @ e))) / total

    def s_block(q):
      e = q - f.S[:, lo:hi]
      return float(np.sum(e * (e @ gram_t))) / total
    return t_block, s_block
  return blocks


def analyse(logits_fn: Callable, params, images, *, transform: str = "klt", mode: str = "row",
            num_blocks: int = 16, eps: float = 1e-3, eps_norm: str = "frobenius", distortion: str = "output",
            chunk: int = 8, key=None, grouped: dict | None = None,
            progress: Callable[[str], None] | None = None) -> list[LayerAnalysis]:
  """Factorises every kernel (``mode``: the row or the column transform) and measures each
  block's distortion per rate (Young et al., TPAMI 2021).

  ``distortion="output"``: the mean squared difference of the logits of
  ``logits_fn(params, images)`` from the unquantized network's with only that block
  quantized (the paper's allocation). ``"weight"``: the block's weight error
  (:func:`_weight_blocks`; no forward passes), so the table sums to the network's weight
  MSE (the paper's weight-error baseline). ``eps``, ``eps_norm`` and ``chunk`` are the ELT's
  (:func:`gradient_covariances`). ``grouped`` maps kernel paths of grouped convolutions to
  their group count. Those, every layer under ``transform="identity"``, and layers whose basis
  would be larger than the layer itself (more rows than columns, e.g. a classifier in row
  mode) keep ``S = I``, which is neither stored nor counted.
  """
  if distortion not in DISTORTIONS:
    raise ValueError(f"distortion={distortion!r} is unknown; allowed: {DISTORTIONS}")
  paths = kernel_paths(params)
  c_gg = {}
  if transform == "elt":
    c_gg = gradient_covariances(logits_fn, params, images, key if key is not None else jax.random.key(0), paths,
                                mode=mode, chunk=chunk)
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  total = int(sum(np.size(flat[path]) for path in paths))
  if distortion == "output":
    reference = logits_fn(params, images)
    mse = jax.jit(lambda p: jnp.mean((logits_fn(p, images) - reference) ** 2))
  layers = []
  for path in paths:
    kernel = np.asarray(flat[path])
    rows, cols = kernel_matrix(kernel, mode).shape
    identity = transform == "identity" or (grouped or {}).get(path, 1) > 1 or rows > cols
    f = factorise(kernel, "identity" if identity else transform, mode=mode, c_gg=c_gg.get(path), eps=eps,
                  eps_norm=eps_norm)
    bounds = [(int(b[0]), int(b[-1]) + 1) for b in allocation.row_blocks(len(f.T), num_blocks)]
    blocks = _output_blocks(mse, params, path, f) if distortion == "output" else _weight_blocks(f, total)
    layers.append(_search_layer(path, f, bounds, identity, blocks))
    if progress is not None:
      progress(f"analysed {'/'.join(path)}: {len(bounds)} blocks")
  return layers


def _search_layer(path, f: Factorisation, bounds, identity: bool, blocks) -> LayerAnalysis:
  """The step search of every T block (and S block unless ``identity``) of one layer."""
  t_choice, s_choice = [], []
  for lo, hi in bounds:
    t_block, s_block = blocks(lo, hi)
    t_choice.append(allocation.search_steps(f.T[lo:hi], t_block))
    if not identity:
      s_choice.append(allocation.search_steps(f.S[:, lo:hi], s_block))
  return LayerAnalysis(path, f, bounds, t_choice, None if identity else s_choice)


def block_table(layers: list[LayerAnalysis]):
  """``(distortion (blocks, 9), sizes (blocks,))`` over every T and S block of every layer."""
  distortion, sizes = [], []
  for layer in layers:
    rows, cols = layer.factorisation.T.shape
    for b, ((lo, hi), t) in enumerate(zip(layer.bounds, layer.t_choice)):
      distortion.append(t.distortion)
      sizes.append((hi - lo) * cols)
      if layer.s_choice is not None:
        distortion.append(layer.s_choice[b].distortion)
        sizes.append((hi - lo) * rows)
  return np.stack(distortion), np.asarray(sizes, np.float64)


def total_weights(layers: list[LayerAnalysis]) -> int:
  return int(sum(np.prod(layer.factorisation.shape) for layer in layers))


def frontier(layers: list[LayerAnalysis], **sweep) -> list[allocation.FrontierPoint]:
  distortion, sizes = block_table(layers)
  return allocation.lambda_sweep(distortion, sizes, total_weights(layers), **sweep)


def quantize_layers(layers: list[LayerAnalysis], rates: np.ndarray) -> list[QuantizedLayer]:
  """The layers at per-block ``rates`` (ordered as :func:`block_table`)."""
  out, i = [], 0
  for layer in layers:
    f = layer.factorisation
    s = np.eye(len(f.S)) if layer.s_choice is None else np.zeros_like(f.S)
    t = np.zeros_like(f.T)
    t_rates, t_steps, s_rates, s_steps = [], [], [], []
    for b, ((lo, hi), tc) in enumerate(zip(layer.bounds, layer.t_choice)):
      rt = int(rates[i])
      i += 1
      t_rates.append(rt)
      t_steps.append(float(tc.steps[rt]))
      t[lo:hi] = allocation.midtread_numpy(f.T[lo:hi], rt, tc.steps[rt])
      if layer.s_choice is not None:
        rs, sc = int(rates[i]), layer.s_choice[b]
        i += 1
        s_rates.append(rs)
        s_steps.append(float(sc.steps[rs]))
        s[:, lo:hi] = allocation.midtread_numpy(f.S[:, lo:hi], rs, sc.steps[rs])
    out.append(QuantizedLayer(layer.path, f.shape, f.mode, layer.bounds, t_rates, t_steps, s_rates, s_steps, s, t))
  return out


def reconstruct(params, layers: list[QuantizedLayer]):
  """``params`` with every compressed kernel replaced by ``S^ T^``."""
  for layer in layers:
    params = replace_kernel(params, layer.path, matrix_kernel(layer.S @ layer.T, layer.shape, layer.mode))
  return params


def kept_rows(layer: QuantizedLayer) -> np.ndarray:
  """Rows of ``T`` (channels of the transform domain) that survive pruning."""
  keep = np.zeros(len(layer.T), bool)
  for b, ((lo, hi), rt) in enumerate(zip(layer.bounds, layer.t_rates)):
    keep[lo:hi] = rt > 0 and (not layer.s_rates or layer.s_rates[b] > 0)
  return keep


def transform_domain(layers: list[QuantizedLayer], macs: dict | None = None):
  """A context manager under which the model's (full-precision) ``QuantConv`` and
  ``QuantDense`` layers run in the transform domain (Young et al., TPAMI 2021), pruned
  rows dropped: row transform ``x -> 1x1 conv with S[:, keep] -> the layer with kernel
  T[keep]``; column transform ``x -> the layer with kernel T[keep] (k outputs) -> 1x1 conv
  with S[:, keep]^T`` (``W_o = sum_j S_oj T_j``). Grouped convolutions (identity transform)
  run as they are, so apply the model to :func:`reconstruct`'s parameters. With ``macs``
  (a dict), each layer's multiply-accumulates per example are recorded there by kernel path.

  Example:
    >>> with transform_domain(quantized):
    ...   logits = model.apply(variables, x, fp_plan)
  """
  by_path = {layer.path[:-1]: layer for layer in layers}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    layer = by_path.get(tuple(module.path))
    if (context.method_name != "__call__" or layer is None
        or not isinstance(module, (qnn.QuantConv, qnn.QuantDense))
        or getattr(module, "feature_group_count", 1) > 1):   # grouped: identity transform, run as is
      return next_fun(*args, **kwargs)
    run = _row_domain if layer.mode == "row" else _column_domain
    y, count = run(module, layer, args[0].astype(jnp.float32))   # float32 whatever the compute dtype
    if macs is not None:
      macs[layer.path] = count
    if module.use_bias:
      y = y + module.variables["params"]["bias"]
    return y.astype(qnn.compute_dtype(module.dtype))

  return nn.intercept_methods(interceptor)


def _apply_kernel(module, h, kernel):
  """``h`` through the module's own operation (dense or convolution) with ``kernel``."""
  if isinstance(module, qnn.QuantDense):
    return h @ kernel
  strides = (module.strides,) * 2 if isinstance(module.strides, int) else tuple(module.strides)
  return jax.lax.conv_general_dilated(h, kernel, strides, qnn.conv_padding(module.padding, 2),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _row_domain(module, layer: QuantizedLayer, x):
  """``y = conv(x S[:, keep], T[keep])`` and its MACs per example."""
  keep = kept_rows(layer)
  k = int(keep.sum())
  t = jnp.asarray(matrix_kernel(layer.T[keep], layer.shape[:-2] + (k, layer.shape[-1]), "row"), jnp.float32)
  if layer.s_rates:
    h = x @ jnp.asarray(layer.S[:, keep], jnp.float32)
  else:                      # S = I: no basis convolution, pruned input channels dropped
    h = x[..., keep]
  y = _apply_kernel(module, h, t)
  basis = int(np.prod(x.shape[1:-1])) * x.shape[-1] * k if layer.s_rates else 0
  return y, basis + int(np.prod(y.shape[1:])) * int(np.prod(t.shape[:-1]))


def _column_domain(module, layer: QuantizedLayer, x):
  """``y = conv(x, T[keep]) S[:, keep]^T`` and its MACs per example."""
  keep = kept_rows(layer)
  k, n = int(keep.sum()), layer.shape[-1]
  t = jnp.asarray(matrix_kernel(layer.T[keep], layer.shape[:-1] + (k,), "column"), jnp.float32)
  z = _apply_kernel(module, x, t)
  if layer.s_rates:
    y = z @ jnp.asarray(layer.S[:, keep].T, jnp.float32)
  else:                      # S = I: no basis convolution, pruned output channels are zero
    y = jnp.zeros(z.shape[:-1] + (n,), z.dtype).at[..., np.flatnonzero(keep)].set(z)
  basis = int(np.prod(z.shape[1:-1])) * k * n if layer.s_rates else 0
  return y, basis + int(np.prod(z.shape[1:])) * int(np.prod(t.shape[:-1]))
