"""The packed-example contract (NaViT Patch n' Pack): one definition, from which the TF feature spec, the
pyarrow schema, the schema fingerprint and the tf.train.Example encoder/decoder are all derived."""

import dataclasses
import functools
import hashlib
import json
from typing import Any

import numpy as np

from schemas.errors import ContractError

SCHEMA_VERSION = 2

# name -> (dtype, symbolic shape). L = seq_len, P = patch_size**2 * 3, M = max_images, T = text_len.
# `bytes` fields hold one string per slot; `uint8` arrays are stored as one raw bytes value.
_FIELDS: dict[str, tuple[str, tuple[str | int, ...]]] = {
    "patches": ("uint8", ("L", "P")),
    "patch_yx": ("int32", ("L", 2)),
    "patch_t": ("int32", ("L",)),
    "segment_ids": ("int32", ("L",)),
    "image_grid": ("int32", ("M", 2)),
    "labels": ("int32", ("M",)),
    "example_ids": ("bytes", ("M",)),
    "boxes": ("bytes", ("M",)),
    "frame_t": ("bytes", ("M",)),
    "tube_labels": ("bytes", ("M",)),
    "tube_boxes": ("bytes", ("M",)),
    "tube_present": ("bytes", ("M",)),
    "text_tokens": ("int32", ("T",)),
    "text_segment_ids": ("int32", ("T",)),
}
# Video datasets: `patch_t` (the sampled frame of each patch) and, per slot, little-endian bytes: `boxes`
# (float32 [K, 4] ymin, xmin, ymax, xmax: the record's `boxes`, for a video one per frame), `frame_t` (int32 [F]:
# the source clip's frame index t of each of the slot's F sampled frames), `tube_labels` (int32 [A]: the class of
# each of its A tubelets), `tube_boxes` (float32 [A, F, 4]: each actor's box at each sampled frame, zeros where
# it has none) and `tube_present` (uint8 [A, F]: 1 where it has one). Empty bytes where a slot has none (an image
# has no frame_t; a record without tubelets has A = 0).
TUBELET_FIELDS = ("frame_t", "tube_labels", "tube_boxes", "tube_present")
_VIDEO_FIELDS = {"patch_t", "boxes", *TUBELET_FIELDS}
_TEXT_FIELDS = {"text_tokens", "text_segment_ids"}
# The schema version that added each field; the others are version 1's.
_ADDED_IN = {name: 2 for name in TUBELET_FIELDS}

EMPTY_SLOT_LABEL = -1  # `labels` of a slot without an example
NO_CLIP_LABEL = -2     # `labels` of a clip whose record has tubelets and no `label`: filled, but not classified


def _fields_of_version(version: int) -> dict[str, tuple[str, tuple[str | int, ...]]]:
  return {name: field for name, field in _FIELDS.items() if _ADDED_IN.get(name, 1) <= version}


def _fingerprint(version: int, fields: dict) -> str:
  return hashlib.sha256(json.dumps({"version": version, "fields": fields}, sort_keys=True).encode()
                        ).hexdigest()[:16]


FINGERPRINT = _fingerprint(SCHEMA_VERSION, _fields_of_version(SCHEMA_VERSION))
# fingerprint -> the schema version of its field table. Readers keep every version they knew: the spine's table
# had no `boxes` (its image-only shards have exactly version 1's layout), and version 1 had no tubelet fields.
_VERSIONS = {
    FINGERPRINT: SCHEMA_VERSION,
    _fingerprint(1, _fields_of_version(1)): 1,
    _fingerprint(1, {k: v for k, v in _fields_of_version(1).items() if k != "boxes"}): 1,
}
KNOWN_FINGERPRINTS = frozenset(_VERSIONS)


@dataclasses.dataclass(frozen=True)
class PackedSpec:
  """Fixed sizes of one packed dataset; every reader takes them from dataset_info.json."""
  seq_len: int
  patch_size: int
  max_images: int
  text_len: int = 0
  video: bool = False
  version: int = SCHEMA_VERSION  # shards of an earlier version have its fields (`schema_version`)

  def __post_init__(self):
    for name in ("seq_len", "patch_size", "max_images"):
      if getattr(self, name) < 1:
        raise ContractError(f"packed spec: field {name!r} must be >= 1, got {getattr(self, name)}")
    if self.version not in _VERSIONS.values():
      raise ContractError(f"packed spec: unknown schema version {self.version}")
    if self.text_len < 0:
      raise ContractError(f"packed spec: field 'text_len' must be >= 0, got {self.text_len}")

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * 3

  def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape), in the contract's order."""
    return dict(_field_shapes(self))

  def empty(self, patches: bool = True) -> dict[str, np.ndarray]:
    """A fully padded example: segment 0 everywhere, labels -1, empty ids; without `patches` if False (the
    shard writer renders those into a buffer of its own)."""
    out = {}
    for name, (dtype, shape) in self.fields().items():
      if name == "patches" and not patches:
        continue
      if dtype == "bytes":
        out[name] = np.array([b""] * shape[0], dtype=object)
      else:
        out[name] = np.full(shape, EMPTY_SLOT_LABEL if name == "labels" else 0, dtype=dtype)
    return out

  def tf_feature_spec(self) -> dict[str, Any]:
    import tensorflow as tf
    spec = {}
    for name, (dtype, shape) in self.fields().items():
      if dtype == "uint8":
        spec[name] = tf.io.FixedLenFeature([], tf.string)
      elif dtype == "bytes":
        spec[name] = tf.io.FixedLenFeature([shape[0]], tf.string)
      else:
        spec[name] = tf.io.FixedLenFeature([int(np.prod(shape))], tf.int64)
    return spec

  def tf_parse(self, serialized):
    """Parses a batch or a single serialized Example into tensors of the contract's shapes and dtypes."""
    import tensorflow as tf
    parsed = tf.io.parse_example(serialized, self.tf_feature_spec())
    batch = tf.shape(serialized)  # [] for one example, [B] for a batch.
    out = {}
    for name, (dtype, shape) in self.fields().items():
      value = parsed[name]
      if dtype == "uint8":
        value = tf.io.decode_raw(value, tf.uint8)
      elif dtype == "int32":
        value = tf.cast(value, tf.int32)
      out[name] = tf.reshape(value, tf.concat([batch, shape], axis=0))
    return out

  def arrow_schema(self):
    import pyarrow as pa
    types = {"uint8": pa.uint8(), "int32": pa.int32(), "bytes": pa.binary()}
    pa_fields = []
    for name, (dtype, shape) in self.fields().items():
      t = types[dtype]
      for size in reversed(shape):
        t = pa.list_(t, size)
      pa_fields.append(pa.field(name, t, nullable=False))
    return pa.schema(pa_fields, metadata={"schema_version": str(self.version),
                                          "fingerprint": _fingerprint(self.version, _fields_of_version(self.version))})

  def validate(self, example: dict[str, np.ndarray], where: str = "example") -> None:
    fields = self.fields()
    missing = sorted(set(fields) - set(example))
    if missing:
      raise ContractError(f"{where}: missing field {missing[0]!r}")
    for name, (dtype, shape) in fields.items():
      value = np.asarray(example[name])
      if value.shape != shape:
        raise ContractError(f"{where}: field {name!r} has shape {value.shape}, contract says {shape}")
      if dtype != "bytes" and value.dtype != np.dtype(dtype):
        raise ContractError(f"{where}: field {name!r} has dtype {value.dtype}, contract says {dtype}")

  def to_tf_example_bytes(self, example: dict[str, np.ndarray]) -> bytes:
    """Encodes one packed example; deterministic serialization, so equal inputs give equal bytes."""
    from tensorflow.core.example import example_pb2
    self.validate(example)
    proto = example_pb2.Example()
    for name, (dtype, _) in self.fields().items():
      feature = proto.features.feature[name]
      value = np.asarray(example[name])
      if dtype == "uint8":
        feature.bytes_list.value.append(value.tobytes())
      elif dtype == "bytes":
        feature.bytes_list.value.extend(bytes(v) for v in value)
      else:
        feature.int64_list.value.extend(value.reshape(-1).tolist())
    return proto.SerializeToString(deterministic=True)


def check_fingerprint(fingerprint: str, where: str) -> int:
  """The schema version of shards with this fingerprint; ContractError for a fingerprint this patchflow does
  not know."""
  if fingerprint not in KNOWN_FINGERPRINTS:
    raise ContractError(
        f"{where}: schema fingerprint {fingerprint!r} is unknown to this patchflow "
        f"(known: {sorted(KNOWN_FINGERPRINTS)}); rebuild the shards with this version")
  return _VERSIONS[fingerprint]


@functools.lru_cache(maxsize=64)
def _field_shapes(spec: PackedSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
  sizes = {"L": spec.seq_len, "P": spec.patch_dim, "M": spec.max_images, "T": spec.text_len}
  out = {}
  for name, (dtype, shape) in _fields_of_version(spec.version).items():
    if (name in _VIDEO_FIELDS and not spec.video) or (name in _TEXT_FIELDS and not spec.text_len):
      continue
    out[name] = (dtype, tuple(sizes[d] if isinstance(d, str) else d for d in shape))
  return out
