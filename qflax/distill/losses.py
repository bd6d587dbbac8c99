"""Distillation losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kd_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """``T^2 KL(sg(softmax(z_t / T)) || softmax(z_s / T))``, averaged over the batch.

  Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015.
  The teacher side is under ``stop_gradient``; the ``T^2`` factor keeps gradient
  magnitudes comparable across temperatures.

  Example:
    >>> loss = kd_kl(z_student, z_teacher, temperature=4.0)
  """
  t = jnp.asarray(temperature, jnp.float32)
  teacher = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits / t))
  student = jax.nn.log_softmax(student_logits / t)
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return t * t * jnp.mean(kl)


def pairwise_kl(log_probs: jax.Array) -> jax.Array:
  """``KL(p_i || p_j)`` for every pair of ``K`` predictions, averaged over the batch.

  ``log_probs`` is ``(K, batch, classes)``; returns ``(K, K)`` with entry
  ``[i, j] = mean_n KL(p_i || p_j)``.
  """
  p = jnp.exp(log_probs)
  cross = jnp.einsum("inc,jnc->ijn", p, log_probs)          # sum_c p_i log p_j
  entropy = jnp.sum(p * log_probs, axis=-1)                  # sum_c p_i log p_i
  return jnp.mean(entropy[:, None, :] - cross, axis=-1)
