"""Packed shards as a random-access source, and the batch of step n as a pure function of (seed, n, data), so a
resumed run sees exactly the batches an uninterrupted one would.

The trainer never loads a split: `PackedRecords` indexes every record's (shard, offset, length) by walking the
TFRecord length headers, then reads just the records a batch needs (schemas.storage.read_range: a seek locally,
a ranged GET through google-cloud-storage on gs://) and parses them with TensorFlow. `prefetched` reads
the next batches on a thread while the current step runs, so host memory holds a few batches, not the data.
"""

import concurrent.futures
import os
import struct

import numpy as np

from schemas import dataset_info as info_lib
from schemas import storage
from schemas.tfrecord_crc import masked_crc32c

MODEL_INPUTS = ("patches", "patch_yx", "segment_ids", "image_grid", "labels")
_HEADER = 12  # u64 length, u32 masked crc of the length; the record, then a u32 crc of the data


def record_extents(path: str, generation: int | None = None) -> list[tuple[int, int]]:
  """(offset of the data, length) of every record of one TFRecord file, from the length headers (whose CRCs
  are checked). On gs:// the file streams through once (the reader fetches large chunks), locally only the
  headers are read."""
  extents = []
  with storage.open_file(path, "rb", generation=generation) as f:
    size = f.seek(0, os.SEEK_END)
    offset = f.seek(0)
    while offset < size:
      header = f.read(_HEADER)
      (length,) = struct.unpack_from("<Q", header) if len(header) == _HEADER else (size,)
      if offset + _HEADER + length + 4 > size:
        raise ValueError(f"{path}: truncated TFRecord at byte {offset}")
      if masked_crc32c(header[:8]) != struct.unpack_from("<I", header, 8)[0]:
        raise ValueError(f"{path}: corrupt TFRecord length at byte {offset} (CRC mismatch)")
      extents.append((offset + _HEADER, length))
      offset = f.seek(offset + _HEADER + length + 4)
  return extents


class PackedRecords:
  """The packed sequences of one split, in shard then record order, read on demand."""

  def __init__(self, shard_dir: str, split: str, info: dict | None = None):
    info = info or info_lib.read_dataset_info(shard_dir)
    self.spec = info_lib.packed_spec(info)
    self.paths = info_lib.split_shard_paths(shard_dir, info, split)
    # gs:// objects are pinned to the version indexed, so a shard rebuilt in place mid-run is an error.
    self._generations = [storage.generation(path) for path in self.paths]
    index = [(shard, offset, length) for shard, path in enumerate(self.paths)
             for offset, length in record_extents(path, self._generations[shard])]
    if not index:
      raise ValueError(f"{shard_dir}: split {split!r} holds no sequences")
    self._index = np.asarray(index, np.int64)
    # google-cloud-storage's HTTP session keeps 10 connections; more threads would open and drop extras.
    self._pool = concurrent.futures.ThreadPoolExecutor(10) if storage.is_gcs(shard_dir) else None

  def __len__(self) -> int:
    return len(self._index)

  def _read_one(self, i: int) -> bytes:
    """Record i's data, its CRC checked (as tf.data does), so a flipped bit is an error, never a sample."""
    shard, offset, length = (int(v) for v in self._index[i])
    path = self.paths[shard]
    # The data and its CRC; a local file is opened per read (~10 us), so no descriptor is held per shard.
    frame = storage.read_range(path, offset, length + 4, self._generations[shard])
    data = frame[:length]
    if masked_crc32c(data) != struct.unpack_from("<I", frame, length)[0]:
      raise ValueError(f"{path}: corrupt TFRecord at byte {offset - _HEADER} (data CRC mismatch)")
    return data

  def read(self, indices, fields=MODEL_INPUTS) -> dict[str, np.ndarray]:
    """The records at `indices` (any order, repeats allowed) as numpy arrays [len(indices), ...]."""
    import tensorflow as tf
    indices = [int(i) for i in indices]
    serialized = list(self._pool.map(self._read_one, indices)) if self._pool else [self._read_one(i) for i in indices]
    parsed = self.spec.tf_parse(tf.constant(serialized, tf.string))
    return {name: parsed[name].numpy() for name in fields}

  def close(self):
    if self._pool:
      self._pool.shutdown()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def load_split(shard_dir: str, split: str, info: dict | None = None, fields=MODEL_INPUTS + ("example_ids",)):
  """All packed sequences of one split as numpy arrays [N, ...] (for evaluation splits, which are small)."""
  with PackedRecords(shard_dir, split, info) as records:
    chunks = [records.read(range(s, min(s + 256, len(records))), fields) for s in range(0, len(records), 256)]
  return {name: np.concatenate([c[name] for c in chunks]) for name in fields}


def prefetched(read_step, steps, depth: int = 2):
  """Yields (step, read_step(step)) for each step, reading up to `depth` steps ahead on a thread."""
  steps = list(steps)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = [pool.submit(read_step, s) for s in steps[:depth]]
    for n, step in enumerate(steps):
      batch = pending.pop(0).result()
      if n + depth < len(steps):
        pending.append(pool.submit(read_step, steps[n + depth]))
      yield step, batch


def batch_indices(num_sequences: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of the batch at `step`: epochs are seeded permutations, batches wrap across epochs."""
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start + len(out), num_sequences)
    order = np.random.default_rng([seed, epoch]).permutation(num_sequences)
    out.extend(order[offset:offset + batch_size - len(out)])
  return np.asarray(out)
