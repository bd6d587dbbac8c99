"""Dynamic block swapping masks (AAO, Sun et al. 2021).

A mask says, per block, whether the hybrid network runs that block at the
teacher's precision. Masks are drawn from the step's key: traced data, never a
recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_MODES = ("bernoulli", "prefix")
SCHEDULES = ("constant", "linear")


def swap_probability(p0: float, step, total_steps: int, schedule: str) -> jax.Array:
  """``p0`` (``constant``) or ``p0 (1 - step / total_steps)`` (``linear``, to 0 at the end)."""
  if schedule not in SCHEDULES:
    raise ValueError(f"swap schedule {schedule!r} is unknown; allowed: {SCHEDULES}")
  if schedule == "constant":
    return jnp.float32(p0)
  return jnp.float32(p0) * jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)


def swap_mask(key: jax.Array, num_blocks: int, probability, mode: str = "bernoulli") -> jax.Array:
  """A boolean ``(num_blocks,)`` mask.

  ``bernoulli``: each block independently with ``probability``. ``prefix``:
  blocks ``0..s-1`` with ``s ~ Binomial(num_blocks, probability)`` (the same
  expected number of swapped blocks, contiguous from the input side).
  """
  if mode not in MASK_MODES:
    raise ValueError(f"swap mask mode {mode!r} is unknown; allowed: {MASK_MODES}")
  draws = jax.random.bernoulli(key, probability, (num_blocks,))
  if mode == "bernoulli":
    return draws
  return jnp.arange(num_blocks) < jnp.sum(draws)
