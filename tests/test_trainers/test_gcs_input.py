import json
import os

import pytest

from trainers.configs import apply_overrides, load_config
from trainers.input_pipeline import PackedRecords, load_split, record_extents
from trainers.train import train


def _upload(client, local_dir, prefix):
  bucket = client.bucket("patchflow-test")
  for folder, _, names in os.walk(local_dir):
    for name in names:
      path = os.path.join(folder, name)
      bucket.blob(f"{prefix}/{os.path.relpath(path, local_dir)}").upload_from_filename(path)


def test_trainer_reads_shards_from_gs_and_matches_local(gcs_emulator, shard_dir, tmp_path):
  _upload(gcs_emulator, shard_dir, "datasets/small")
  remote = "gs://patchflow-test/datasets/small"
  local_data, remote_data = load_split(str(shard_dir), "val"), load_split(remote, "val")
  assert local_data.keys() == remote_data.keys()
  for key in local_data:
    assert (local_data[key] == remote_data[key]).all()
  config = apply_overrides(load_config("smoke"), {"train.steps": 3, "train.checkpoint_every": 3,
                                                   "train.log_every": 1, "model.width": 32, "model.depth": 1})
  a = train(str(shard_dir), str(tmp_path / "local"), config, log=lambda m: None)
  b = train(remote, str(tmp_path / "remote"), config, log=lambda m: None)
  assert a["params_sha256"] == b["params_sha256"]


def test_missing_remote_dataset_is_a_clear_error(gcs_emulator):
  from schemas.errors import ContractError
  with pytest.raises(ContractError, match="gs://patchflow-test/nothing/dataset_info.json: not found"):
    load_split("gs://patchflow-test/nothing", "train")


def test_remote_records_are_read_by_range_in_any_order(gcs_emulator, shard_dir):
  _upload(gcs_emulator, shard_dir, "datasets/ranged")
  local, remote = PackedRecords(str(shard_dir), "train"), PackedRecords("gs://patchflow-test/datasets/ranged", "train")
  order = [len(local) - 1, 0, 3, 3, 1]
  a, b = local.read(order), remote.read(order)
  for key in a:
    assert (a[key] == b[key]).all()
  local.close(), remote.close()


def test_a_remote_shard_replaced_while_in_use_is_an_error_not_other_bytes(gcs_emulator, shard_dir, monkeypatch):
  from google.cloud.storage import Blob
  _upload(gcs_emulator, shard_dir, "datasets/replaced")
  records = PackedRecords("gs://patchflow-test/datasets/replaced", "train")
  blob = gcs_emulator.bucket("patchflow-test").blob(records.paths[0][len("gs://patchflow-test/"):])
  pinned = gcs_emulator.bucket("patchflow-test").get_blob(blob.name).generation
  original = blob.download_as_bytes()
  asked = []
  download = Blob.download_as_bytes
  monkeypatch.setattr(Blob, "download_as_bytes", lambda self, *a, **kw: asked.append(self.generation) or
                      download(self, *a, **kw))
  records.read([0])
  # Rebuilt in place: same length, other bytes.
  blob.upload_from_string(original[:100] + bytes(b ^ 0xFF for b in original[100:200]) + original[200:])
  # Real GCS answers the pinned generation with 404 (FileNotFoundError); the emulator ignores generations
  # and serves the new bytes, which the record CRC then refuses. Either way: an error, never other data.
  with pytest.raises((FileNotFoundError, ValueError), match="replaced while in use|CRC mismatch"):
    records.read([0])
  assert asked and set(asked) == {pinned}  # every ranged GET asked for the version that was indexed
  records.close()


@pytest.mark.parametrize("tail, where", [(b"\x10\x00\x00", "byte 0"), (b"\x10" + b"\x00" * 11 + b"abcdxx", "byte 0")])
def test_truncated_tfrecord_names_the_file_and_byte(tmp_path, tail, where):
  path = tmp_path / "x.tfrecord"
  path.write_bytes(tail)
  with pytest.raises(ValueError, match=f"x.tfrecord: truncated TFRecord at {where}"):
    record_extents(str(path))
