"""Host streaming pipeline for ImageNet-size and video datasets.

Reads a random-access source (``tfds.data_source(...)[split]``, or any sequence
of ``{"image": uint8, "label": int}`` records; video records hold ``(T, H, W, C)``
clips) through grain (``grain.MapDataset``: deterministic, checkpointable, read by
threads), applies the standard transforms on the host, and prefetches sharded
global batches onto the devices. Each process reads only its share of every
epoch's order, which is a pure function of ``(seed, epoch)``.

Training: RandomResizedCrop (scale 0.08..1, ratio 3/4..4/3) to ``image_size``
and a horizontal flip; evaluation: resize the shorter side to ``resize_size``
and centre-crop ``image_size`` (Szegedy et al. 2015; the torchvision recipe).
"""

from __future__ import annotations

import functools
import math
from typing import Iterator, Sequence

import grain
import jax
import numpy as np
from PIL import Image


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of ``(..., H, W, C)`` uint8 frames."""
  lead = frames.shape[:-3]
  flat = frames.reshape((-1,) + frames.shape[-3:])
  out = []
  for f in flat:
    img = Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f)
    r = np.asarray(img.resize((width, height), Image.BILINEAR))
    out.append(r.reshape(height, width, f.shape[-1]))
  return np.stack(out).reshape(lead + (height, width, frames.shape[-1]))


def random_resized_crop(rng: np.random.Generator, frames: np.ndarray, size: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """One random crop (area fraction ``scale``, aspect ``ratio``) resized to ``size``."""
  height, width = frames.shape[-3], frames.shape[-2]
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
      return _resize(frames[..., top:top + h, left:left + w, :], size, size)
  side = min(height, width)   # fallback: central square
  top, left = (height - side) // 2, (width - side) // 2
  return _resize(frames[..., top:top + side, left:left + side, :], size, size)


def resize_center_crop(frames: np.ndarray, resize_size: int, size: int) -> np.ndarray:
  """Resize the shorter side to ``resize_size``, then centre-crop ``size`` x ``size``."""
  height, width = frames.shape[-3], frames.shape[-2]
  s = resize_size / min(height, width)
  h, w = max(size, round(height * s)), max(size, round(width * s))
  resized = _resize(frames, h, w)
  top, left = (h - size) // 2, (w - size) // 2
  return resized[..., top:top + size, left:left + size, :]


class StreamingPipeline:
  """Sharded, prefetched batches from a random-access source, read through grain.

  An epoch is a ``grain.MapDataset`` over this process's share of the epoch order
  (a pure function of ``(seed, epoch)``), sliced to the unseen batches before any record
  is read, mapped through the host transforms (per-example RNG seeded by
  ``(seed, epoch, index)``), then read by ``num_workers`` grain threads, batched (the
  last evaluation batch padded and masked) and prefetched ``prefetch`` batches ahead as
  sharded global arrays.

  Args:
    source: random-access records with ``"image"`` and ``"label"``.
    batch_size: global batch size (divisible by the process count).
    train: training transforms and shuffling, else evaluation transforms in order.
    sharding: where each global batch goes (e.g. ``NamedSharding(mesh, P('data'))``).
    process_index, process_count: this process's share (defaults from JAX).
    num_workers: grain read threads; prefetch: batches read and transferred ahead.

  Example:
    >>> pipe = StreamingPipeline(tfds.data_source("imagenet2012")["train"], 256, train=True,
    ...                          sharding=NamedSharding(mesh, P("data")))
    >>> for images, labels, mask in pipe.epoch(0): ...
  """

  def __init__(self, source: Sequence, batch_size: int, *, train: bool, sharding=None, image_size: int = 224,
               resize_size: int = 256, seed: int = 0, process_index: int | None = None,
               process_count: int | None = None, num_workers: int = 8, prefetch: int = 2,
               image_key: str = "image", num_frames: int = 0):
    self.source, self.train, self.sharding = source, train, sharding
    self.image_key, self.num_frames = image_key, num_frames
    self.image_size, self.resize_size, self.seed = image_size, resize_size, seed
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if batch_size % self.process_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by the {self.process_count} processes")
    self.batch_size, self.local_batch = batch_size, batch_size // self.process_count
    self.num_workers, self.prefetch = num_workers, prefetch

  def _order(self, epoch: int) -> np.ndarray:
    """Every example index of ``epoch`` in order: shuffled by ``(seed, epoch)`` for training."""
    n = len(self.source)
    return np.random.default_rng((self.seed, epoch)).permutation(n) if self.train else np.arange(n)

  def local_indices(self, epoch: int) -> np.ndarray:
    """This process's example indices for ``epoch``, in order."""
    return self._order(epoch)[self.process_index::self.process_count]

  def steps_per_epoch(self) -> int:
    n = len(self.source) // self.process_count
    return n // self.local_batch if self.train else -(-n // self.local_batch)

  def _clip(self, rng, frames):
    """``num_frames`` consecutive frames: a random start for training, the centre for
    evaluation; short videos repeat their last frame."""
    total = frames.shape[0]
    if total < self.num_frames:
      frames = np.concatenate([frames, np.repeat(frames[-1:], self.num_frames - total, axis=0)])
      total = self.num_frames
    start = rng.integers(0, total - self.num_frames + 1) if self.train else (total - self.num_frames) // 2
    return frames[start:start + self.num_frames]

  def example(self, index: int, epoch: int = 0):
    """Record ``index`` transformed as in ``epoch``: ``(frames uint8, label)``."""
    record = self.source[int(index)]
    frames = np.asarray(record[self.image_key], np.uint8)
    if frames.ndim == 2:
      frames = frames[..., None]
    rng = np.random.default_rng((self.seed, epoch, int(index)))
    if self.num_frames:
      frames = self._clip(rng, frames)
    if self.train:
      frames = random_resized_crop(rng, frames, self.image_size)
      if rng.random() < 0.5:
        frames = frames[..., ::-1, :]
    else:
      frames = resize_center_crop(frames, self.resize_size, self.image_size)
    return np.ascontiguousarray(frames), int(record["label"])

  def _element(self, index, epoch: int):
    """One batch element: ``(frames, label int32, mask True)``; padding gives mask False."""
    frames, label = self.example(index, epoch)
    return frames, np.int32(label), np.True_

  def examples(self, epoch: int, start_step: int = 0) -> grain.MapDataset:
    """This process's transformed examples of ``epoch`` from batch ``start_step`` on.

    The index dataset is sliced (process share, seen batches, the remainder that
    makes no full training batch) before the transform is mapped, so no skipped
    record is read."""
    share = grain.MapDataset.source(self._order(epoch))[self.process_index::self.process_count]
    share = share[start_step * self.local_batch:self.steps_per_epoch() * self.local_batch]
    return share.map(functools.partial(self._element, epoch=epoch))

  def _to_global(self, arrays):
    """This process's host batch as global arrays (``make_array_from_process_local_data``)."""
    if self.sharding is None:
      return tuple(jax.numpy.asarray(a) for a in arrays)
    return tuple(jax.make_array_from_process_local_data(self.sharding, a) for a in arrays)

  def batches(self, epoch: int, start_step: int = 0) -> grain.IterDataset:
    """:meth:`examples` read by ``num_workers`` grain threads, batched (padding the last
    evaluation batch), made global and prefetched ``prefetch`` batches ahead. Its
    iterator is checkpointable (``get_state``/``set_state``)."""
    read = grain.ReadOptions(num_threads=self.num_workers, prefetch_buffer_size=self.prefetch * self.local_batch)
    pad = functools.partial(grain.experimental.batch_and_pad, batch_size=self.local_batch)
    ds = self.examples(epoch, start_step).to_iter_dataset(read).batch(self.local_batch, batch_fn=pad)
    return grain.experimental.ThreadPrefetchIterDataset(ds.map(self._to_global), prefetch_buffer_size=self.prefetch)

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
    """Yields ``(images uint8, labels, mask)`` global batches from ``start_step`` on
    (a resumed run skips the batches it has seen without reading them), ``prefetch``
    ahead. A consumer that stops early closes the grain iterator and its threads."""
    iterator = iter(self.batches(epoch, start_step))
    try:
      yield from iterator
    finally:
      iterator.close()
