"""A shard directory's packed sequences as a random-access source (the trainer's batches, the evaluators' splits).

`PackedRecords` indexes every record's (shard, offset, length) by walking the TFRecord framing
(`tfrecord.record_index`), checking on the way that each shard is the one dataset_info.json describes (its size
and the digest of its records' CRCs), then reads just the records asked for (storage.read_range: a seek
locally, a ranged GET through google-cloud-storage on gs://) and parses them with TensorFlow, so host memory
holds a batch, not the data. `load_split` reads a whole (small) split; `tubelet_arrays` turns a batch's
per-slot tubelet bytes into padded arrays.
"""

import concurrent.futures
import struct

import numpy as np

from schemas import dataset_info as info_lib
from schemas import storage
from schemas.errors import ContractError
from schemas.packed import TUBELET_FIELDS
from schemas.tfrecord import RECORD_HEADER_BYTES, masked_crc32c, record_index


class PackedRecords:
  """The packed sequences of one split, in shard then record order, read on demand."""

  def __init__(self, shard_dir: str, split: str, info: dict | None = None):
    info = info or info_lib.read_dataset_info(shard_dir)
    self.spec = info_lib.packed_spec(info)
    shards = info_lib.split_shards(shard_dir, info, split)
    self.paths = [path for path, _ in shards]
    self._generations, index = [], []
    for shard, (path, entry) in enumerate(shards):
      try:
        # gs:// objects are pinned to the version indexed, so a shard rebuilt in place mid-run is an error.
        self._generations.append(storage.generation(path))
        found = record_index(path, self._generations[-1])
      except FileNotFoundError:
        raise ContractError(f"{path}: listed in dataset_info.json but missing") from None
      info_lib.check_shard(entry, found, path)
      index.extend((shard, offset, length) for offset, length in found.extents)
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
      raise ValueError(f"{path}: corrupt TFRecord at byte {offset - RECORD_HEADER_BYTES} (data CRC mismatch)")
    return data

  def read(self, indices, fields=None) -> dict[str, np.ndarray]:
    """The records at `indices` (any order, repeats allowed) as numpy arrays [len(indices), ...] of `fields`
    (default: every field of the contract)."""
    import tensorflow as tf
    indices = [int(i) for i in indices]
    serialized = list(self._pool.map(self._read_one, indices)) if self._pool else [self._read_one(i) for i in indices]
    parsed = self.spec.tf_parse(tf.constant(serialized, tf.string))
    return {name: parsed[name].numpy() for name in (parsed if fields is None else fields)}

  def close(self):
    if self._pool:
      self._pool.shutdown()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def load_split(shard_dir: str, split: str, info: dict | None = None, fields=None) -> dict[str, np.ndarray]:
  """All packed sequences of one split as numpy arrays [N, ...] (for evaluation splits, which are small)."""
  with PackedRecords(shard_dir, split, info) as records:
    chunks = [records.read(range(s, min(s + 256, len(records))), fields) for s in range(0, len(records), 256)]
  return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def tubelet_arrays(batch: dict[str, np.ndarray], info: dict) -> dict[str, np.ndarray]:
  """A batch's per-slot tubelet bytes (fields of `PackedRecords.read` or `load_split`, [B, M] each) as arrays
  padded to A = `max_actors` actors and F = `max_frames` frames of dataset_info:

    frame_t       int32 [B, M, F]           the source clip's frame index t of each packed frame; -1 past the
                                            slot's frames (and for an image or an empty slot)
    tube_labels   int32 [B, M, A]           each actor's class; -1 past the slot's actors
    tube_boxes    float32 [B, M, A, F, 4]   each actor's ymin, xmin, ymax, xmax at each frame; 0 where absent
    tube_present  bool [B, M, A, F]         where the actor has a box
  """
  missing = [name for name in TUBELET_FIELDS if name not in batch]
  if missing:
    raise ContractError(f"batch: no field {missing[0]!r}; tubelets are in video shards of schema version 2 on "
                        f"(these are version {info['schema_version']}, video {info.get('video', False)})")
  batch_size, slots = batch["tube_labels"].shape
  frames, actors = info["max_frames"], info["max_actors"]
  out = {"frame_t": np.full((batch_size, slots, frames), -1, np.int32),
         "tube_labels": np.full((batch_size, slots, actors), -1, np.int32),
         "tube_boxes": np.zeros((batch_size, slots, actors, frames, 4), np.float32),
         "tube_present": np.zeros((batch_size, slots, actors, frames), bool)}
  for b, m in np.ndindex(batch_size, slots):
    frame_t = np.frombuffer(batch["frame_t"][b, m], "<i4")
    labels = np.frombuffer(batch["tube_labels"][b, m], "<i4")
    f, a = len(frame_t), len(labels)
    out["frame_t"][b, m, :f] = frame_t
    out["tube_labels"][b, m, :a] = labels
    out["tube_boxes"][b, m, :a, :f] = np.frombuffer(batch["tube_boxes"][b, m], "<f4").reshape(a, f, 4)
    out["tube_present"][b, m, :a, :f] = np.frombuffer(batch["tube_present"][b, m], np.uint8).reshape(a, f)
  return out
