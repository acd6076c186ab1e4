import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from beam_jobs import image_ops
from beam_jobs.build_shards import ShardOptions, build_shards, pack_split
from schemas.dataset_info import read_dataset_info
from schemas.errors import ContractError
from schemas.packed import PackedSpec

OPTIONS = ShardOptions(seq_len=128, patch_size=16, max_images=8, max_patches_per_image=32, num_shards=2)


def _example(rid, n, label=0):
  patches = np.full((n, 16 * 16 * 3), len(rid), np.uint8)
  yx = np.stack([np.zeros(n, np.int32), np.arange(n, dtype=np.int32)], 1)
  return {"id": rid, "label": label, "split": "train", "patches": patches, "yx": yx, "grid": (1, n),
          "text_tokens": None}


def test_pack_split_in_a_test_pipeline():
  examples = [_example(f"e{i}", n) for i, n in enumerate([100, 60, 40, 28, 20, 8])]
  spec = OPTIONS.spec
  with TestPipeline(runner="FnApiRunner") as p:
    packed = (p | beam.Create([("train", examples)]) | beam.FlatMap(pack_split, OPTIONS)
              | beam.Map(lambda kv: (kv[0], kv[1][0], kv[1][2])))
    # FFD over 100, 60, 40, 28, 20, 8 into 128: [100, 28], [60, 40, 20, 8].
    assert_that(packed, equal_to([(("train", 0, 2), 0, {"images": 2, "tokens": 128}),
                                  (("train", 1, 2), 1, {"images": 4, "tokens": 128})]))
  first = next(pack_split(("train", examples), OPTIONS))
  parsed = spec.tf_parse(tf.constant(first[1][1]))
  assert parsed["example_ids"].numpy()[:2].tolist() == [b"e0", b"e3"]
  assert (parsed["segment_ids"].numpy() == 1).sum() == 100


def test_tensorflow_reads_shards_and_patches_reassemble_to_the_resized_image(synthetic_dir, shard_dir):
  info = read_dataset_info(str(shard_dir))
  spec = PackedSpec(info["seq_len"], info["patch_size"], info["max_images"])
  manifest = {json.loads(l)["id"]: json.loads(l) for l in open(synthetic_dir / "manifest.jsonl")}
  seen = set()
  for shard in info["shards"]:
    for record in tf.data.TFRecordDataset(str(shard_dir / shard["path"])):
      ex = {k: v.numpy() for k, v in spec.tf_parse(record).items()}
      for slot, rid in enumerate(ex["example_ids"]):
        if not rid:
          assert ex["labels"][slot] == -1
          continue
        rid = rid.decode()
        seen.add(rid)
        rows, cols = ex["image_grid"][slot]
        mask = ex["segment_ids"] == slot + 1
        assert mask.sum() == rows * cols
        image = image_ops.unpatchify(ex["patches"][mask], rows, cols, 16)
        source = image_ops.decode_rgb((synthetic_dir / manifest[rid]["image"]).read_bytes())
        expected = image_ops.resize_to_grid(source, rows, cols, 16)
        np.testing.assert_array_equal(image, expected)
        assert ex["labels"][slot] == manifest[rid]["label"]
        assert shard["split"] == manifest[rid]["split"]
  assert seen == set(manifest)
  assert info["num_examples"] == len(manifest) and info["num_errors"] == 0
  assert 0 < info["packing_efficiency"] <= 1


def test_same_inputs_give_byte_identical_shards(synthetic_dir, shard_dir, tmp_path):
  build_shards(str(synthetic_dir / "manifest.jsonl"), str(tmp_path), OPTIONS)
  first = read_dataset_info(str(shard_dir))["shards"]
  second = read_dataset_info(str(tmp_path))["shards"]
  assert [(s["path"], s["sha256"]) for s in first] == [(s["path"], s["sha256"]) for s in second]
  for s in second:
    assert (tmp_path / s["path"]).read_bytes() == (shard_dir / s["path"]).read_bytes()
  assert not [p for p in tmp_path.rglob("*.tmp*")]


def _manifest_with_bad_lines(tmp_path, synthetic_dir):
  lines = (synthetic_dir / "manifest.jsonl").read_text().splitlines()
  good = [json.loads(l) for l in lines[:20]]
  for rec in good:
    rec["image"] = str(synthetic_dir / rec["image"])
  (tmp_path / "broken.png").write_bytes(b"not a png")
  rows = [json.dumps(r) for r in good]
  rows.insert(3, "{this is not json")
  rows.append(json.dumps({"id": "ghost", "image": str(tmp_path / "missing.png"), "label": 0}))
  rows.append(json.dumps({"id": "broken", "image": str(tmp_path / "broken.png"), "label": 0}))
  rows.append(json.dumps(good[0]))  # duplicate id: the first one wins
  path = tmp_path / "manifest.jsonl"
  path.write_text("\n".join(rows) + "\n")
  return path


def test_bad_records_go_to_errors_jsonl_with_line_and_reason(tmp_path, synthetic_dir):
  manifest = _manifest_with_bad_lines(tmp_path, synthetic_dir)
  out = tmp_path / "out"
  info = build_shards(str(manifest), str(out), ShardOptions(seq_len=128, max_patches_per_image=32,
                                                            max_error_fraction=0.5))
  errors = [json.loads(l) for l in (out / "errors.jsonl").read_text().splitlines()]
  assert [(e["line"], e["reason"]) for e in errors] == [
      (4, "invalid_record"), (22, "missing_image"), (23, "undecodable_image"), (24, "duplicate_id")]
  assert "not valid JSON" in errors[0]["detail"] and errors[1]["id"] == "ghost"
  assert info["num_errors"] == 4 and info["errors_by_reason"]["missing_image"] == 1
  assert info["num_examples"] == 20


def test_too_many_errors_fail_with_a_clear_message_after_writing_the_report(tmp_path, synthetic_dir):
  manifest = _manifest_with_bad_lines(tmp_path, synthetic_dir)
  out = tmp_path / "out"
  with pytest.raises(ContractError, match=r"4 of 24 manifest records failed .*manifest.jsonl:4: .*not valid JSON"):
    build_shards(str(manifest), str(out), ShardOptions(seq_len=128, max_patches_per_image=32))
  assert len((out / "errors.jsonl").read_text().splitlines()) == 4


def test_missing_manifest_is_a_clear_error(tmp_path):
  with pytest.raises(ContractError, match="file not found"):
    build_shards(str(tmp_path / "nope.jsonl"), str(tmp_path / "out"))
