"""Integer inference, a reference path: integer operands, int32 accumulation, requantization
between layers.

Each quantized layer quantizes its input to activation codes (``aq.integer``), subtracts the
zero points (doubling codes and zero point when a zero point is a half-integer, e.g. SAT's
``(2^k - 1) / 2``, and halving the scale), convolves or multiplies the integer operands
(``int8``, or ``int16`` where 8-bit codes do not fit) with ``int32`` accumulation, and rescales
once: ``y = acc * (s_x s_w)`` (``s_w`` per output channel where the kernel has one scale per
channel), then adds the float32 bias. BatchNorm, ReLU, residual adds and pooling run in
float32 between layers, and the next layer requantizes. Full-precision layers (and layers
with full-precision inputs) run their ordinary float forward.

Accumulation is exact: ``|acc| <= max|x_int| max|w_int| fan_in``, at most
``255 * 255 * fan_in < 2^31`` for 8-bit codes (doubled ones included) when
``fan_in <= 33025``; every layer is checked against this bound when prepared.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qflax import quant
from qflax import nn as qnn
from qflax.export._src import rebuild as rebuild_lib
from qflax.export._src.trace import LINEAR, path_name
from qflax.export._src.types import Activation, IntegerModel, LinearLayer, PackedCodes

ACCUMULATOR_LIMIT = 2**31
UNIT_ROUNDOFF = 2.0**-24   # float32: |fl(a op b) - (a op b)| <= u |a op b|


class IntegerKernel(NamedTuple):
  """Static description of one integer layer (the arrays travel as operands)."""
  activation: Activation
  x_multiplier: int        # 2 when the activation zero point is a half-integer, else 1
  x_offset: int            # x_int = codes * x_multiplier - x_offset
  dtype: type              # jnp.int8 or jnp.int16
  fan_in: int


def _doubled(zero_point) -> int:
  return 1 if np.all(np.mod(zero_point, 1) == 0) else 2


def _operand_dtype(path: str, lo: int, hi: int):
  for dtype in (jnp.int8, jnp.int16):
    if jnp.iinfo(dtype).min <= lo and hi <= jnp.iinfo(dtype).max:
      return dtype
  raise ValueError(f"layer {path}: integer operands in [{lo}, {hi}] do not fit int16")


def _activation_offsets(act: Activation) -> tuple[int, int]:
  aq = quant.get_quantizer(act.quantizer, "activation")
  with jax.ensure_compile_time_eval():   # zero points depend on bits only: concrete even under jit
    zero_point = np.asarray(aq.integer(jnp.zeros((1,), jnp.float32), act.bits, act.params).zero_point)
  multiplier = _doubled(zero_point)
  return multiplier, int(np.max(zero_point * multiplier))


def _prepare_layer(im: IntegerModel, path: str, layer: LinearLayer):
  """``(IntegerKernel, {"w": integer kernel, "scale": s_w / multiplier})`` of one layer."""
  kernel = im.tensors[layer.kernel]
  zero_point, scale = im.tensors[layer.zero_point], im.tensors[layer.scale]
  w_mult = _doubled(zero_point)
  w_int = kernel.unpack().astype(np.int64) * w_mult - (np.asarray(zero_point, np.float64) * w_mult).astype(np.int64)
  if scale.size > 1 and scale.shape != (1,) * (len(kernel.shape) - 1) + kernel.shape[-1:]:
    raise ValueError(f"layer {path}: the integer path needs one scale per tensor or per output channel, "
                     f"got shape {scale.shape}")
  x_mult, x_offset = _activation_offsets(layer.activation)
  x_lo, x_hi = -x_offset, x_mult * (2**layer.activation.bits - 1) - x_offset
  fan_in = int(np.prod(kernel.shape[:-1]))
  bound = max(abs(x_lo), abs(x_hi)) * int(np.max(np.abs(w_int))) * fan_in
  if bound >= ACCUMULATOR_LIMIT:
    raise ValueError(f"layer {path}: int32 accumulation could overflow ({bound} >= 2^31)")
  dtype = _operand_dtype(path, min(x_lo, int(w_int.min())), max(x_hi, int(w_int.max())))
  arrays = {"w": jnp.asarray(w_int, dtype), "scale": jnp.asarray(scale.reshape(-1) / w_mult, jnp.float32)}
  return IntegerKernel(layer.activation, x_mult, x_offset, dtype, fan_in), arrays


def integer_layers(im: IntegerModel, variant: str) -> list[str]:
  """Paths of the layers the integer path runs on codes: kernel stored as codes, input quantized."""
  return [path for path, layer in im.variants[variant].layers.items()
          if isinstance(layer, LinearLayer) and isinstance(im.tensors[layer.kernel], PackedCodes)
          and layer.activation.quantizer != "none" and layer.activation.bits < quant.FULL_PRECISION]


def _accumulate(module, x_int, w_int, dtype=jnp.int32):
  """``sum x_int w_int`` accumulated in ``dtype``: the module's convolution or matrix product."""
  if isinstance(module, qnn.QuantDense):
    return jax.lax.dot_general(x_int, w_int, (((x_int.ndim - 1,), (0,)), ((), ())), preferred_element_type=dtype)
  strides = (module.strides,) * 2 if isinstance(module.strides, int) else tuple(module.strides)
  return jax.lax.conv_general_dilated(x_int, w_int, strides, qnn.conv_padding(module.padding, 2),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=module.feature_group_count,
                                      preferred_element_type=dtype)


def integer_layer(module, x, kernel: IntegerKernel, arrays) -> jax.Array:
  """One layer on integers, bias excluded: ``acc = sum (c_x m_x - z_x m_x)(w_int)`` in int32,
  then ``y = acc * (s_x / m_x) (s_w / m_w)`` in float32."""
  act = kernel.activation
  encoded = quant.get_quantizer(act.quantizer, "activation").integer(x, act.bits, act.params)
  x_int = (encoded.codes * kernel.x_multiplier - kernel.x_offset).astype(kernel.dtype)
  acc = _accumulate(module, x_int, arrays["w"])
  return acc.astype(jnp.float32) * ((encoded.scale / kernel.x_multiplier) * arrays["scale"])


def _prepare(im: IntegerModel, variant: str):
  rebuild_lib.check_variant(im, variant)
  layers = im.variants[variant].layers
  prepared = {p: _prepare_layer(im, p, layers[p]) for p in integer_layers(im, variant)}
  return {p: k for p, (k, _) in prepared.items()}, {p: a for p, (_, a) in prepared.items()}


def _intercepting(static: dict, arrays: dict, layer_fn: Callable):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    path = path_name(module) if isinstance(module, LINEAR) else None
    if context.method_name != "__call__" or path not in static:
      return next_fun(*args, **kwargs)
    return layer_fn(module, args[0], static[path], arrays[path], lambda: next_fun(*args, **kwargs))
  return nn.intercept_methods(interceptor)


def _with_bias(module, y):
  return y + module.variables["params"]["bias"] if module.use_bias else y


def integer_forward(im: IntegerModel, variant: str):
  """``(apply_fn, operands)`` with ``apply_fn(operands, x) -> logits`` on the integer path.

  ``operands`` holds the integer kernels (``int8`` / ``int16``), their scales and the float
  variables the path still needs (BatchNorm, biases, full-precision layers), so
  ``jax.jit(apply_fn)`` takes the weights as arguments rather than constants.

  Example:
    >>> apply_fn, operands = integer_forward(im, "w4a4")
    >>> logits = jax.jit(apply_fn)(operands, x)
  """
  static, kernels = _prepare(im, variant)
  model, _, plan = rebuild_lib.rebuild(im, variant)
  operands = {"variables": rebuild_lib.rebuild_variables(im, variant, skip_kernels=tuple(static)),
              "kernels": kernels}

  def run(module, x, kernel, arrays, float_forward):
    del float_forward
    return _with_bias(module, integer_layer(module, x, kernel, arrays))

  def apply_fn(operands, x):
    with _intercepting(static, operands["kernels"], run):
      return model.apply(operands["variables"], x, plan, train=False)

  return apply_fn, operands


def _network_input(im: IntegerModel, x) -> jax.Array:
  """``x`` if it is a batch of the network's float input: finite, of the model's input shape;
  raw integer images are refused."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"the integer path takes the network's float input, normalised as in training "
                    f"((images / 255 - mean) / std, with mean and std from the run's export/manifest.json), "
                    f"not {x.dtype} images")
  if x.shape[1:] != tuple(im.input_shape) or x.ndim != len(im.input_shape) + 1:
    raise ValueError(f"input of shape (batch, {', '.join(map(str, im.input_shape))}) expected (what the model "
                     f"was trained on), got {x.shape}")
  try:
    finite = bool(jnp.isfinite(x).all())
  except jax.errors.ConcretizationTypeError:     # traced (jit, vmap): not checked
    finite = True
  if not finite:
    raise ValueError("the input holds NaN or infinite values")
  return x


def integer_logits(im: IntegerModel, variant: str, x) -> jax.Array:
  """The variant's logits computed on the integer path (see the module docstring), for
  ``x`` normalised as in training: ``(images / 255 - mean) / std`` with the run's mean and
  std (``export/manifest.json``); raw ``uint8`` images raise ``TypeError``, another input
  shape or NaN ``ValueError``.

  Example:
    >>> logits = integer_logits(im, "w4a4", (images / 255.0 - mean) / std)
  """
  x = _network_input(im, x)
  apply_fn, operands = integer_forward(im, variant)
  if not x.shape[0]:
    return jnp.zeros((0, im.num_classes), jnp.float32)
  return apply_fn(operands, x)


class LayerError(NamedTuple):
  """Integer against float output of one layer on the same input.

  ``bound_ratio`` is the largest ``|y_int - y_float| / bound`` over the outputs, with
  ``bound = (fan_in + 8) u sum_k |x_q,k| |w_q,k| + u (|y_int| + |y_float|)`` and
  ``u = 2^-24``: the float path's dot product of ``fan_in`` terms errs by at most
  ``gamma_fan_in sum |x_q||w_q|`` in any summation order, dequantizing each operand and
  the final rescale add a few ``u``, the int32 sum is exact, and the bias addition rounds
  each result once. So ``bound_ratio <= 1`` always holds.
  """
  max_abs_error: float
  bound_ratio: float
  fan_in: int


def _compare(errors: dict):
  def compare(module, x, kernel, arrays, float_forward):
    y_float = float_forward()
    y_int = _with_bias(module, integer_layer(module, x, kernel, arrays))
    act = kernel.activation
    x_q = quant.dequantize(quant.get_quantizer(act.quantizer, "activation").integer(x, act.bits, act.params))
    w_q = jnp.abs(arrays["w"].astype(jnp.float32)) * arrays["scale"]
    magnitude = _accumulate(module, jnp.abs(x_q), w_q, jnp.float32)
    bound = (kernel.fan_in + 8) * UNIT_ROUNDOFF * magnitude + UNIT_ROUNDOFF * (jnp.abs(y_int) + jnp.abs(y_float))
    diff = jnp.abs(y_int - y_float)
    ratio = jnp.where(bound > 0, diff / jnp.where(bound > 0, bound, 1.0), jnp.where(diff > 0, jnp.inf, 0.0))
    errors[path_name(module)] = (diff.max(), ratio.max())
    return y_float
  return compare


def layer_errors(im: IntegerModel, variant: str, x) -> dict[str, LayerError]:
  """Per integer layer, the integer path's output against the float (fake-quantized) one on the
  same input, along the float forward (one jitted program; see :class:`LayerError`).

  Example:
    >>> errors = layer_errors(im, "w4a4", images)
    >>> assert all(e.bound_ratio <= 1 for e in errors.values())
  """
  x = _network_input(im, x)
  if not x.shape[0]:
    raise ValueError("layer_errors needs at least one input")
  static, kernels = _prepare(im, variant)
  model, variables, plan = rebuild_lib.rebuild(im, variant)

  def run(variables, kernels, x):
    errors = {}
    with _intercepting(static, kernels, _compare(errors)):
      model.apply(variables, x, plan, train=False)
    return errors

  measured = jax.device_get(jax.jit(run)(variables, kernels, x))
  return {p: LayerError(float(measured[p][0]), float(measured[p][1]), static[p].fan_in) for p in static}
