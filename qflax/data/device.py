"""Small datasets on the device: per-epoch order, in-step augmentation, normalisation.

The split lives on the device(s) as ``uint8``; batches are gathered there in the
epoch order (:class:`qflax.data.DeviceBatches`) and the jitted train step augments
and normalises them. The permutation is a pure function of ``(seed, epoch)``, so a
resumed run sees the same batches.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qflax.data.sources import Augmentation, Split


class DeviceSplit(NamedTuple):
  images: jax.Array   # uint8, (N, H, W, C) or (N, T, H, W, C)
  labels: jax.Array   # int32, (N,)


def to_device(split: Split, sharding: jax.sharding.Sharding | None = None) -> DeviceSplit:
  """Copies a host split to the device(s) (replicated by ``sharding`` when given)."""
  put = (lambda a: jax.device_put(a, sharding)) if sharding is not None else jnp.asarray
  return DeviceSplit(put(np.asarray(split.images, np.uint8)), put(np.asarray(split.labels, np.int32)))


def epoch_permutation(seed: int, epoch, num_examples: int) -> jax.Array:
  """The example order of ``epoch``: ``permutation(fold_in(key(seed), epoch))``."""
  key = jax.random.fold_in(jax.random.key(seed), epoch)
  return jax.random.permutation(key, num_examples).astype(jnp.int32)


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """``(images / 255 - mean) / std`` in float32, per channel."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def augment(key: jax.Array, images: jax.Array, augmentation: Augmentation) -> jax.Array:
  """Pad-and-random-crop (zero padding) and optional horizontal flip, per example.

  Works on images ``(B, H, W, C)`` and clips ``(B, T, H, W, C)`` (one crop and
  flip per clip). The same key gives the same batch.
  """
  pad, flip = augmentation
  if not pad and not flip:
    return images
  height, width = images.shape[-3], images.shape[-2]
  keys = jax.random.split(key, images.shape[0])

  def one(k, image):
    k_crop, k_flip = jax.random.split(k)
    if pad:
      widths = [(0, 0)] * (image.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)]
      padded = jnp.pad(image, widths)
      dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
      starts = [0] * (image.ndim - 3) + [dy, dx, 0]
      image = jax.lax.dynamic_slice(padded, starts, image.shape[:-3] + (height, width, image.shape[-1]))
    if flip:
      image = jnp.where(jax.random.bernoulli(k_flip), jnp.flip(image, axis=-2), image)
    return image

  return jax.vmap(one)(keys, images)
