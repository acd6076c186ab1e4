"""The shard format: tf.train.Example encoding and decoding, TFRecord framing with its CRC32C, and the index
of a TFRecord file's records, without TensorFlow.

The shard builder, the trainer and the evaluators all read or write shards through this module. Importing
TensorFlow costs about 10 s per Beam worker process and is not needed to write: an Example is a small protobuf
and a TFRecord frame is a length, a CRC32C and the bytes. The encoder gives exactly the bytes of TensorFlow's
`SerializeToString(deterministic=True)` (a test holds it to that).
"""

import dataclasses
import functools
import hashlib
import os
import struct
from typing import BinaryIO, Iterator

import numpy as np

from schemas import storage

try:
  import google_crc32c  # C implementation; a dependency of google-cloud-storage.

  def crc32c(data) -> int:
    return google_crc32c.value(data)

  def crc32c_extend(crc: int, data) -> int:
    return google_crc32c.extend(crc, data)
except ImportError:  # pragma: no cover - Beam's fallback (crcmod, slower).
  from apache_beam.io.tfrecordio import _default_crc32c_fn as crc32c

  def crc32c_extend(crc: int, data) -> int:
    import crcmod.predefined
    fn = crcmod.predefined.mkPredefinedCrcFun("crc-32c")
    return fn(bytes(data), crc)

_MASK_DELTA = 0xA282EAD8
RECORD_HEADER_BYTES = 12  # u64 length, u32 masked CRC of the length; then the data and a u32 masked CRC of it


def mask_crc(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data) -> int:
  return mask_crc(crc32c(data))


# --------------------------------------------------------------------------------------------- tf.train.Example

_SMALL_VARINTS = [bytes((v,)) for v in range(128)]


@functools.lru_cache(maxsize=1 << 12)  # per-slot fields repeat a few values (-1 pads labels: ten bytes each)
def _varint(value: int) -> bytes:
  if 0 <= value < 128:
    return _SMALL_VARINTS[value]
  value &= (1 << 64) - 1
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _varints(values: np.ndarray) -> bytes:
  """Protobuf varints of int64 values (negative ones take ten bytes, as in two's complement)."""
  v = np.ascontiguousarray(values, dtype=np.int64).reshape(-1).view(np.uint64)
  if v.size == 0 or int(v.max()) < 0x80:
    return v.astype(np.uint8).tobytes()
  if v.size <= 64:  # a per-slot field (labels, grids): a loop beats ten rounds of numpy calls on a few values
    return b"".join(_varint(int(x)) for x in v)
  out = np.zeros((v.size, 10), np.uint8)
  lengths = np.ones(v.size, np.int64)
  rest = v.copy()
  for i in range(10):
    low = (rest & np.uint64(0x7F)).astype(np.uint8)
    rest = rest >> np.uint64(7)
    more = rest != 0
    out[:, i] = low | (more.astype(np.uint8) << 7)
    lengths += more
  return out[np.arange(10)[None, :] < lengths[:, None]].tobytes()


def _tag(number: int) -> bytes:
  """The key of a length-delimited field (wire type 2)."""
  return _SMALL_VARINTS[number << 3 | 2] if number < 16 else _varint(number << 3 | 2)


def _field(number: int, payload: bytes) -> bytes:
  return _tag(number) + _varint(len(payload)) + payload


class _Pieces:
  """A protobuf message under construction as a list of byte pieces and their total length, so big payloads
  (the patches) are referenced, not copied, until the one final join."""

  def __init__(self):
    self.pieces: list = []
    self.size = 0

  def add(self, piece) -> None:
    self.pieces.append(piece)
    self.size += len(piece)

  def add_field(self, number: int, message: "_Pieces") -> None:
    self.add(_tag(number) + _varint(message.size))
    self.pieces += message.pieces
    self.size += message.size


def example_pieces(features: dict[str, tuple[str, object]]) -> tuple[list, int]:
  """{name: ("bytes", [bytes, ...]) | ("chunks", [buffer, ...]) | ("int64", int array)} -> the pieces of a
  serialized tf.train.Example and its length. ("chunks", buffers) is one bytes value made of the buffers
  (each supporting len() and the buffer protocol). Map keys are sorted as TensorFlow's deterministic
  serialization sorts them, so the joined pieces are exactly TensorFlow's bytes."""
  features_message = _Pieces()
  for name in sorted(features, key=lambda n: n.encode("utf-8")):
    kind, value = features[name]
    values = _Pieces()
    if kind == "bytes":
      for v in value:
        values.add(_tag(1) + _varint(len(v)))
        values.add(v)
      number = 1  # Feature.bytes_list
    elif kind == "chunks":
      size = sum(len(c) for c in value)
      values.add(_tag(1) + _varint(size))
      for c in value:
        values.add(c)
      number = 1
    elif kind == "int64":
      packed = _varints(np.asarray(value))
      if packed:
        values.add(_field(1, packed))
      number = 3  # Feature.int64_list, packed
    else:
      raise ValueError(f"feature {name!r}: unknown kind {kind!r}")
    feature = _Pieces()
    feature.add_field(number, values)
    entry = _Pieces()
    entry.add(_field(1, name.encode("utf-8")))
    entry.add_field(2, feature)
    features_message.add_field(1, entry)
  example = _Pieces()
  example.add_field(1, features_message)
  return example.pieces, example.size


def encode_example(features: dict[str, tuple[str, object]]) -> bytes:
  """The serialized tf.train.Example of `example_pieces`, as one bytes object."""
  pieces, _ = example_pieces(features)
  return b"".join(pieces)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  result, shift = 0, 0
  while True:
    if pos >= len(data):
      raise ValueError("truncated varint")
    byte = data[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ValueError("varint too long")


def _iter_fields(data: bytes) -> Iterator[tuple[int, int, object]]:
  """(field number, wire type, value) of one protobuf message; value is bytes for wire type 2."""
  pos = 0
  while pos < len(data):
    key, pos = _read_varint(data, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(data, pos)
    elif wire == 2:
      size, pos = _read_varint(data, pos)
      if pos + size > len(data):
        raise ValueError("truncated field")
      value, pos = data[pos:pos + size], pos + size
    elif wire == 5:
      value, pos = data[pos:pos + 4], pos + 4
    elif wire == 1:
      value, pos = data[pos:pos + 8], pos + 8
    else:
      raise ValueError(f"unsupported wire type {wire}")
    yield number, wire, value


def _signed(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value


def decode_example(data: bytes) -> dict[str, tuple[str, object]]:
  """Serialized tf.train.Example -> {name: ("bytes", [bytes]) | ("int64", [int]) | ("float", [float])}."""
  out: dict[str, tuple[str, object]] = {}
  for number, _, features in _iter_fields(data):
    if number != 1:
      continue
    for entry_number, _, entry in _iter_fields(features):
      if entry_number != 1:
        continue
      name, feature = "", b""
      for n, _, v in _iter_fields(entry):
        if n == 1:
          name = v.decode("utf-8")
        elif n == 2:
          feature = v
      kind, values = "bytes", []
      for kind_number, _, lst in _iter_fields(feature):
        kind = {1: "bytes", 2: "float", 3: "int64"}.get(kind_number, "bytes")
        values = []
        for n, wire, v in _iter_fields(lst):
          if n != 1:
            continue
          if kind == "bytes":
            values.append(bytes(v))
          elif kind == "int64" and wire == 2:
            pos = 0
            while pos < len(v):
              x, pos = _read_varint(v, pos)
              values.append(_signed(x))
          elif kind == "int64":
            values.append(_signed(v))
          elif wire == 2:
            values.extend(struct.unpack(f"<{len(v) // 4}f", v))
          else:
            values.append(struct.unpack("<f", v)[0])
      out[name] = (kind, values)
  return out


# --------------------------------------------------------------------------------------------- TFRecord framing

def frame_record(data: bytes) -> bytes:
  """One TFRecord frame: uint64 length, masked CRC32C of the length, the data, masked CRC32C of the data."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def frame_pieces(data: bytes) -> tuple[bytes, bytes, bytes]:
  """`frame_record` as (header, data, footer), so a big record is written without one more copy."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)), data, struct.pack("<I", masked_crc32c(data)))


def record_pieces(pieces: list, size: int, small: int = 1 << 16) -> list:
  """`frame_pieces` of a record given as the pieces of its bytes (as `example_pieces` returns them; bytes or
  contiguous uint8 arrays) and their total size, without joining them: the CRC32C is extended piece by piece,
  and runs of pieces under `small` bytes are joined, so a writer makes few calls and big arrays are never
  copied."""
  length = struct.pack("<Q", size)
  out, run, crc = [length + struct.pack("<I", masked_crc32c(length))], [], 0
  for piece in pieces:
    crc = crc32c_extend(crc, piece)
    if len(piece) < small:
      run.append(piece)
      continue
    if run:
      out.append(b"".join(run))
      run = []
    out.append(piece)
  crc = mask_crc(crc)
  run.append(struct.pack("<I", crc))
  out.append(b"".join(run))
  return out


def read_records(stream: BinaryIO, where: str = "tfrecord") -> Iterator[bytes]:
  """The records of a TFRecord stream (uncompressed), checking both CRCs."""
  index = 0
  while True:
    header = stream.read(RECORD_HEADER_BYTES)
    if not header:
      return
    if len(header) < RECORD_HEADER_BYTES:
      raise ValueError(f"{where}: record {index}: truncated header")
    length, length_crc = struct.unpack("<QI", header)
    if masked_crc32c(header[:8]) != length_crc:
      raise ValueError(f"{where}: record {index}: length CRC mismatch")
    data = stream.read(length)
    footer = stream.read(4)
    if len(data) < length or len(footer) < 4:
      raise ValueError(f"{where}: record {index}: truncated data")
    if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
      raise ValueError(f"{where}: record {index}: data CRC mismatch")
    yield data
    index += 1


@dataclasses.dataclass(frozen=True)
class RecordIndex:
  """What a walk over a TFRecord file's framing finds: (offset of the data, length) of every record, the file's
  size, and `crc_digest`, the sha256 of the records' data CRCs (the 4 framed bytes after each record's data, in
  file order). The shard builder records the last two per shard in dataset_info.json, so a reader that walks
  the framing anyway can tell, at no extra cost, a shard of another build from the one described."""
  extents: list[tuple[int, int]]
  num_bytes: int
  crc_digest: str


def record_index(path: str, generation: int | None = None) -> RecordIndex:
  """Walks a TFRecord file's framing, checking each length's CRC. On gs:// the file streams through once (the
  reader fetches large chunks), locally only the 16 bytes between two records' data are read: one record's data
  CRC and the next one's header."""
  extents, crcs = [], hashlib.sha256()
  with storage.open_file(path, "rb", generation=generation) as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    offset, header = 0, f.read(RECORD_HEADER_BYTES)
    while offset < size:
      (length,) = struct.unpack_from("<Q", header) if len(header) == RECORD_HEADER_BYTES else (size,)
      if offset + RECORD_HEADER_BYTES + length + 4 > size:
        raise ValueError(f"{path}: truncated TFRecord at byte {offset}")
      if masked_crc32c(header[:8]) != struct.unpack_from("<I", header, 8)[0]:
        raise ValueError(f"{path}: corrupt TFRecord length at byte {offset} (CRC mismatch)")
      extents.append((offset + RECORD_HEADER_BYTES, length))
      offset += RECORD_HEADER_BYTES + length
      f.seek(offset)
      between = f.read(4 + RECORD_HEADER_BYTES)
      crcs.update(between[:4])
      offset, header = offset + 4, between[4:]
  return RecordIndex(extents, size, crcs.hexdigest())
