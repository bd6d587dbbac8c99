"""Training and evaluation batches for a loop: in memory on the devices, or streamed.

Both kinds give the same interface: ``steps_per_epoch()``, ``train_epoch(epoch,
start_step)`` yielding ``(images uint8, labels)`` global batches sharded over the
batch axis, ``eval_batches()`` yielding ``(images, labels, mask)`` (the last batch
padded and masked), ``num_train`` and ``sample`` (one example, for shapes). The
epoch order is a function of ``(seed, epoch)``, so a resumed run sees the same
batches; augmentation and normalisation are left to the jitted step.

Example:
  >>> batches = DeviceBatches(load_dataset("fashion_mnist"), NamedSharding(mesh, P("data")),
  ...                         NamedSharding(mesh, P()), seed=0, batch_size=128, eval_batch_size=1000)
  >>> for images, labels in batches.train_epoch(0, 0): ...
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from qflax.data.device import epoch_permutation, to_device
from qflax.data.sources import Dataset, StreamSource
from qflax.data.streaming import StreamingPipeline


class DeviceBatches:
  """Batches of an in-memory dataset.

  One process: the splits live on the devices (``replicated``) and each batch is
  gathered there by one jitted call. Several processes: each gathers its share on
  the host and the global batch is assembled with
  ``make_array_from_process_local_data``.
  """

  def __init__(self, dataset: Dataset, batch_sharding, replicated, *, seed: int, batch_size: int,
               eval_batch_size: int):
    self.dataset, self.seed, self.sharding = dataset, seed, batch_sharding
    self.processes = jax.process_count()
    self.local_batch = batch_size // self.processes
    self.local_eval_batch = eval_batch_size // self.processes
    self.num_train, self.num_test = len(dataset.train.labels), len(dataset.test.labels)
    self.sample = dataset.train.images[0]
    if self.processes == 1:
      self.train, self.test = to_device(dataset.train, replicated), to_device(dataset.test, replicated)
      take = lambda split, idx: (split.images[idx], split.labels[idx])
      self._gather = jax.jit(take, out_shardings=batch_sharding)
      # One dispatch per training step: the epoch-order slice happens inside the jit.
      self._gather_slice = jax.jit(
          lambda split, order, start: take(split, jax.lax.dynamic_slice_in_dim(order, start, self.local_batch)),
          out_shardings=batch_sharding)

  def steps_per_epoch(self) -> int:
    return self.num_train // self.local_batch

  def fingerprint(self) -> str:
    """A digest of both splits (shapes, labels and pixels), to tell another dataset apart."""
    digest = hashlib.sha256()
    for split in (self.dataset.train, self.dataset.test):
      digest.update(repr((split.images.shape, split.labels.shape)).encode())
      digest.update(np.ascontiguousarray(split.labels).tobytes())
      digest.update(np.ascontiguousarray(split.images).tobytes())
    return digest.hexdigest()

  def train_epoch(self, epoch: int, start_step: int = 0):
    """Batches ``start_step..`` of ``epoch``."""
    if self.processes == 1:
      permutation = epoch_permutation(self.seed, epoch, self.num_train)
      for step in range(start_step, self.steps_per_epoch()):
        yield self._gather_slice(self.train, permutation, step * self.local_batch)
      return
    permutation = np.random.default_rng((self.seed, epoch, jax.process_index())).permutation(self.num_train)
    for step in range(start_step, self.steps_per_epoch()):
      idx = permutation[step * self.local_batch:(step + 1) * self.local_batch]
      yield self._global(self.dataset.train.images[idx], self.dataset.train.labels[idx])

  def eval_batches(self):
    for start in range(0, self.num_test, self.local_eval_batch):
      positions = np.arange(start, start + self.local_eval_batch)
      mask = positions < self.num_test
      idx = np.where(mask, positions, 0)
      if self.processes == 1:
        images, labels = self._gather(self.test, jnp.asarray(idx))
        yield images, labels, jax.device_put(mask, self.sharding)
      else:
        yield self._global(self.dataset.test.images[idx], self.dataset.test.labels[idx], mask)

  def _global(self, *arrays):
    return tuple(jax.make_array_from_process_local_data(self.sharding, a) for a in arrays)


class StreamedBatches:
  """Batches of a large dataset through :class:`StreamingPipeline` (host transforms,
  prefetch, per-process shares)."""

  def __init__(self, stream: StreamSource, batch_sharding, *, seed: int, batch_size: int, eval_batch_size: int,
               image_size: int, resize_size: int, num_frames: int, num_workers: int):
    common = dict(sharding=batch_sharding, image_size=image_size, resize_size=resize_size, seed=seed,
                  num_workers=num_workers, image_key=stream.image_key, num_frames=num_frames)
    self.train = StreamingPipeline(stream.train, batch_size, train=True, **common)
    self.test = StreamingPipeline(stream.test, eval_batch_size, train=False, **common)
    self.num_train = len(stream.train)
    self.sample = self.test.example(0)[0]

  def steps_per_epoch(self) -> int:
    return self.train.steps_per_epoch()

  def fingerprint(self) -> str:
    """A digest of the split sizes and the first examples' labels (the records are not read)."""
    labels = [int(self.train.source[i]["label"]) for i in range(min(16, self.num_train))]
    return hashlib.sha256(repr((self.num_train, len(self.test.source), labels)).encode()).hexdigest()

  def train_epoch(self, epoch: int, start_step: int = 0):
    for images, labels, _ in self.train.epoch(epoch, start_step):
      yield images, labels

  def eval_batches(self):
    yield from self.test.epoch(0)
