"""Quantizers by name, with a uniform signature for layers and configs."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from qflax.quant._src import bits as bits_lib
from qflax.quant._src import dorefa, hwgq, lsq, pact, qil, sat, uniform
from qflax.quant._src.integer import IntegerTensor

Params = Mapping[str, jax.Array]


def _unit_step(x, bits, params):
  del x, bits, params
  return jnp.ones((), jnp.float32)


class Quantizer(NamedTuple):
  """A named quantizer with learnable scalar parameters (one set per bit-width slot).

  Attributes:
    name: registry name.
    role: ``"weight"`` or ``"activation"``.
    param_names: names of its learnable scalars (empty for parameter-free ones).
    defaults: initial values used before calibration (activations).
    apply: ``(x, bits, params) -> fake-quantized x``.
    integer: ``(x, bits, params) -> IntegerTensor`` (concrete bits).
    init: ``(x, bits) -> params`` estimated from a tensor (weights, or a
      calibration batch of activations).
    step: ``(x, bits, params) -> s``, the spacing of the output grid at (possibly
      traced) ``bits``: ``apply(x, bits, params) / s`` is an integer or a half-integer
      of magnitude at most 256 (the integer form's ``codes - zero_point``), so it is
      exact in bfloat16. ``s`` is a scalar or per output channel (``keepdims``
      along the last axis); it is 1 where ``bits >= 32`` (and for the identity).
  """
  name: str
  role: str
  param_names: tuple[str, ...]
  defaults: Mapping[str, float]
  apply: Callable[[jax.Array, Any, Params], jax.Array]
  integer: Callable[[jax.Array, int, Params], IntegerTensor]
  init: Callable[[jax.Array, Any], dict]
  step: Callable[[jax.Array, Any, Params], jax.Array] = _unit_step


def _grid_step(encode):
  """``step`` from a traced-bits integer form ``encode(x, bits, params) -> IntegerTensor``."""
  def step(x, bits, params):
    bits = jnp.asarray(bits, jnp.int32)
    scale = jnp.asarray(encode(x, bits_lib.safe_bits(bits), params).scale, jnp.float32)
    return jax.lax.stop_gradient(jnp.where(bits_lib.is_full_precision(bits), 1.0, scale))
  return step


def _free(name, role, apply, integer, encode):
  """A parameter-free quantizer; ``encode(x, bits)`` is its integer form at traced bits."""
  return Quantizer(name, role, (), {}, lambda x, b, p: apply(x, b),
                   lambda x, b, p: integer(x, b), lambda x, b: {}, _grid_step(lambda x, b, p: encode(x, b)))


def _identity(name, role):
  def integer(x, bits, params):
    raise ValueError(f"quantizer {name!r} ({role}) is full precision and has no integer form")
  return Quantizer(name, role, (), {}, lambda x, b, p: x, integer, lambda x, b: {})


def _lsq(name, role, signed, defaults):
  return Quantizer(
      name, role, ("step",), defaults,
      lambda x, b, p: lsq.lsq(x, p["step"], b, signed=signed),
      lambda x, b, p: lsq.lsq_integer(x, p["step"], b, signed=signed),
      lambda x, b: {"step": lsq.lsq_init_step(x, b, signed=signed)},
      _grid_step(lambda x, b, p: lsq._encode(x, jnp.asarray(p["step"], x.dtype), b, signed)))


def _qil(name, role, signed, init):
  def init_params(x, bits):
    centre, half_width = init(x, bits)
    return {"centre": centre, "half_width": half_width}
  return Quantizer(
      name, role, ("centre", "half_width"), {"centre": 1.0, "half_width": 1.0},
      lambda x, b, p: qil.qil(x, p["centre"], p["half_width"], b, signed=signed),
      lambda x, b, p: qil.qil_integer(x, p["centre"], p["half_width"], b, signed=signed),
      init_params,
      _grid_step(lambda x, b, p: qil._encode(x, jnp.asarray(p["centre"], x.dtype),
                                             jnp.asarray(p["half_width"], x.dtype), b, signed)))


def _channel_scale(x, bits):
  return uniform.calibrate_symmetric(x, bits, channel_axis=-1)


# "uniform_layer": one MSE-optimal scale per layer. An abs-max scale wastes the low
# bit-widths (at 2 bits only {-max, 0, max} occur and 90-98 % of a kernel rounds to 0).
# 32 candidate clips (ratios i/32 of max|w|) stay within ~1 % of a 256-point search's
# MSE on Gaussian and Laplace kernels (4 % for Student-t(3) at 2 bits) at half the cost
# of 64 (jitted value-and-grad of a 3x3x64x64 kernel on a 2-core CPU: ~2.5-3.5 ms against
# ~6.5 ms; abs-max 0.6 ms; 16 candidates lose up to 11 %).
UNIFORM_LAYER_CANDIDATES = 32


def _layer_mse_scale(x, bits):
  scale = uniform.calibrate_symmetric(x, bits, method="mse", num_candidates=UNIFORM_LAYER_CANDIDATES)
  return jax.lax.stop_gradient(scale)


def _tensor_scale(x, bits):
  return uniform.calibrate_symmetric(x, bits)


def _uniform(name, role, scale):
  """``uniform_symmetric`` with the scale ``scale(x, bits)`` computed from the tensor itself."""
  return _free(name, role,
               lambda x, b: uniform.uniform_symmetric(x, b, scale(x, b)),
               lambda x, b: uniform.uniform_symmetric_integer(x, b, scale(x, b)),
               lambda x, b: uniform._encode_symmetric(x, b, jnp.asarray(scale(x, b), x.dtype)))


def _pact(name, gradient):
  return Quantizer(
      name, "activation", ("alpha",), {"alpha": 8.0},
      lambda x, b, p: pact.pact(x, p["alpha"], b, gradient=gradient),
      lambda x, b, p: pact.pact_integer(x, p["alpha"], b),
      lambda x, b: {"alpha": pact.pact_init_alpha(x, b)},
      _grid_step(lambda x, b, p: pact._encode(x, jnp.asarray(p["alpha"], x.dtype), b)))


def _sat(name, centered, normalize_full_precision):
  return _free(name, "weight",
               lambda x, b: sat.sat_weight(x, b, centered=centered,
                                           normalize_full_precision=normalize_full_precision),
               lambda x, b: sat.sat_weight_integer(x, b, centered=centered),
               lambda x, b: sat._encode(x, b, centered, sat.default_fan_out(x.shape))[0])


_REGISTRY: dict[tuple[str, str], Quantizer] = {}
for _q in (
    _identity("none", "weight"),
    _free("dorefa", "weight", dorefa.dorefa_weight, dorefa.dorefa_weight_integer,
          lambda x, b: dorefa._encode_weight(x, b, False)),
    _free("dorefa_mean", "weight",
          lambda x, b: dorefa.dorefa_weight(x, b, scale_by_mean=True),
          lambda x, b: dorefa.dorefa_weight_integer(x, b, scale_by_mean=True),
          lambda x, b: dorefa._encode_weight(x, b, True)),
    _sat("sat", False, False),
    _sat("sat_centered", True, False),
    _sat("sat_fp_normalized", False, True),
    _sat("sat_centered_fp_normalized", True, True),
    _lsq("lsq", "weight", True, {"step": 0.01}),
    _qil("qil", "weight", True, qil.qil_init_weight),
    _qil("qil_absmax", "weight", True, lambda x, bits: qil.qil_init_weight(x)),   # the spec's c + d = max|w|
    _uniform("uniform", "weight", _channel_scale),
    _uniform("uniform_layer", "weight", _layer_mse_scale),
    _uniform("uniform_layer_absmax", "weight", _tensor_scale),
    _identity("none", "activation"),
    _free("clamp", "activation", dorefa.clamp_activation, dorefa.clamp_activation_integer, dorefa._encode_clamp),
    _pact("pact", "pact"),
    _pact("pact_adabits", "adabits"),
    _lsq("lsq", "activation", False, {"step": 0.1}),
    _lsq("lsq_signed", "activation", True, {"step": 0.1}),
    _qil("qil", "activation", False, lambda x, bits: qil.qil_init_activation(x)),
    _qil("qil_signed", "activation", True, qil.qil_init_weight),
    _free("hwgq", "activation", hwgq.hwgq, hwgq.hwgq_integer, lambda x, b: hwgq._encode(x, b, "paper")),
    _uniform("uniform", "activation", _tensor_scale),
    _free("uniform_unsigned", "activation", uniform.uniform_unsigned, uniform.uniform_unsigned_integer,
          lambda x, b: uniform._encode_unsigned(x, b, uniform._unsigned_clip(x, None))),
):
  _REGISTRY[(_q.role, _q.name)] = _q

ROLES = ("weight", "activation")


def quantizer_names(role: str) -> tuple[str, ...]:
  """Registered quantizer names for ``role`` (``"weight"`` or ``"activation"``)."""
  if role not in ROLES:
    raise ValueError(f"role={role!r} is unknown; allowed: {ROLES}")
  return tuple(name for (r, name) in _REGISTRY if r == role)


def get_quantizer(name: str, role: str) -> Quantizer:
  """Looks up a quantizer; unknown names get an error listing the allowed ones.

  Example:
    >>> q = get_quantizer("pact", "activation")
    >>> y = q.apply(x, 4, {"alpha": jnp.float32(6.0)})
  """
  allowed = quantizer_names(role)
  if name not in allowed:
    raise ValueError(f"{role} quantizer {name!r} is unknown; allowed: {allowed}")
  return _REGISTRY[(role, name)]
