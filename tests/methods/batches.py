"""A small random batch shared by the method tests."""

import jax.numpy as jnp
import numpy as np


def tiny_batch(size: int = 16, channels: int = 1, num_classes: int = 4, image_size: int = 8):
  """``(x, y)``: normal images ``(size, image_size, image_size, channels)`` and integer labels."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(size, image_size, image_size, channels)), jnp.float32)
  y = jnp.asarray(rng.integers(0, num_classes, size), jnp.int32)
  return x, y
