"""Compressing a trained Flax model's weights with transform quantization.

``analyse`` factorises every convolution and dense kernel (``W = S T``), cuts
``T`` (rows) and ``S`` (the matching columns) into blocks and measures, per
block and rate, the best step and the output MSE on calibration images.
``compress_at`` picks the allocation for a target rate (Lagrangian sweep) and
returns the quantized model; ``reconstruct`` gives ordinary parameters
(``W = S^ T^``) and ``transform_domain`` runs the network as a 1x1 basis
convolution followed by the transformed convolution, pruned rows dropped.
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
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  flat[path] = jnp.asarray(kernel, jnp.float32)
  return traverse_util.unflatten_dict(flat)


def gradient_covariances(logits_fn: Callable, params, images, key, paths) -> dict:
  """Per layer, ``C_gg = E[g g^T]`` of the output gradients with respect to the rows of
  ``W`` (row transform), from one random projection ``v ~ N(0, I)`` per image:
  ``g = d(v . logits(x)) / dW``, whose covariance over ``v`` is the Jacobian product."""
  logits = logits_fn(params, images[:1])
  v = jax.random.normal(key, (len(images), logits.shape[-1]))

  def per_image(x, vi):
    return jax.grad(lambda p: jnp.sum(logits_fn(p, x[None])[0] * vi))(params)

  grads = traverse_util.flatten_dict(flax.core.unfreeze(jax.vmap(per_image)(images, v)))
  out = {}
  for path in paths:
    g = np.asarray(grads[path], np.float64)
    rows = np.stack([kernel_matrix(gi) for gi in g])           # (N, m, n a b)
    out[path] = np.einsum("nij,nkj->ik", rows, rows) / len(images)
  return out


def analyse(logits_fn: Callable, params, images, *, transform: str = "klt", num_blocks: int = 16,
            eps: float = 1e-3, key=None, grouped: dict | None = None,
            progress: Callable[[str], None] | None = None) -> list[LayerAnalysis]:
  """Factorises every kernel and measures each block's distortion per rate.

  ``logits_fn(params, images)`` is the network; distortion is the mean squared
  difference of its logits from the unquantized network's on ``images``.
  ``grouped`` maps kernel paths of grouped convolutions to their group count.
  Those, every layer under ``transform="identity"``, and layers whose basis would
  be larger than the layer itself (more input channels than ``out x kh x kw``, e.g.
  a classifier) keep ``S = I``, which is neither stored nor counted.
  """
  paths = kernel_paths(params)
  reference = logits_fn(params, images)
  mse = jax.jit(lambda p: jnp.mean((logits_fn(p, images) - reference) ** 2))
  c_gg = {}
  if transform == "elt":
    c_gg = gradient_covariances(logits_fn, params, images, key if key is not None else jax.random.key(0), paths)
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  layers = []
  for path in paths:
    kernel = np.asarray(flat[path])
    rows, cols = kernel_matrix(kernel).shape
    identity = transform == "identity" or (grouped or {}).get(path, 1) > 1 or rows > cols
    f = factorise(kernel, "identity" if identity else transform, c_gg=c_gg.get(path), eps=eps)
    bounds = [(int(b[0]), int(b[-1]) + 1) for b in allocation.row_blocks(len(f.T), num_blocks)]

    def distortion_with(s, t):
      return float(mse(replace_kernel(params, path, matrix_kernel(s @ t, f.shape, f.mode))))

    t_choice, s_choice = [], []
    for lo, hi in bounds:
      def t_block(q, lo=lo, hi=hi):
        t = f.T.copy()
        t[lo:hi] = q
        return distortion_with(f.S, t)

      def s_block(q, lo=lo, hi=hi):
        s = f.S.copy()
        s[:, lo:hi] = q
        return distortion_with(s, f.T)
      t_choice.append(allocation.search_steps(f.T[lo:hi], t_block))
      if not identity:
        s_choice.append(allocation.search_steps(f.S[:, lo:hi], s_block))
    layers.append(LayerAnalysis(path, f, bounds, t_choice, None if identity else s_choice))
    if progress is not None:
      progress(f"analysed {'/'.join(path)}: {len(bounds)} blocks")
  return layers


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
  ``QuantDense`` layers run in the transform domain: ``x -> 1x1 conv with S[:, keep]
  -> the layer with kernel T[keep]`` (row transform). Grouped convolutions (identity
  transform) run as they are, so apply the model to :func:`reconstruct`'s parameters.
  With ``macs`` (a dict), each layer's multiply-accumulates per example are recorded
  there by kernel path.

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
    if layer.mode != "row":
      raise ValueError("transform-domain inference is implemented for the row transform")
    x = args[0]
    keep = kept_rows(layer)
    k = int(keep.sum())
    t = jnp.asarray(matrix_kernel(layer.T[keep], layer.shape[:-2] + (k, layer.shape[-1]), "row"), jnp.float32)
    if layer.s_rates:
      h = x @ jnp.asarray(layer.S[:, keep], jnp.float32)
    else:                      # S = I: no basis convolution, pruned input channels dropped
      h = x[..., keep]
    if isinstance(module, qnn.QuantDense):
      y = h @ t
    else:
      strides = (module.strides,) * 2 if isinstance(module.strides, int) else tuple(module.strides)
      y = jax.lax.conv_general_dilated(h, t, strides, qnn.conv_padding(module.padding, 2),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if macs is not None:
      basis = int(np.prod(x.shape[1:-1])) * x.shape[-1] * k if layer.s_rates else 0
      macs[layer.path] = basis + int(np.prod(y.shape[1:])) * int(np.prod(t.shape[:-1]))
    if module.use_bias:
      y = y + module.variables["params"]["bias"]
    return y

  return nn.intercept_methods(interceptor)
