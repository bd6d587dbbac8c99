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
  gathered there by one jitted call. Several processes: every process holds the
  whole dataset on the host and follows the same global epoch order; each reads
  only the rows of each global batch that its own devices hold
  (``make_array_from_callback``), so a multi-process run sees exactly the batches
  of a one-process run.
  """

  def __init__(self, dataset: Dataset, batch_sharding, replicated, *, seed: int, batch_size: int,
               eval_batch_size: int):
    self.dataset, self.seed, self.sharding = dataset, seed, batch_sharding
    self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
    self.processes = jax.process_count()
    self.num_train, self.num_test = len(dataset.train.labels), len(dataset.test.labels)
    self.sample = dataset.train.images[0]
    if self.processes == 1:
      self.train, self.test = to_device(dataset.train, replicated), to_device(dataset.test, replicated)
      take = lambda split, idx: (split.images[idx], split.labels[idx])
      self._gather = jax.jit(take, out_shardings=batch_sharding)
      # One dispatch per training step: the epoch-order slice happens inside the jit.
      self._gather_slice = jax.jit(
          lambda split, order, start: take(split, jax.lax.dynamic_slice_in_dim(order, start, batch_size)),
          out_shardings=batch_sharding)
    else:
      host = lambda split: (np.asarray(split.images, np.uint8), np.asarray(split.labels, np.int32))
      self.train, self.test = host(dataset.train), host(dataset.test)

  def steps_per_epoch(self) -> int:
    return self.num_train // self.batch_size

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
    permutation = epoch_permutation(self.seed, epoch, self.num_train)
    if self.processes == 1:
      for step in range(start_step, self.steps_per_epoch()):
        yield self._gather_slice(self.train, permutation, step * self.batch_size)
      return
    permutation = np.asarray(permutation)
    for step in range(start_step, self.steps_per_epoch()):
      rows = permutation[step * self.batch_size:(step + 1) * self.batch_size]
      yield tuple(self._global(a, rows) for a in self.train)

  def eval_batches(self):
    for start in range(0, self.num_test, self.eval_batch_size):
      positions = np.arange(start, start + self.eval_batch_size)
      mask = positions < self.num_test
      idx = np.where(mask, positions, 0)
      if self.processes == 1:
        images, labels = self._gather(self.test, jnp.asarray(idx))
        yield images, labels, jax.device_put(mask, self.sharding)
      else:
        images, labels = (self._global(a, idx) for a in self.test)
        yield images, labels, self._global(mask, np.arange(len(mask)))

  def _global(self, array: np.ndarray, rows: np.ndarray) -> jax.Array:
    """``array[rows]`` as a global array sharded over the batch axis; this process
    gathers only the rows its own devices hold."""
    return jax.make_array_from_callback((len(rows),) + array.shape[1:], self.sharding,
                                        lambda index: array[rows[index[0]]])


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
