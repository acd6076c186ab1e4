import os

import numpy as np
import pytest

from schemas.dataset_info import read_dataset_info
from schemas.errors import ContractError
from schemas.shards import PackedRecords, load_split, tubelet_arrays
from schemas.tfrecord import record_index
from tests.gcs import upload_to_gcs


def test_records_read_in_any_order_equal_the_loaded_split(shard_dir):
  whole = load_split(str(shard_dir), "train")
  records = PackedRecords(str(shard_dir), "train")
  assert len(records) == len(whole["labels"])
  order = np.random.default_rng(0).permutation(len(records))[:7].tolist() + [0, 0]
  batch = records.read(order, fields=("patches", "segment_ids", "labels", "example_ids"))
  for key, value in batch.items():
    np.testing.assert_array_equal(value, whole[key][order])
  records.close()


def test_the_record_index_walks_every_shard_of_the_split(shard_dir):
  records = PackedRecords(str(shard_dir), "train")
  counts = [len(record_index(p).extents) for p in records.paths]
  assert len(counts) > 1 and sum(counts) == len(records)
  records.close()


def _copy_shards(shard_dir, tmp_path):
  import shutil
  target = tmp_path / "shards"
  shutil.copytree(shard_dir, target)
  return target


def test_a_flipped_bit_in_a_record_is_an_error_naming_file_and_byte(shard_dir, tmp_path):
  shards = _copy_shards(shard_dir, tmp_path)
  records = PackedRecords(str(shards), "train")
  first = records.paths[0]
  data_offset, length = record_index(first).extents[1]  # the second record of the first shard
  with open(first, "r+b") as f:
    f.seek(data_offset + length // 2)
    byte = f.read(1)
    f.seek(data_offset + length // 2)
    f.write(bytes([byte[0] ^ 0x01]))
  records.read([0])  # the first record is intact
  with pytest.raises(ValueError, match=rf"{first.split('/')[-1]}: corrupt TFRecord at byte {data_offset - 12} "
                                       r"\(data CRC mismatch\)"):
    records.read([1])


def test_a_corrupt_length_header_is_an_error_naming_file_and_byte(shard_dir, tmp_path):
  shards = _copy_shards(shard_dir, tmp_path)
  first = PackedRecords(str(shards), "train").paths[0]
  with open(first, "r+b") as f:
    f.seek(9)  # inside the masked CRC of the first record's length
    byte = f.read(1)
    f.seek(9)
    f.write(bytes([byte[0] ^ 0x01]))
  with pytest.raises(ValueError, match="corrupt TFRecord length at byte 0"):
    record_index(first)


def test_missing_remote_dataset_is_a_clear_error(gcs_emulator):
  with pytest.raises(ContractError, match="gs://patchflow-test/nothing/dataset_info.json: not found"):
    load_split("gs://patchflow-test/nothing", "train")


def test_remote_records_are_read_by_range_in_any_order(gcs_emulator, shard_dir):
  upload_to_gcs(gcs_emulator, shard_dir, "datasets/ranged")
  local, remote = PackedRecords(str(shard_dir), "train"), PackedRecords("gs://patchflow-test/datasets/ranged", "train")
  order = [len(local) - 1, 0, 3, 3, 1]
  a, b = local.read(order), remote.read(order)
  for key in a:
    assert (a[key] == b[key]).all()
  local.close(), remote.close()


def test_a_remote_shard_replaced_while_in_use_is_an_error_not_other_bytes(gcs_emulator, shard_dir, monkeypatch):
  from google.cloud.storage import Blob
  upload_to_gcs(gcs_emulator, shard_dir, "datasets/replaced")
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


V1_VIDEO_SHARDS = os.path.join(os.path.dirname(__file__), "fixtures", "v1_video_shards")


def test_video_shards_of_schema_version_1_stay_readable():
  """A directory written by the version-1 builder (commit 296d473): a two-frame clip with boxes and a still,
  4-pixel patches. It reads with version 1's fields; asking it for tubelets is a clear error."""
  info = read_dataset_info(V1_VIDEO_SHARDS)
  assert (info["schema_version"], info["fingerprint"]) == (1, "5ff02cc3fb5c117d")
  split = load_split(V1_VIDEO_SHARDS, "train")
  assert set(split) == {"patches", "patch_yx", "patch_t", "segment_ids", "image_grid", "labels", "example_ids",
                        "boxes"}
  slots = {rid.decode(): slot for slot, rid in enumerate(split["example_ids"][0]) if rid}
  clip, still = slots["clip"], slots["still"]
  assert split["labels"][0, clip] == 1 and split["labels"][0, still] == 0
  assert split["patch_t"][0][split["segment_ids"][0] == clip + 1].tolist() == [0] * 4 + [1] * 4
  np.testing.assert_array_equal(np.frombuffer(split["boxes"][0, clip], "<f4").reshape(-1, 4),
                                np.float32([[0.25, 0.125, 0.5, 0.75], [0.3, 0.2, 0.6, 0.8]]))
  with pytest.raises(ContractError, match="no field 'frame_t'; tubelets are in video shards of schema version 2 "
                                          r"on \(these are version 1, video True\)"):
    tubelet_arrays(split, info)


def _reframed(path, change):
  """The shard's records framed again, each record's data passed through `change` (which keeps its length):
  a file of the same size and valid CRCs, as another build with the same shapes writes."""
  from schemas.tfrecord import frame_record, read_records
  with open(path, "rb") as f:
    records = list(read_records(f))
  with open(path, "wb") as f:
    for record in records:
      f.write(frame_record(change(record)))


def _one_byte_changed(record):
  middle = len(record) // 2
  return record[:middle] + bytes([record[middle] ^ 0x01]) + record[middle + 1:]


def test_a_shard_of_another_build_with_the_same_size_and_valid_crcs_is_refused_by_every_reader(shard_dir, tmp_path):
  shards = _copy_shards(shard_dir, tmp_path)
  info = read_dataset_info(str(shards))
  first = next(s for s in info["shards"] if s["split"] == "train")
  size = os.path.getsize(shards / first["path"])
  _reframed(shards / first["path"], _one_byte_changed)
  assert os.path.getsize(shards / first["path"]) == size
  message = (rf"{first['path']}: not the shard that dataset_info.json describes \(its records' CRC digest "
             r"differs\): a shard of another build, or of a rebuild that did not finish; rebuild the directory")
  with pytest.raises(ContractError, match=message):
    PackedRecords(str(shards), "train")
  with pytest.raises(ContractError, match=message):
    load_split(str(shards), "train")
  load_split(str(shards), "val")  # the other splits' shards are whole


def test_a_shard_of_another_size_is_refused(shard_dir, tmp_path):
  shards = _copy_shards(shard_dir, tmp_path)
  info = read_dataset_info(str(shards))
  train = next(s for s in info["shards"] if s["split"] == "train")
  val = next(s for s in info["shards"] if s["split"] == "val")
  (shards / train["path"]).write_bytes((shards / val["path"]).read_bytes())
  size = os.path.getsize(shards / val["path"])
  with pytest.raises(ContractError, match=rf"{train['path']}: not the shard that dataset_info.json describes "
                                          rf"\({size} bytes, not {train['num_bytes']}\)"):
    load_split(str(shards), "train")


def test_a_listed_shard_that_is_missing_is_a_clear_error(shard_dir, tmp_path):
  shards = _copy_shards(shard_dir, tmp_path)
  listed = next(s for s in read_dataset_info(str(shards))["shards"] if s["split"] == "val")
  os.remove(shards / listed["path"])
  with pytest.raises(ContractError, match=rf"{listed['path']}: listed in dataset_info.json but missing"):
    load_split(str(shards), "val")


@pytest.mark.parametrize("path", ["../outside.tfrecord", "/etc/passwd", "train/../../x.tfrecord", "train/x.txt"])
def test_a_dataset_info_naming_a_path_outside_its_directory_is_refused(shard_dir, tmp_path, path):
  import json
  shards = _copy_shards(shard_dir, tmp_path)
  info = json.loads((shards / "dataset_info.json").read_text())
  next(s for s in info["shards"] if s["split"] == "val")["path"] = path
  (shards / "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(ContractError, match=r"dataset_info.json: shard path .* is not SPLIT/shard-SSSSS-of-NNNNN"):
    load_split(str(shards), "val")


def test_a_remote_shard_of_another_build_is_refused(gcs_emulator, shard_dir, tmp_path):
  shards = _copy_shards(shard_dir, tmp_path)
  first = next(s for s in read_dataset_info(str(shards))["shards"] if s["split"] == "train")
  _reframed(shards / first["path"], _one_byte_changed)
  remote = upload_to_gcs(gcs_emulator, shards, "datasets/mixed")
  with pytest.raises(ContractError, match=f"{first['path']}: not the shard that dataset_info.json describes"):
    PackedRecords(remote, "train")


V2_UNCHECKED_SHARDS = os.path.join(os.path.dirname(__file__), "fixtures", "v2_image_shards_unchecked")


@pytest.mark.parametrize("fixture", [V1_VIDEO_SHARDS, V2_UNCHECKED_SHARDS], ids=["v1 video", "v2 images"])
def test_shards_written_before_the_per_shard_check_are_read_as_before(fixture, tmp_path):
  """Builds from before dataset_info.json recorded each shard's num_bytes and crc_digest (v1 at 296d473, v2
  image shards at ce10e45: three images of 8x12, 4x4 and 12x8 pixels, 4-pixel patches) are read without the
  check at open; a shard rebuilt under them is still caught by the CRC of each record it reads."""
  info = read_dataset_info(fixture)
  assert all("num_bytes" not in s and "crc_digest" not in s for s in info["shards"])
  split = load_split(fixture, "train")
  assert sorted(r.decode() for r in split["example_ids"].reshape(-1) if r) == (
      ["clip", "still"] if fixture == V1_VIDEO_SHARDS else ["im0", "im1", "im2"])
  copy = tmp_path / "copy"
  import shutil
  shutil.copytree(fixture, copy)
  shard = copy / info["shards"][0]["path"]
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0x01
  shard.write_bytes(bytes(data))
  records = PackedRecords(str(copy), "train")  # no check at open for these
  with pytest.raises(ValueError, match="data CRC mismatch"):
    records.read([0])
