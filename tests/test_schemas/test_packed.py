import numpy as np
import pytest
import tensorflow as tf

from schemas.dataset_info import REQUIRED_KEYS, validate_dataset_info
from schemas.errors import ContractError
from schemas.packed import FINGERPRINT, SCHEMA_VERSION, PackedSpec, check_fingerprint


def _random_example(spec, rng):
  ex = spec.empty()
  ex["patches"][:] = rng.integers(0, 256, ex["patches"].shape, dtype=np.uint8)
  ex["patch_yx"][:] = rng.integers(0, 5, ex["patch_yx"].shape)
  ex["segment_ids"][:] = np.sort(rng.integers(0, spec.max_images + 1, spec.seq_len))
  ex["image_grid"][:] = rng.integers(1, 5, ex["image_grid"].shape)
  ex["labels"][:] = rng.integers(-1, 5, spec.max_images)
  ex["example_ids"][:] = [f"id{i}".encode() for i in range(spec.max_images)]
  if spec.text_len:
    ex["text_tokens"][:] = rng.integers(0, 257, spec.text_len)
    ex["text_segment_ids"][:] = rng.integers(0, spec.max_images + 1, spec.text_len)
  return ex


@pytest.mark.parametrize("text_len", [0, 8])
def test_tf_example_round_trips_through_tensorflow(text_len):
  spec = PackedSpec(seq_len=12, patch_size=2, max_images=3, text_len=text_len)
  rng = np.random.default_rng(0)
  examples = [_random_example(spec, rng) for _ in range(3)]
  serialized = [spec.to_tf_example_bytes(e) for e in examples]
  parsed = spec.tf_parse(tf.constant(serialized))
  for name, (dtype, shape) in spec.fields().items():
    assert tuple(parsed[name].shape) == (3,) + shape
    for i, example in enumerate(examples):
      np.testing.assert_array_equal(parsed[name].numpy()[i], example[name])
  single = spec.tf_parse(tf.constant(serialized[0]))
  assert tuple(single["patches"].shape) == (12, 12)


def test_arrow_schema_and_tf_spec_come_from_one_definition():
  spec = PackedSpec(seq_len=16, patch_size=4, max_images=2, text_len=5)
  arrow = spec.arrow_schema()
  assert arrow.names == list(spec.fields()) == list(spec.tf_feature_spec())
  assert arrow.field("patches").type.list_size == 16
  assert arrow.field("patches").type.value_type.list_size == 48
  assert arrow.metadata[b"fingerprint"].decode() == FINGERPRINT
  assert "text_tokens" not in PackedSpec(16, 4, 2).fields()


def test_serialization_is_deterministic():
  spec = PackedSpec(seq_len=8, patch_size=2, max_images=2)
  a = _random_example(spec, np.random.default_rng(1))
  b = {k: v.copy() for k, v in reversed(list(a.items()))}
  assert spec.to_tf_example_bytes(a) == spec.to_tf_example_bytes(b)


def test_validate_names_field_with_wrong_shape_or_dtype():
  spec = PackedSpec(seq_len=8, patch_size=2, max_images=2)
  ex = spec.empty()
  ex["segment_ids"] = np.zeros(7, np.int32)
  with pytest.raises(ContractError, match="'segment_ids' has shape"):
    spec.validate(ex)
  ex = spec.empty()
  ex["labels"] = ex["labels"].astype(np.int64)
  with pytest.raises(ContractError, match="'labels' has dtype int64"):
    spec.validate(ex)


def test_unknown_fingerprint_is_refused():
  check_fingerprint(FINGERPRINT, "x")
  with pytest.raises(ContractError, match="fingerprint 'deadbeef' is unknown"):
    check_fingerprint("deadbeef", "shards/dataset_info.json")


def test_dataset_info_validation_names_missing_key():
  with pytest.raises(ContractError, match="missing key 'schema_version'"):
    validate_dataset_info({"fingerprint": FINGERPRINT})


def test_every_earlier_fingerprint_stays_known_with_its_version_and_fields():
  # Version 1 as built until the tubelet fields, and the spine's image-only table before the video `boxes`.
  assert (SCHEMA_VERSION, FINGERPRINT, check_fingerprint(FINGERPRINT, "x")) == (2, "53cf86b96b84bb2e", 2)
  assert check_fingerprint("5ff02cc3fb5c117d", "x") == check_fingerprint("5be2b049a8dcaaf9", "x") == 1
  v1, v2 = PackedSpec(8, 2, 2, video=True, version=1), PackedSpec(8, 2, 2, video=True)
  assert set(v2.fields()) - set(v1.fields()) == {"frame_t", "tube_labels", "tube_boxes", "tube_present"}
  # Image-only builds have the same fields in both versions, so their shards keep their bytes.
  assert PackedSpec(8, 2, 2, version=1).fields() == PackedSpec(8, 2, 2).fields()
  with pytest.raises(ContractError, match="unknown schema version 3"):
    PackedSpec(8, 2, 2, version=3)


def test_dataset_info_whose_version_and_fingerprint_disagree_is_refused():
  info = {key: 1 for key in REQUIRED_KEYS} | {"fingerprint": "5ff02cc3fb5c117d", "schema_version": 2, "splits": {}}
  with pytest.raises(ContractError, match="'schema_version' is 2, but fingerprint '5ff02cc3fb5c117d' is schema "
                                          "version 1"):
    validate_dataset_info(info)
  validate_dataset_info(info | {"schema_version": 1})
