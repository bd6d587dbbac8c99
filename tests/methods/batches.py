"""A small random batch and a method builder shared by the method tests."""

import jax.numpy as jnp
import numpy as np


def tiny_batch(size: int = 16, channels: int = 1, num_classes: int = 4, image_size: int = 8):
  """``(x, y)``: normal images ``(size, image_size, image_size, channels)`` and integer labels."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(size, image_size, image_size, channels)), jnp.float32)
  y = jnp.asarray(rng.integers(0, num_classes, size), jnp.int32)
  return x, y


def build(config, input_shape=(8, 8, 1), num_classes: int = 4, steps_per_epoch: int = 3):
  """The config's method, validated (all but the runs it starts from) and built for a
  small task (no data needed)."""
  from qflax import methods, train
  train.load(config)
  return methods.create(config, methods.Task(num_classes, tuple(input_shape), steps_per_epoch))
