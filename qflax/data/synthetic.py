"""Deterministic synthetic images and clips with learnable class structure."""

from __future__ import annotations

import numpy as np


def _prototypes(num_classes, height, width, channels, rng):
  """Smooth class patterns: low-frequency random sinusoids, one set per class."""
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
  protos = np.zeros((num_classes, height, width, channels), np.float32)
  for c in range(num_classes):
    for ch in range(channels):
      for _ in range(3):
        fy, fx, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        protos[c, ..., ch] += np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
  return protos / 3.0


def synthetic_images(num_examples: int, *, image_size: int = 32, channels: int = 3, num_classes: int = 10,
                     num_frames: int = 0, noise: float = 0.6, seed: int = 0, split_seed: int = 0):
  """``(images uint8, labels int32)``; images ``(N, H, W, C)`` or clips ``(N, T, H, W, C)``.

  Each class has a fixed smooth pattern (from ``seed``); an example is its class
  pattern, randomly shifted, plus Gaussian noise (from ``split_seed``). Clips
  move the pattern by one pixel per frame, so the motion carries no extra class
  information but the frames differ. The same arguments give the same data.
  """
  protos = _prototypes(num_classes, image_size, image_size, channels, np.random.default_rng(seed))
  rng = np.random.default_rng((seed, split_seed, 1))
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  shifts = rng.integers(-2, 3, (num_examples, 2))
  frames = max(num_frames, 1)
  out = np.empty((num_examples, frames, image_size, image_size, channels), np.uint8)
  for i in range(num_examples):
    for t in range(frames):
      img = np.roll(protos[labels[i]], (shifts[i, 0] + t, shifts[i, 1]), axis=(0, 1))
      img = img + noise * rng.normal(size=img.shape)
      out[i, t] = np.clip(127.5 + 60.0 * img, 0, 255).astype(np.uint8)
  return (out if num_frames else out[:, 0]), labels
