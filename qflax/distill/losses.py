"""Classification and distillation losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``mean_n -log softmax(z_n)[y_n]``: the task loss."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy: ``mean_n [argmax z_n = y_n]``."""
  return jnp.mean(jnp.argmax(logits, -1) == labels)


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


def hint_loss(features, targets) -> jax.Array:
  """``0.5 sum_i mean((sg(t_i) - f_i)^2)`` over paired feature maps.

  The hint (guidance) loss of Zhuang, Shen, Tan, Liu, Reid, "Towards Effective
  Low-bitwidth Convolutional Neural Networks", CVPR 2018; ``targets`` are under
  ``stop_gradient``, so each network is pulled toward the other and not back.

  Example:
    >>> r = hint_loss([h_low_3, h_low_4], [quantize(h_fp_3), quantize(h_fp_4)])
  """
  total = jnp.zeros((), jnp.float32)
  for f, t in zip(features, targets, strict=True):
    total += 0.5 * jnp.mean((jax.lax.stop_gradient(t) - f) ** 2)
  return total


def stage_outputs(features, count: int = 2) -> list:
  """The outputs of the last ``count`` stages among per-block ``features``.

  A stage is a run of blocks with one output shape (one resolution and width);
  its output is its last block's.
  """
  ends = [i for i in range(len(features)) if i + 1 == len(features) or features[i + 1].shape != features[i].shape]
  return [features[i] for i in ends[-count:]]


def attention_map(features: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``normalise_L2(vec(sum_c |A_c|^2))`` per example: ``(batch, H, W, C) -> (batch, H*W)``.

  Zagoruyko, Komodakis, "Paying More Attention to Attention", ICLR 2017.
  """
  a = jnp.sum(jnp.square(features), axis=-1).reshape(features.shape[0], -1)
  return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)


def attention_transfer_loss(features, targets) -> jax.Array:
  """``sum_k mean((AT(sg(t_k)) - AT(f_k))^2)`` over paired feature maps (targets constant)."""
  total = jnp.zeros((), jnp.float32)
  for f, t in zip(features, targets, strict=True):
    total += jnp.mean((attention_map(jax.lax.stop_gradient(t)) - attention_map(f)) ** 2)
  return total


def min_logit_ensemble(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """MinLogit ensemble of ``M`` models' logits ``(M, batch, classes)``.

  ``z_ens[c] = min_m (z_m[c] - z_m[y])``: every model's logits shifted so the
  true class scores 0, then the most pessimistic (smallest) score per class
  (Pham, Hoang, Do, "Collaborative Multi-Teacher Knowledge Distillation", WACV 2023).
  """
  true = jnp.take_along_axis(logits, labels[None, :, None], axis=-1)
  return jnp.min(logits - true, axis=0)
