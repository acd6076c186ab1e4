import numpy as np

from trainers.input_pipeline import PackedRecords, batch_indices, load_split, prefetched, record_extents


def test_records_read_in_any_order_equal_the_loaded_split(shard_dir):
  whole = load_split(str(shard_dir), "train")
  records = PackedRecords(str(shard_dir), "train")
  assert len(records) == len(whole["labels"])
  order = np.random.default_rng(0).permutation(len(records))[:7].tolist() + [0, 0]
  batch = records.read(order, fields=("patches", "segment_ids", "labels", "example_ids"))
  for key, value in batch.items():
    np.testing.assert_array_equal(value, whole[key][order])
  records.close()


def test_record_extents_walk_every_shard_of_the_split(shard_dir):
  records = PackedRecords(str(shard_dir), "train")
  counts = [len(record_extents(p)) for p in records.paths]
  assert len(counts) > 1 and sum(counts) == len(records)
  records.close()


def test_prefetched_batches_equal_direct_reads_in_step_order(shard_dir):
  records = PackedRecords(str(shard_dir), "train")
  read_step = lambda step: records.read(batch_indices(len(records), 3, step, seed=5), fields=("labels",))
  got = list(prefetched(read_step, range(4, 11), depth=2))
  assert [step for step, _ in got] == list(range(4, 11))
  for step, batch in got:
    np.testing.assert_array_equal(batch["labels"], read_step(step)["labels"])
  records.close()


def _copy_shards(shard_dir, tmp_path):
  import shutil
  target = tmp_path / "shards"
  shutil.copytree(shard_dir, target)
  return target


def test_a_flipped_bit_in_a_record_is_an_error_naming_file_and_byte(shard_dir, tmp_path):
  import pytest
  shards = _copy_shards(shard_dir, tmp_path)
  records = PackedRecords(str(shards), "train")
  first = records.paths[0]
  data_offset, length = record_extents(first)[1]  # the second record of the first shard
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
  import pytest
  shards = _copy_shards(shard_dir, tmp_path)
  first = PackedRecords(str(shards), "train").paths[0]
  with open(first, "r+b") as f:
    f.seek(9)  # inside the masked CRC of the first record's length
    byte = f.read(1)
    f.seek(9)
    f.write(bytes([byte[0] ^ 0x01]))
  with pytest.raises(ValueError, match="corrupt TFRecord length at byte 0"):
    record_extents(first)
