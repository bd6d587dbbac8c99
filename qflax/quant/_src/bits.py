"""Bit-width validation and the arithmetic every quantizer shares.

Bit-widths are data: a quantizer accepts a Python int, a NumPy value or a traced
``int32`` array. Concrete values are checked eagerly and get a clear error; traced
values cannot be inspected, so code that builds them (precision plans in
``qflax.nn``) validates them where they are still concrete.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FULL_PRECISION = 32
MAX_BITS = 8
# Stand-in bit-width used inside the quantized branch when ``bits >= 32`` selects
# the identity, so the unused branch never divides by zero or overflows.
_SAFE_BITS = MAX_BITS


def _concrete(value):
  """Returns ``value`` as a NumPy array, or ``None`` when it is traced."""
  if isinstance(value, jax.core.Tracer):   # cheaper than raising and catching the conversion error
    return None
  try:
    return np.asarray(value)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


def check_bits(bits, name: str = "bits", *, min_bits: int = 1):
  """Validates concrete bit-widths and returns them as an ``int32`` array.

  Allowed values are ``min_bits..8`` and any value ``>= 32`` (full precision).
  Traced values pass through unchecked (see the module docstring).

  Raises:
    ValueError: if a concrete value is not an integer or not allowed, naming
      ``name`` and the allowed values.
  """
  concrete = _concrete(bits)
  if concrete is None:
    return jnp.asarray(bits, jnp.int32)
  if concrete.dtype == np.bool_ or not (
      np.issubdtype(concrete.dtype, np.integer)
      or (np.issubdtype(concrete.dtype, np.floating)
          and np.all(np.mod(concrete, 1) == 0))):
    raise ValueError(
        f"{name} must be an integer bit-width, got {bits!r} "
        f"(allowed: {min_bits}..{MAX_BITS}, or >= {FULL_PRECISION} for full precision)")
  bad = ((concrete < min_bits) | (concrete > MAX_BITS)) & (concrete < FULL_PRECISION)
  if np.any(bad):
    raise ValueError(
        f"{name}={concrete.tolist()} is not a supported bit-width "
        f"(allowed: {min_bits}..{MAX_BITS}, or >= {FULL_PRECISION} for full precision)")
  return jnp.asarray(concrete, jnp.int32)


def check_integer_bits(bits, name: str = "bits", *, min_bits: int = 1) -> int:
  """Validates a concrete bit-width for integer export (no full precision)."""
  concrete = _concrete(bits)
  if concrete is None or concrete.ndim != 0:
    raise ValueError(f"{name} must be a concrete scalar for integer export, got {bits!r}")
  check_bits(concrete, name, min_bits=min_bits)
  if int(concrete) >= FULL_PRECISION:
    raise ValueError(
        f"{name}={int(concrete)} is full precision and has no integer form "
        f"(allowed: {min_bits}..{MAX_BITS})")
  return int(concrete)


def is_full_precision(bits) -> jax.Array:
  """True where ``bits >= 32`` (the quantizer is the identity)."""
  return jnp.asarray(bits) >= FULL_PRECISION


def safe_bits(bits) -> jax.Array:
  """``bits`` with full precision replaced by a harmless finite bit-width."""
  bits = jnp.asarray(bits, jnp.int32)
  return jnp.where(bits >= FULL_PRECISION, _SAFE_BITS, bits)


def num_levels(bits) -> jax.Array:
  """``2**bits`` as float32, exact for every allowed bit-width."""
  return jnp.ldexp(jnp.float32(1.0), safe_bits(bits))


def select_full_precision(bits, x: jax.Array, quantized: jax.Array) -> jax.Array:
  """``x`` where ``bits >= 32``, else ``quantized``."""
  return jnp.where(is_full_precision(bits), x, quantized)
