"""Reads packed shards with tf.data into numpy, and serves the batch of step n as a pure function of
(seed, n, data), so a resumed run sees exactly the batches an uninterrupted one would."""

import numpy as np

import struct

from schemas import dataset_info as info_lib
from schemas import storage

MODEL_INPUTS = ("patches", "patch_yx", "segment_ids", "image_grid", "labels")


def load_split(shard_dir: str, split: str, info: dict | None = None, fields=MODEL_INPUTS + ("example_ids",)):
  """All packed sequences of one split as numpy arrays [N, ...], in shard then record order."""
  import tensorflow as tf
  info = info or info_lib.read_dataset_info(shard_dir)
  spec = info_lib.packed_spec(info)
  paths = info_lib.split_shard_paths(shard_dir, info, split)
  if storage.is_gcs(shard_dir):
    # Through google-cloud-storage (which honours STORAGE_EMULATOR_HOST), not TensorFlow's gs:// filesystem.
    records = [r for p in paths for r in iter_tfrecords(storage.read_bytes(p), p)]
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(records, tf.string)).batch(256).map(spec.tf_parse)
  else:
    dataset = tf.data.TFRecordDataset(paths).batch(256).map(spec.tf_parse)
  chunks = {name: [] for name in fields}
  for batch in dataset.as_numpy_iterator():
    for name in fields:
      chunks[name].append(batch[name])
  if not chunks[fields[0]]:
    raise ValueError(f"{shard_dir}: split {split!r} holds no sequences")
  return {name: np.concatenate(parts) for name, parts in chunks.items()}


def batch_indices(num_sequences: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of the batch at `step`: epochs are seeded permutations, batches wrap across epochs."""
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start + len(out), num_sequences)
    order = np.random.default_rng([seed, epoch]).permutation(num_sequences)
    out.extend(order[offset:offset + batch_size - len(out)])
  return np.asarray(out)


def iter_tfrecords(data: bytes, where: str):
  """Records of a TFRecord file's bytes: [u64 length][u32 crc][data][u32 crc] each (CRCs not re-checked;
  a truncated file is an error naming it)."""
  offset = 0
  while offset < len(data):
    if offset + 12 > len(data):
      raise ValueError(f"{where}: truncated TFRecord header at byte {offset}")
    (length,) = struct.unpack_from("<Q", data, offset)
    start, end = offset + 12, offset + 12 + length
    if end + 4 > len(data):
      raise ValueError(f"{where}: truncated TFRecord at byte {offset}")
    yield data[start:end]
    offset = end + 4
