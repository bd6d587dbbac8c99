"""The grain-based StreamingPipeline: determinism, resumption, process shares, early stops.

Shapes, sharding, index-level shares and padded evaluation are in test_pipeline.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from qflax import data


class _CountingRecords:
  """Random-access records that count which indices were read (thread-safe)."""

  def __init__(self, n, frames=0, fail_at=None):
    self.images, self.labels = data.synthetic_images(n, image_size=16, channels=3, num_frames=frames)
    self.reads, self.fail_at = [], fail_at
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    if i == self.fail_at:
      raise OSError(f"record {i} is unreadable")
    with self._lock:
      self.reads.append(int(i))
    return {"image": self.images[i], "label": self.labels[i]}


def _pipe(source, batch_size=4, train=True, **kwargs):
  kwargs = {"image_size": 8, "resize_size": 10, "seed": 3, "num_workers": 3, **kwargs}
  return data.StreamingPipeline(source, batch_size, train=train, **kwargs)


def _host(batches):
  return [tuple(np.asarray(a) for a in batch) for batch in batches]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for u, v in zip(x, y):
      np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("frames", [0, 3])
def test_resumed_epoch_is_the_tail_of_the_full_epoch_bitwise(frames):
  source = _CountingRecords(30, frames=frames)
  full = _host(_pipe(source, num_frames=2 if frames else 0).epoch(1))
  assert len(full) == 7
  for k in (1, 4, 7):
    _assert_same(_host(_pipe(source, num_frames=2 if frames else 0).epoch(1, start_step=k)), full[k:])
  # Neither the read threads nor the prefetch depth change a bit of the output.
  _assert_same(_host(_pipe(source, num_workers=0, prefetch=0, num_frames=2 if frames else 0).epoch(1)), full)
  other = _host(_pipe(source, num_frames=2 if frames else 0).epoch(2))
  assert not np.array_equal(other[0][0], full[0][0])   # another epoch, other examples and crops


def test_a_resumed_epoch_never_reads_the_skipped_records():
  source = _CountingRecords(30)
  pipe = _pipe(source)
  list(pipe.epoch(0, start_step=5))
  order = pipe.local_indices(0)
  assert sorted(source.reads) == sorted(order[5 * 4:7 * 4].tolist())   # not the 20 seen, nor the 2 left over
  source.reads.clear()
  list(pipe.epoch(0, start_step=pipe.steps_per_epoch()))                # a finished epoch reads nothing
  assert source.reads == []


def test_process_batches_are_disjoint_and_cover_the_epoch():
  sources = [_CountingRecords(22) for _ in range(2)]   # one per process: who read what
  train, test, train_reads = [], [], []
  for i, source in enumerate(sources):
    pipe = _pipe(source, process_index=i, process_count=2)
    train.append(_host(pipe.epoch(0)))
    train_reads.append(set(source.reads))
    labels = np.concatenate([b[1] for b in train[i]])
    np.testing.assert_array_equal(labels, source.labels[pipe.local_indices(0)[:10]])   # its share, in order
    test.append(_host(_pipe(source, batch_size=8, train=False, process_index=i, process_count=2).epoch(0)))
  assert len(train[0]) == len(train[1]) == 5 and len(test[0]) == len(test[1]) == 3
  assert len(train_reads[0]) == len(train_reads[1]) == 10 and not train_reads[0] & train_reads[1]
  order = _pipe(sources[0]).local_indices(0)   # the epoch's full order (one process)
  leftovers = {int(order[20]), int(order[21])}   # the last example of each share makes no full batch
  assert train_reads[0] | train_reads[1] | leftovers == set(range(22))
  seen = [np.concatenate([b[1][b[2]] for b in test[i]]) for i in range(2)]
  np.testing.assert_array_equal(seen[0], sources[0].labels[0::2])
  np.testing.assert_array_equal(seen[1], sources[0].labels[1::2])
  assert [int(b[2].sum()) for b in test[0]] == [int(b[2].sum()) for b in test[1]] == [4, 4, 3]
  test3 = _pipe(source, batch_size=6, train=False, process_index=0, process_count=2)
  last = _host(test3.epoch(0))[-1]   # 11 examples in batches of 3: the last holds 2 and one padded row
  np.testing.assert_array_equal(last[2], [True, True, False])
  assert last[1][2] == 0 and not last[0][2].any()


def _grain_threads():
  return [t for t in threading.enumerate() if t.name.startswith("grain")]


def test_a_consumer_that_stops_early_does_not_hang():
  source = _CountingRecords(40)
  pipe = _pipe(source, prefetch=2)
  full = _host(pipe.epoch(0))
  for batch in pipe.epoch(0):                 # stop after one batch
    _assert_same(_host([batch]), full[:1])
    break
  stream = pipe.epoch(0)
  next(stream)
  del stream                                  # dropped without closing: collected, threads stopped
  _assert_same(_host(pipe.epoch(0)), full)    # a new epoch starts and runs to the end
  deadline = time.monotonic() + 20
  while _grain_threads() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not _grain_threads()


def test_a_read_error_reaches_the_consumer():
  source = _CountingRecords(20, fail_at=7)
  with pytest.raises(OSError, match="record 7"):
    list(_pipe(source, train=False).epoch(0))


def test_the_grain_iterator_checkpoints_and_restores():
  source = _CountingRecords(24)
  pipe = _pipe(source)
  full = _host(pipe.epoch(0))
  iterator = iter(pipe.batches(0))
  next(iterator), next(iterator)
  state = iterator.get_state()
  iterator.close()
  restored = iter(pipe.batches(0))
  restored.set_state(state)
  _assert_same(_host(restored), full[2:])
  restored.close()
