"""Teacher selection for jointly trained bit-widths (AAO, Sun et al. 2021).

Bit-widths are indexed in descending order (index 0 is the highest). Every
function returns a traced teacher index, so choosing another teacher never
recompiles.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

STRATEGIES = ("fixed", "next", "adaptive")


class TeacherStats(NamedTuple):
  """Running averages kept in the train state for ``adaptive`` selection.

  ``accuracy[k]``: EMA of bit-width k's training accuracy. ``kl[t, b]``: EMA of
  ``KL(p_t || p_b)``.
  """
  accuracy: jax.Array
  kl: jax.Array


def init_teacher_stats(num_bits: int) -> TeacherStats:
  return TeacherStats(jnp.zeros((num_bits,), jnp.float32), jnp.zeros((num_bits, num_bits), jnp.float32))


def update_teacher_stats(stats: TeacherStats, accuracy: jax.Array, kl: jax.Array, momentum: float) -> TeacherStats:
  """``m * old + (1 - m) * new`` for both statistics."""
  return TeacherStats(momentum * stats.accuracy + (1 - momentum) * accuracy,
                      momentum * stats.kl + (1 - momentum) * kl)


def select_teacher(student: int, strategy: str, stats: TeacherStats | None = None, *, key=None,
                   sample: bool = False, temperature: float = 1.0) -> jax.Array:
  """The teacher index for ``student`` (a static index > 0).

  - ``fixed``: the highest bit-width (index 0).
  - ``next``: the next higher bit-width (``student - 1``), Any-Precision's recursive scheme.
  - ``adaptive``: among the higher bit-widths whose running accuracy is at least
    the student's, the one with the smallest running ``KL(p_t || p_student)``
    (the closest competent teacher); with ``sample=True`` one drawn with
    probability ``softmax(-KL / temperature)`` over those candidates. If no
    candidate qualifies, the highest bit-width.

  Example:
    >>> t = select_teacher(3, "adaptive", stats)       # traced int32
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"teacher strategy {strategy!r} is unknown; allowed: {STRATEGIES}")
  if student < 1:
    raise ValueError(f"student index must be >= 1 (index 0 is the highest bit-width), got {student}")
  if strategy == "fixed":
    return jnp.int32(0)
  if strategy == "next":
    return jnp.int32(student - 1)
  higher = jnp.arange(stats.accuracy.shape[0]) < student
  candidates = higher & (stats.accuracy >= stats.accuracy[student])
  any_candidate = jnp.any(candidates)
  kl = stats.kl[:, student]
  if sample:
    logits = jnp.where(candidates, -kl / temperature, -jnp.inf)
    choice = jax.random.categorical(key, jnp.where(any_candidate, logits, 0.0))
  else:
    choice = jnp.argmin(jnp.where(candidates, kl, jnp.inf))
  return jnp.where(any_candidate, choice, 0).astype(jnp.int32)
