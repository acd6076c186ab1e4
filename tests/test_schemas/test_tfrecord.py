import io

import numpy as np
import pytest
import tensorflow as tf

from schemas import tfrecord
from schemas.packed import TUBELET_FIELDS, PackedSpec


def _random_sequence(spec, rng):
  ex = spec.empty()
  ex["patches"][:] = rng.integers(0, 256, ex["patches"].shape)
  ex["patch_yx"][:] = rng.integers(0, 300, ex["patch_yx"].shape)  # > 127: multi-byte varints
  ex["segment_ids"][:] = np.sort(rng.integers(0, spec.max_images + 1, spec.seq_len))
  ex["image_grid"][:] = rng.integers(1, 40, ex["image_grid"].shape)
  ex["labels"][:] = rng.integers(-1, 1000, spec.max_images)  # -1: ten-byte varints
  ex["example_ids"][:] = [f"id{i}".encode() * i for i in range(spec.max_images)]  # includes b""
  if spec.text_len:
    ex["text_tokens"][:] = rng.integers(0, 257, spec.text_len)
    ex["text_segment_ids"][:] = rng.integers(0, spec.max_images + 1, spec.text_len)
  if spec.video:
    ex["patch_t"][:] = rng.integers(0, 8, spec.seq_len)
    ex["boxes"][:] = [np.float32(rng.uniform(0, 1, (i, 4))).tobytes() for i in range(spec.max_images)]
    for name in TUBELET_FIELDS:
      ex[name][:] = [rng.bytes(4 * i) for i in range(spec.max_images)]
  return ex


def _features(spec, ex):
  out = {}
  for name, (dtype, _) in spec.fields().items():
    if dtype == "uint8":
      out[name] = ("bytes", [ex[name].tobytes()])
    elif dtype == "bytes":
      out[name] = ("bytes", list(ex[name]))
    else:
      out[name] = ("int64", ex[name])
  return out


@pytest.mark.parametrize("spec", [PackedSpec(12, 2, 3), PackedSpec(12, 2, 3, text_len=8, video=True),
                                  PackedSpec(256, 16, 16)], ids=str)
def test_encoder_gives_tensorflows_deterministic_bytes(spec):
  rng = np.random.default_rng(0)
  for _ in range(3):
    ex = _random_sequence(spec, rng)
    ours = tfrecord.encode_example(_features(spec, ex))
    assert ours == spec.to_tf_example_bytes(ex)
    decoded = tfrecord.decode_example(ours)
    assert decoded["labels"] == ("int64", ex["labels"].tolist())
    assert decoded["example_ids"] == ("bytes", list(ex["example_ids"]))


def test_tfrecord_frames_are_read_by_tensorflow_and_by_us(tmp_path):
  records = [b"", b"abc", bytes(range(256)) * 1000]
  path = tmp_path / "x.tfrecord"
  with open(path, "wb") as f:
    for r in records:
      for piece in tfrecord.frame_pieces(r):
        f.write(piece)
  assert path.read_bytes() == b"".join(tfrecord.frame_record(r) for r in records)
  assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == records
  with open(path, "rb") as f:
    assert list(tfrecord.read_records(f)) == records


def test_reader_catches_corruption():
  data = bytearray(tfrecord.frame_record(b"hello world"))
  data[14] ^= 1
  with pytest.raises(ValueError, match="data CRC mismatch"):
    list(tfrecord.read_records(io.BytesIO(bytes(data))))
  with pytest.raises(ValueError, match="truncated"):
    list(tfrecord.read_records(io.BytesIO(tfrecord.frame_record(b"hello")[:-2])))


def test_decoder_reads_examples_written_by_tensorflow():
  example = tf.train.Example(features=tf.train.Features(feature={
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\x89PNG"])),
      "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3, -2])),
      "score": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5, 2.0])),
  }))
  decoded = tfrecord.decode_example(example.SerializeToString())
  assert decoded == {"image": ("bytes", [b"\x89PNG"]), "label": ("int64", [3, -2]), "score": ("float", [0.5, 2.0])}


@pytest.mark.parametrize("tail, where", [(b"\x10\x00\x00", "byte 0"), (b"\x10" + b"\x00" * 11 + b"abcdxx", "byte 0")])
def test_truncated_tfrecord_names_the_file_and_byte(tmp_path, tail, where):
  path = tmp_path / "x.tfrecord"
  path.write_bytes(tail)
  with pytest.raises(ValueError, match=f"x.tfrecord: truncated TFRecord at {where}"):
    tfrecord.record_index(str(path))


def test_the_record_index_gives_extents_size_and_the_digest_of_the_data_crcs(tmp_path):
  import hashlib
  import struct
  records = [b"", b"a", b"some bytes" * 1000, b"z" * 3]
  path = tmp_path / "x.tfrecord"
  path.write_bytes(b"".join(tfrecord.frame_record(r) for r in records))
  index = tfrecord.record_index(str(path))
  offsets = [12 + sum(16 + len(r) for r in records[:i]) for i in range(len(records))]
  assert index.extents == [(o, len(r)) for o, r in zip(offsets, records)]
  assert index.num_bytes == path.stat().st_size
  footers = b"".join(struct.pack("<I", tfrecord.masked_crc32c(r)) for r in records)
  assert index.crc_digest == hashlib.sha256(footers).hexdigest()
  other = tmp_path / "y.tfrecord"  # the same size and framing, other data
  other.write_bytes(b"".join(tfrecord.frame_record(r.upper()) for r in records))
  assert tfrecord.record_index(str(other)).num_bytes == index.num_bytes
  assert tfrecord.record_index(str(other)).crc_digest != index.crc_digest
  empty = tmp_path / "empty.tfrecord"
  empty.write_bytes(b"")
  assert tfrecord.record_index(str(empty)) == tfrecord.RecordIndex([], 0, hashlib.sha256().hexdigest())
