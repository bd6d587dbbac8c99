"""Straight-through estimators."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def straight_through(surrogate: jax.Array, value: jax.Array) -> jax.Array:
  """Returns ``value`` exactly, with the gradient of ``surrogate``.

  The usual ``x + stop_gradient(q - x)`` is not bit-exact in floating point
  (``x + (q - x) != q`` for some ``x``); this form is, so a fake-quantized tensor
  equals the dequantized integer codes exactly.

  Example:
    >>> y = straight_through(x, jnp.round(x))   # round with identity gradient
  """
  del surrogate
  return value


def _straight_through_fwd(surrogate, value):
  del surrogate
  return value, None


def _straight_through_bwd(_, g):
  return g, jnp.zeros_like(g)


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def round_ste(x: jax.Array) -> jax.Array:
  """``round(x)`` in the forward pass, identity gradient."""
  return straight_through(x, jnp.round(x))


def masked_identity(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``x`` in the forward pass; gradient ``mask`` (1 where kept, 0 elsewhere)."""
  return jnp.where(mask, x, jax.lax.stop_gradient(x))


def sum_to_shape(g: jax.Array, shape) -> jax.Array:
  """Sums a broadcast cotangent back to the shape of a parameter."""
  shape = tuple(shape)
  extra = g.ndim - len(shape)
  if extra:
    g = g.sum(axis=tuple(range(extra)))
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
  if axes:
    g = g.sum(axis=axes, keepdims=True)
  return g.reshape(shape)
