"""On-device batching and augmentation; the host streaming pipeline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from qflax import data


def _images(n=16, size=8, channels=3, frames=0):
  shape = (n, frames, size, size, channels) if frames else (n, size, size, channels)
  return jnp.asarray(np.random.default_rng(0).integers(1, 256, shape), jnp.uint8)


def _windows(image, pad):
  padded = np.pad(np.asarray(image), [(0, 0)] * (image.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)])
  h, w = image.shape[-3], image.shape[-2]
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      yield padded[..., dy:dy + h, dx:dx + w, :]


@pytest.mark.parametrize("frames", [0, 3])
def test_crops_stay_in_bounds_and_flip_only_when_enabled(frames):
  images = _images(frames=frames)
  key = jax.random.key(3)
  cropped = data.augment(key, images, data.Augmentation(pad=2, flip=False))
  for out, img in zip(np.asarray(cropped), np.asarray(images)):
    assert any(np.array_equal(out, w) for w in _windows(img, 2))
  flipped = np.asarray(data.augment(key, images, data.Augmentation(pad=0, flip=True)))
  n_flipped = 0
  for out, img in zip(flipped, np.asarray(images)):
    same, mirrored = np.array_equal(out, img), np.array_equal(out, img[..., ::-1, :])
    assert same or mirrored
    n_flipped += mirrored and not same
  assert 0 < n_flipped < len(images)
  both = np.asarray(data.augment(key, images, data.Augmentation(pad=2, flip=True)))
  for out, img in zip(both, np.asarray(images)):
    assert any(np.array_equal(out, w) or np.array_equal(out, w[..., ::-1, :]) for w in _windows(img, 2))
  np.testing.assert_array_equal(data.augment(key, images, data.Augmentation(0, False)), images)


def test_same_key_same_batch():
  images = _images()
  aug = data.Augmentation(4, True)
  a = data.augment(jax.random.key(1), images, aug)
  np.testing.assert_array_equal(a, data.augment(jax.random.key(1), images, aug))
  assert not np.array_equal(a, data.augment(jax.random.key(2), images, aug))


def test_epoch_order_is_a_function_of_seed_and_epoch():
  a = data.epoch_permutation(0, 3, 100)
  np.testing.assert_array_equal(a, data.epoch_permutation(0, 3, 100))
  assert sorted(np.asarray(a).tolist()) == list(range(100))
  assert not np.array_equal(a, data.epoch_permutation(0, 4, 100))
  assert not np.array_equal(a, data.epoch_permutation(1, 3, 100))


def _dataset(n):
  split = data.Split(np.asarray(_images(n)), np.arange(n, dtype=np.int32))
  return data.Dataset("cifar10", "test", split, split, data.KNOWN["cifar10"])


def test_device_batches_follow_the_epoch_order_on_one_and_eight_devices():
  outs = []
  for devices in (1, 8):
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:devices])
    batches = data.DeviceBatches(_dataset(64), NamedSharding(mesh, P("data")), NamedSharding(mesh, P()), seed=0,
                                 batch_size=16, eval_batch_size=16)
    assert batches.steps_per_epoch() == 4
    images, labels = list(batches.train_epoch(0, 1))[0]          # resumed at step 1
    assert len(images.sharding.device_set) == devices
    outs.append((np.asarray(images), np.asarray(labels)))
  perm = np.asarray(data.epoch_permutation(0, 0, 64))
  np.testing.assert_array_equal(outs[0][1], perm[16:32])
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_eval_batches_cover_every_example_once():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  batches = data.DeviceBatches(_dataset(10), NamedSharding(mesh, P("data")), NamedSharding(mesh, P()), seed=0,
                               batch_size=4, eval_batch_size=4)
  seen = []
  for _, labels, mask in batches.eval_batches():
    seen += np.asarray(labels)[np.asarray(mask)].tolist()
  assert seen == list(range(10))


class _Records:
  def __init__(self, n, frames=0):
    imgs, labels = data.synthetic_images(n, image_size=40, channels=3, num_frames=frames)
    self.images, self.labels = imgs, labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def test_streaming_pipeline_shapes_shares_and_sharding():
  source = _Records(50)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  pipe = data.StreamingPipeline(source, 16, train=True, sharding=NamedSharding(mesh, P("data")),
                                image_size=24, seed=1)
  batches = list(pipe.epoch(0))
  assert len(batches) == 50 // 16
  images, labels, mask = batches[0]
  assert images.shape == (16, 24, 24, 3) and images.dtype == jnp.uint8 and bool(mask.all())
  assert len(images.sharding.device_set) == 8
  again = list(pipe.epoch(0))
  np.testing.assert_array_equal(again[0][0], images)   # same (seed, epoch), same batches
  shares = [set(data.StreamingPipeline(source, 16, train=True, process_index=i, process_count=2, seed=1)
                .local_indices(0).tolist()) for i in range(2)]
  assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 50


def test_streaming_evaluation_is_ordered_and_padded():
  source = _Records(10, frames=2)
  pipe = data.StreamingPipeline(source, 4, train=False, image_size=24, resize_size=28)
  batches = list(pipe.epoch(0))
  labels = np.concatenate([np.asarray(b[1])[np.asarray(b[2])] for b in batches])
  np.testing.assert_array_equal(labels, source.labels)
  assert batches[0][0].shape == (4, 2, 24, 24, 3)
  with pytest.raises(ValueError, match="divisible"):
    data.StreamingPipeline(source, 5, train=True, process_count=2, process_index=0)


def test_transforms():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
  assert data.random_resized_crop(rng, img, 32).shape == (32, 32, 3)
  center = data.resize_center_crop(img, 64, 48)
  assert center.shape == (48, 48, 3)
