"""Quantized convolution and dense layers with pluggable quantizers.

Both quantize their input with an activation quantizer at ``precision.a_bits``
and their kernel with a weight quantizer at ``precision.w_bits``; learnable
quantizer scalars (PACT clip, LSQ step, QIL interval) are stacked over the
layer's static ``bit_set`` and selected by ``precision.slot``.

``dtype`` is the compute dtype (``float32`` or ``bfloat16``): parameters are always
float32 and quantization always runs in float32; in bfloat16 the convolution or
matrix product runs on the quantizers' integer codes (exact in bfloat16 up to 8
bits) with float32 accumulation, and the scales are applied in float32 after
(:func:`quantized_product`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qflax import quant
from qflax.nn._src.batch_norm import select_slot
from qflax.nn._src.precision import BlockPrecision, check_bit_set, check_slot

CALIBRATION = "calibration"
FLOPS = "flops"   # when mutable, layers sow their multiply-accumulates per example
EXPORT = "export"  # when mutable (concrete precision), layers sow their exported kernel
QUANT_STATS = "quant_stats"   # when mutable (concrete precision), layers sow their code statistics
Initializer = Callable[..., jax.Array]
COMPUTE_DTYPES = ("float32", "bfloat16")
# Learnable quantizer scalars are named ``<role>_<parameter>``: ``input`` for the
# activation quantizer (e.g. ``input_alpha``), ``kernel`` for the weight quantizer.
QUANTIZER_ROLES = ("input", "kernel")


def quantizer_param(path) -> str | None:
  """``"input"`` or ``"kernel"`` when ``path`` (a parameter's key path, or its last key)
  names a learnable quantizer scalar of a :class:`QuantConv` / :class:`QuantDense`
  (activation or weight quantizer), else ``None``. The one place this naming is read.

  Example:
    >>> quantizer_param(("blocks_0", "conv", "input_alpha"))
    'input'
  """
  name = path if isinstance(path, str) else path[-1]
  role, _, rest = str(name).partition("_")
  return role if rest and role in QUANTIZER_ROLES else None


def _slot_params(module: nn.Module, quantizer: quant.Quantizer, prefix: str, bit_set: tuple[int, ...],
                 init_per_bits: Callable[[int], Mapping[str, Any]], slot) -> dict[str, jax.Array]:
  """Creates ``<prefix>_<name>`` params of shape ``(len(bit_set),)``; returns slot ``slot``."""
  selected = {}
  for name in quantizer.param_names:
    stacked = module.param(
        f"{prefix}_{name}",
        lambda _, n=name: jnp.stack([jnp.asarray(init_per_bits(b)[n], jnp.float32) for b in bit_set]))
    selected[name] = select_slot(stacked, slot)
  return selected


def compute_dtype(dtype) -> jnp.dtype:
  """``dtype`` (a name or a dtype) as a ``jnp.dtype``, one of :data:`COMPUTE_DTYPES`."""
  try:
    value = jnp.dtype(dtype)
  except TypeError:
    value = None
  if value is None or value.name not in COMPUTE_DTYPES:
    raise ValueError(f"compute dtype {dtype!r} is not supported; allowed: {COMPUTE_DTYPES}")
  return value


def quantize_operands(module: nn.Module, x: jax.Array, kernel: jax.Array, precision: BlockPrecision,
                      weight_quantizer: str, act_quantizer: str, bit_set: Sequence[int],
                      act_param_init: Mapping[str, float] | None, *, with_steps: bool = False):
  """Quantizes a layer's input and kernel; sows calibration estimates when asked.

  When the ``"calibration"`` collection is mutable, each quantizer with
  learnable parameters sows ``{"slot": s, <param>: estimate}`` computed from
  the current input (activations) or kernel (weights); see
  :func:`qflax.nn.calibrate`. With ``with_steps`` it also returns the grid steps
  of both quantized operands (``Quantizer.step``, 1 at full precision), for
  :func:`quantized_product`.
  """
  bit_set = check_bit_set(bit_set)
  slot = check_slot(precision.slot, len(bit_set))
  w_bits = quant.check_bits(precision.w_bits, "w_bits")
  a_bits = quant.check_bits(precision.a_bits, "a_bits")
  wq = quant.get_quantizer(weight_quantizer, "weight")
  aq = quant.get_quantizer(act_quantizer, "activation")

  act_defaults = {**aq.defaults, **(act_param_init or {})}
  a_params = _slot_params(module, aq, QUANTIZER_ROLES[0], bit_set, lambda b: act_defaults, slot)
  w_params = _slot_params(module, wq, QUANTIZER_ROLES[1], bit_set, lambda b: wq.init(kernel, b), slot)

  if module.is_mutable_collection(CALIBRATION) and not module.is_initializing():
    if aq.param_names:
      module.sow(CALIBRATION, "input", {"slot": slot, **aq.init(x, a_bits)})
    if wq.param_names:
      module.sow(CALIBRATION, "kernel", {"slot": slot, **wq.init(kernel, w_bits)})
  if module.is_mutable_collection(EXPORT) and not module.is_initializing():
    module.sow(EXPORT, "kernel", export_kernel(wq, kernel, precision.w_bits, w_params))
  if module.is_mutable_collection(QUANT_STATS) and not module.is_initializing():
    for role, q, value, bits, params in (("input", aq, x, precision.a_bits, a_params),
                                         ("kernel", wq, kernel, precision.w_bits, w_params)):
      stats = quantizer_statistics(q, value, bits, params)
      if stats is not None:
        module.sow(QUANT_STATS, role, stats)
  x_q, kernel_q = aq.apply(x, a_bits, a_params), wq.apply(kernel, w_bits, w_params)
  if not with_steps:
    return x_q, kernel_q
  return x_q, kernel_q, aq.step(x, a_bits, a_params), wq.step(kernel, w_bits, w_params)


def _output_channel_step(step: jax.Array, kernel_shape) -> jax.Array | None:
  """A kernel's grid step as a scalar or a ``(features,)`` vector; ``None`` when it is
  neither per tensor nor per output channel (it cannot be factored out of the product)."""
  if step.size == 1:
    return step.reshape(())
  if step.shape == (1,) * (len(kernel_shape) - 1) + (kernel_shape[-1],):
    return step.reshape(-1)
  return None


def quantized_product(op: Callable[..., jax.Array], x_q: jax.Array, kernel_q: jax.Array, x_step, kernel_step,
                      dtype) -> jax.Array:
  """A bilinear ``op`` (a convolution, a matrix product) of quantized operands, as float32.

  ``float32``: ``op(x_q, kernel_q)``. Lower precision (``bfloat16``), with the grid
  steps ``s_x`` (per tensor) and ``s_w`` (per tensor or per output channel) of the
  quantizers (:attr:`qflax.quant.Quantizer.step`):

    ``y = op(cast(x_q / s_x), cast(w_q / s_w)) * s_x s_w``

  accumulated in float32. At up to 8 bits ``x_q / s_x`` and ``w_q / s_w`` are the
  integer codes (minus the zero point: integers or half-integers of magnitude at most
  256), which bfloat16 holds exactly (8 significant bits), so every product is exact
  and the result is float32's up to summation order. At full precision the steps
  are 1 and the operands are rounded to ``dtype``. The steps carry no gradient, so
  the gradients reach ``x_q`` and ``w_q`` (and through them the quantizers'
  straight-through estimators) exactly as in float32, up to bfloat16 rounding.
  ``op`` must accept ``preferred_element_type``.
  """
  dtype = compute_dtype(dtype)
  if dtype == jnp.float32:
    return op(x_q, kernel_q.astype(x_q.dtype))
  x_step = jax.lax.stop_gradient(jnp.asarray(x_step, jnp.float32))
  kernel_step = _output_channel_step(jax.lax.stop_gradient(jnp.asarray(kernel_step, jnp.float32)), kernel_q.shape)
  if x_step.size != 1 or kernel_step is None:   # no common scale to factor out: round the operands
    x_step, kernel_step = jnp.ones((), jnp.float32), jnp.ones((), jnp.float32)
  x_step = x_step.reshape(())
  if kernel_step.ndim:
    low_kernel = kernel_q / kernel_step.reshape((1,) * (kernel_q.ndim - 1) + (-1,))
  else:
    low_kernel = kernel_q / kernel_step
  y = op((x_q / x_step).astype(dtype), low_kernel.astype(dtype), preferred_element_type=jnp.float32)
  return y * (x_step * kernel_step)


def quantizer_statistics(quantizer: quant.Quantizer, x: jax.Array, bits, params) -> dict | None:
  """What a health monitor reads of one quantizer on one tensor: the code statistics
  (:func:`qflax.quant.code_statistics`) of ``x``'s integer form, the quantizer's
  parameters at this slot, ``bits``, the mean zero point (0 for unsigned codes) and
  the RMS of ``x`` (to tell a stuck parameter from a frozen layer). ``None`` for full
  precision, parameter-free identity quantizers, or bits not known at trace time."""
  if isinstance(bits, jax.core.Tracer):
    return None
  value = int(np.asarray(bits))   # NumPy: a jnp op on it would be traced under jit
  if quantizer.name == "none" or value >= quant.FULL_PRECISION:
    return None
  encoded = quantizer.integer(x, value, params)
  codes = encoded.codes.reshape(-1)
  zero_point = jnp.mean(jnp.asarray(encoded.zero_point, jnp.float32))
  # The share at the extreme codes present: the top one, and the bottom one for signed codes
  # (an unsigned quantizer's bottom code is its zero, not a clip).
  at_top = codes == jnp.max(codes)
  at_clip = jnp.where(zero_point > 0, at_top | (codes == jnp.min(codes)), at_top)
  return {**quant.code_statistics(encoded), "clip_fraction": jnp.mean(at_clip.astype(jnp.float32)), **{f"param_{k}": jnp.asarray(v, jnp.float32) for k, v in params.items()},
          "bits": jnp.int32(value), "zero_point": zero_point,
          "rms": jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))}


def export_kernel(quantizer: quant.Quantizer, kernel: jax.Array, w_bits, params) -> dict:
  """The exported form of a kernel: integer codes (+ scale, zero point) or float32.

  ``w_bits`` must be concrete (export runs outside ``jit``).
  """
  bits = quant.check_bits(w_bits, "w_bits")
  bits_value = int(np.asarray(bits))
  if quantizer.name == "none" or bits_value >= quant.FULL_PRECISION:
    # The kernel the layer runs with (some weight quantizers normalise at full precision).
    return {"float": quantizer.apply(kernel, bits_value, params)}
  encoded = quantizer.integer(kernel, bits_value, params)
  return {"codes": encoded.codes, "scale": jnp.asarray(encoded.scale), "zero_point": jnp.asarray(encoded.zero_point),
          "bits": bits_value}


def _exported_entries(tree):
  for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, dict) and ("float" in x or "codes" in x)):
    if isinstance(leaf, dict):
      yield leaf


def exported_bytes(tree) -> int:
  """Bytes of the kernels in an ``EXPORT`` collection: packed codes plus float32
  scales and zero points, or float32 for full-precision kernels."""
  total = 0
  for entry in _exported_entries(tree):
    if "float" in entry:
      total += 4 * int(entry["float"].size)
    else:
      total += quant.packed_size_bytes(int(entry["codes"].size), int(entry["bits"]))
      total += 4 * (int(np.size(entry["scale"])) + int(np.size(entry["zero_point"])))
  return total


def exported_kernel_params(tree) -> int:
  """Number of kernel weights in an ``EXPORT`` collection."""
  return sum(int(e["float"].size if "float" in e else e["codes"].size) for e in _exported_entries(tree))


def conv_padding(padding, ndim):
  """Flax-style ``padding`` (a string, an int or per-dimension pairs) for ``lax.conv_general_dilated``."""
  if isinstance(padding, str):
    return padding
  if isinstance(padding, int):
    return [(padding, padding)] * ndim
  return [tuple(p) if not isinstance(p, int) else (p, p) for p in padding]


def _operands(layer, x, kernel, precision, dtype):
  """``(x_q, kernel_q, x_step, kernel_step)`` of a :class:`QuantConv` / :class:`QuantDense`,
  quantized in float32 (the steps only below float32: 1 there)."""
  args = (layer, x.astype(jnp.float32), kernel, precision, layer.weight_quantizer, layer.act_quantizer,
          layer.bit_set, layer.act_param_init)
  if dtype == jnp.float32:
    return (*quantize_operands(*args), 1.0, 1.0)
  return quantize_operands(*args, with_steps=True)


class QuantConv(nn.Module):
  """2-D convolution (NHWC, HWIO kernel) with quantized input and kernel.

  Attributes:
    features: output channels.
    kernel_size: ``(kh, kw)``.
    strides: int or pair.
    padding: ``"SAME"``, ``"VALID"``, an int, or per-dimension pairs.
    feature_group_count: groups (``features`` = channels for depthwise).
    use_bias: add a (full-precision) bias.
    weight_quantizer: a name from ``quant.quantizer_names("weight")``.
    act_quantizer: a name from ``quant.quantizer_names("activation")``.
    bit_set: the static bit-widths this layer serves; one slot each.
    act_param_init: initial activation-quantizer scalars (e.g. ``{"alpha": 8.0}``).
    dtype: compute dtype, ``float32`` or ``bfloat16`` (the output's too); the
      kernel and quantizer scalars are float32 either way, and quantization runs in
      float32 (:func:`quantized_product`).

  Example:
    >>> conv = QuantConv(64, (3, 3), weight_quantizer="sat", act_quantizer="pact",
    ...                  bit_set=(32, 4, 2))
    >>> variables = conv.init(key, x, BlockPrecision(4, 4, 1))
    >>> y = conv.apply(variables, x, BlockPrecision(2, 2, 2))
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  feature_group_count: int = 1
  use_bias: bool = False
  weight_quantizer: str = "none"
  act_quantizer: str = "none"
  bit_set: Sequence[int] = (32,)
  act_param_init: Mapping[str, float] | None = None
  kernel_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, precision: BlockPrecision) -> jax.Array:
    dtype = compute_dtype(self.dtype)
    in_features = x.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(f"input channels {in_features} not divisible by "
                       f"feature_group_count={self.feature_group_count}")
    kernel_shape = (*self.kernel_size, in_features // self.feature_group_count, self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
    x_q, kernel_q, x_step, kernel_step = _operands(self, x, kernel, precision, dtype)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)

    def conv(lhs, rhs, **kwargs):
      return jax.lax.conv_general_dilated(
          lhs, rhs, strides, conv_padding(self.padding, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=self.feature_group_count, **kwargs)
    y = quantized_product(conv, x_q, kernel_q, x_step, kernel_step, dtype)
    if self.is_mutable_collection(FLOPS) and not self.is_initializing():
      self.sow(FLOPS, "macs", math.prod(y.shape[1:]) * math.prod(kernel_shape[:-1]))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
    return y.astype(dtype)


class QuantDense(nn.Module):
  """Dense layer with quantized input and kernel (same options as :class:`QuantConv`,
  ``dtype`` included)."""
  features: int
  use_bias: bool = True
  weight_quantizer: str = "none"
  act_quantizer: str = "none"
  bit_set: Sequence[int] = (32,)
  act_param_init: Mapping[str, float] | None = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, precision: BlockPrecision) -> jax.Array:
    dtype = compute_dtype(self.dtype)
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    x_q, kernel_q, x_step, kernel_step = _operands(self, x, kernel, precision, dtype)
    y = quantized_product(jnp.matmul, x_q, kernel_q, x_step, kernel_step, dtype)
    if self.is_mutable_collection(FLOPS) and not self.is_initializing():
      self.sow(FLOPS, "macs", math.prod(x.shape[1:-1]) * kernel.size)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
    return y.astype(dtype)
