import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs import synthetic
from beam_jobs.sources import (ReadNumberedLines, SourceExample, SyntheticSource, manifest_chunks,
                               parse_numbered_line, parse_synthetic_spec, plan_tfds, resolve_source, tfds_record)
from schemas.errors import ContractError


def _numbered(text):
  return [(i, line + "\n") for i, line in enumerate(text.split("\n"), start=1) if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 7, 16, 1000])
@pytest.mark.parametrize("text", ["a\nbb\n\nccc\nd", "a\nbb\n\nccc\nd\n", "\n\nxyz\n", "one", "\u00e9\u00e9\n\u00fc\n"])
def test_read_numbered_lines_keeps_line_numbers_for_any_chunking(tmp_path, text, chunk_bytes):
  path = tmp_path / "m.jsonl"
  path.write_bytes(text.encode("utf-8"))
  expected = [(n, t if t.endswith("\n") and n < text.count("\n") + 1 or text.endswith("\n") else t[:-1])
              for n, t in _numbered(text)]
  with TestPipeline(runner="FnApiRunner") as p:
    lines = p | ReadNumberedLines(str(path), chunk_bytes) | beam.MapTuple(lambda n, t: (n, t.rstrip("\n")))
    assert_that(lines, equal_to([(n, t.rstrip("\n")) for n, t in expected]))


def test_manifest_chunks_cover_the_file():
  assert manifest_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
  assert manifest_chunks(0, 4) == [(0, 0)]


@pytest.mark.parametrize("text, reason, rid", [
    ("{not json", "not_json", None),
    ('{"id": "a", "label": 0}', "no_image", "a"),
    ('{"id": "a", "image": "x.png", "label": -1}', "invalid_record", "a"),
    ('{"image": "x.png", "label": 0}', "invalid_record", None),
    ('[1, 2]', "invalid_record", None),
    ('{"id": "a", "image": "x.png", "label": 0, "colour": 1}', "invalid_record", "a"),
    ('{"id": "a", "image": "x.png", "label": 0, "split": ".."}', "invalid_record", "a"),
    ('{"id": "a", "image": "x.png", "label": 2147483648}', "invalid_record", "a"),
    ('{"id": "a", "image": "x.png", "label": 0, "text": "\\ud800"}', "invalid_record", "a"),
    ("[" * 50000 + "]" * 50000, "not_json", None),
    ('{"id": "a", "image": "x.png", "label": 1' + "0" * 5000 + "}", "not_json", None),
])
def test_bad_lines_become_error_rows_with_line_id_and_reason(text, reason, rid):
  row = parse_numbered_line(7, text, "m.jsonl", "/data", ())
  assert row["line"] == 7 and row["reason"] == reason and row["id"] == rid
  assert row["detail"].startswith("m.jsonl:7") and "\n" not in row["detail"]


def test_paths_resolve_against_the_manifest_directory():
  ex = parse_numbered_line(1, '{"id": "a", "image": "img/a.png", "label": "cat"}', "m", "/data", ("dog", "cat"))
  assert isinstance(ex, SourceExample) and ex.locations == ("/data/img/a.png",) and ex.record.label == 1
  ex = parse_numbered_line(1, '{"id": "a", "image": "gs://b/a.png", "label": 0}', "m", "/data", ())
  assert ex.locations == ("gs://b/a.png",)
  ex = parse_numbered_line(1, '{"id": "v", "video": ["f0.png", "/abs/f1.png"], "label": 0}', "m", "gs://b/d", ())
  assert ex.locations == ("gs://b/d/f0.png", "/abs/f1.png")


def test_synthetic_source_gives_the_records_and_bytes_generate_synthetic_writes(tmp_path):
  splits = {"train": 4, "test": 2}
  manifest = synthetic.generate_synthetic(str(tmp_path), seed=5, splits=splits, noise_levels=(1,))
  lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
  expected = []
  for n, line in enumerate(lines, start=1):
    ex = parse_numbered_line(n, line, manifest, str(tmp_path), synthetic.CLASS_NAMES)
    expected.append((ex.record.id, ex.record.line, ex.record.label, ex.record.text, ex.record.split,
                     (tmp_path / json.loads(line)["image"]).read_bytes()))
  with TestPipeline(runner="FnApiRunner") as p:
    out = p | SyntheticSource(seed=5, splits=splits, noise_levels=(1,))
    got = out["examples"] | beam.Map(lambda e: (e.record.id, e.record.line, e.record.label, e.record.text,
                                                 e.record.split, e.data[0]))
    assert_that(got, equal_to(expected))


def test_synthetic_spec():
  assert parse_synthetic_spec("synthetic:seed=3,train=10,val=0,noise=2") == {
      "seed": 3, "splits": {"train": 10, "test": 150}, "noise_levels": (2,)}
  with pytest.raises(ContractError, match="bad part 'train=ten'"):
    parse_synthetic_spec("synthetic:train=ten")
  with pytest.raises(ContractError, match=r"bad part '..=4': a split name must be 1 to 64 of"):
    parse_synthetic_spec("synthetic:..=4")


def test_missing_manifest_is_a_clear_error(tmp_path):
  with pytest.raises(ContractError, match="file not found"):
    resolve_source(str(tmp_path / "nope.jsonl"))


def test_a_manifest_that_is_a_directory_is_a_clear_error(tmp_path):
  with pytest.raises(ContractError, match=r"^manifest '.*': a directory, not a JSONL file$"):
    resolve_source(str(tmp_path))
  import os
  os.mkfifo(tmp_path / "pipe.jsonl")
  for path in (str(tmp_path / "pipe.jsonl"), "/dev/zero"):
    with pytest.raises(ContractError, match=r"^manifest '.*': not a regular file$"):
      resolve_source(path)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  import tensorflow_datasets as tfds

  class TinyPatchflowShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    # No downloads; also keeps TFDS from looking for a checksums file next to this module, which needs the
    # optional importlib_resources package.
    url_infos = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["red", "green", "blue"]),
          "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(5), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        pixels = np.zeros((20 + 8 * i, 30, 3), np.uint8)
        pixels[..., i % 3] = 200
        yield i, {"image": pixels, "label": i % 3, "caption": f"shape {i}"}

  data_dir = tmp_path_factory.mktemp("tfds")
  TinyPatchflowShapes(data_dir=str(data_dir)).download_and_prepare()
  return str(data_dir)


def test_tfds_dataset_gives_manifest_records_with_inline_images(tfds_dir):
  from schemas import tfrecord
  from beam_jobs.image_ops import decode_rgb
  plan = plan_tfds("tfds:tiny_patchflow_shapes", tfds_dir)
  assert plan.class_names == ("red", "green", "blue") and plan.image_key == "image"
  assert plan.label_key == "label" and plan.text_key == "caption" and plan.num_records == 8
  assert [(split, line) for split, _, line in plan.files] == [("test", 1), ("train", 4)]
  seen = []
  for split, path, first in plan.files:
    with open(path, "rb") as f:
      for k, serialized in enumerate(tfrecord.read_records(f)):
        ex = tfds_record(plan, split, first + k, serialized)
        assert isinstance(ex, SourceExample) and ex.record.split == split and ex.record.line == first + k
        pixels = decode_rgb(ex.data[0])
        i = int(ex.record.text.split()[1])
        assert pixels.shape == (20 + 8 * i, 30, 3) and pixels[0, 0, i % 3] == 200 and ex.record.label == i % 3
        seen.append(ex.record.id)
  assert len(set(seen)) == 8
  assert tfds_record(plan, "train", 9, b"\x0a\x03bad")["reason"] == "invalid_record"


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
  with pytest.raises(ContractError, match=r"source 'tfds:no_such_dataset_xyz': not prepared in data_dir"):
    plan_tfds("tfds:no_such_dataset_xyz", str(tmp_path))


def test_a_tfds_dataset_builds_shards_like_a_manifest(tfds_dir, tmp_path):
  import tensorflow as tf
  from beam_jobs import image_ops
  from beam_jobs.build_shards import build_shards
  from beam_jobs.options import ShardOptions
  from schemas.dataset_info import packed_spec
  options = ShardOptions(seq_len=32, patch_size=8, max_images=4, max_patches_per_image=16, num_shards=1,
                         text_len=16)
  info = build_shards("tfds:tiny_patchflow_shapes", str(tmp_path), options, tfds_data_dir=tfds_dir)
  assert info["num_examples"] == 8 and info["num_errors"] == 0 and info["num_manifest_lines"] == 8
  assert info["class_names"] == ["red", "green", "blue"] and set(info["splits"]) == {"train", "test"}
  spec = packed_spec(info)
  captions = 0
  for shard in info["shards"]:
    for record in tf.data.TFRecordDataset(str(tmp_path / shard["path"])):
      ex = {k: v.numpy() for k, v in spec.tf_parse(record).items()}
      for slot, rid in enumerate(ex["example_ids"]):
        if not rid:
          continue
        text = ex["text_tokens"][ex["text_segment_ids"] == slot + 1]
        i = int(bytes((text - 1).astype("uint8").tolist()).decode().split()[1])
        rows, cols = ex["image_grid"][slot]
        patches = ex["patches"][ex["segment_ids"] == slot + 1]
        image = image_ops.unpatchify(patches, rows, cols, 8)
        assert ex["labels"][slot] == i % 3 and image[..., i % 3].mean() > 150
        captions += 1
  assert captions == 8
