"""Tubelets (STAR) from the manifest to the shards: every actor's box at every sampled frame, read back exactly."""

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from beam_jobs import synthetic_actions, video
from beam_jobs.build_shards import build_shards
from beam_jobs.options import ShardOptions
from runner.cli import main
from schemas.dataset_info import read_dataset_info
from schemas.packed import FINGERPRINT, NO_CLIP_LABEL
from schemas.shards import load_split, tubelet_arrays


@pytest.fixture(scope="module")
def actions(tmp_path_factory):
  root = tmp_path_factory.mktemp("actions")
  assert main(["synthetic", "actions", "--output", str(root / "D"), "--num-train", "4", "--num-val", "2",
               "--num-test", "2"]) == 0
  return root


def _build(root, output, *flags):
  assert main(["shards", "build", "--manifest", str(root / "D" / "manifest.jsonl"), "--output", str(output),
               "--video", "--video-frames", "8", *flags]) == 0
  return read_dataset_info(str(output))


def _slots(shard_dir, info):
  """(example id, its clip label, frame_t, tube_labels, tube_boxes, tube_present) of every filled slot."""
  for split in info["splits"]:
    batch = load_split(str(shard_dir), split)
    tubes = tubelet_arrays(batch, info)
    for b, m in np.ndindex(batch["example_ids"].shape):
      if batch["example_ids"][b, m]:
        yield (batch["example_ids"][b, m].decode(), batch["labels"][b, m],
               *(tubes[name][b, m] for name in ("frame_t", "tube_labels", "tube_boxes", "tube_present")))
      else:
        assert (tubes["frame_t"][b, m] == -1).all() and (tubes["tube_labels"][b, m] == -1).all()


@pytest.mark.slow
def test_every_actors_box_at_every_sampled_frame_reads_back_exactly(actions):
  info = _build(actions, actions / "S")
  manifest = {r["id"]: r for r in map(json.loads, (actions / "D" / "manifest.jsonl").read_text().splitlines())}
  most_actors = max(len(r["tubelets"]) for r in manifest.values())
  assert (info["schema_version"], info["fingerprint"], info["num_errors"]) == (2, FINGERPRINT, 0)
  assert (info["max_frames"], info["max_actors"]) == (8, most_actors)
  assert info["class_names"] == list(synthetic_actions.CLASS_NAMES) and info["num_classes"] == 8
  sampled = video.sample_indices(synthetic_actions.DEFAULT_FRAMES, 8)
  assert sampled == [1, 3, 5, 7, 9, 11, 13, 15]
  seen, present_boxes, absent_boxes = set(), 0, 0
  for rid, label, frame_t, labels, boxes, present in _slots(actions / "S", info):
    seen.add(rid)
    tubelets = manifest[rid]["tubelets"]
    assert label == NO_CLIP_LABEL  # a localisation clip has no clip label: filled, but not classified
    assert frame_t.tolist() == sampled
    assert labels.tolist() == [t["label"] for t in tubelets] + [-1] * (most_actors - len(tubelets))
    for a, tube in enumerate(tubelets):
      by_frame = {box[0]: box[1:] for box in tube["boxes"]}
      for f, t in enumerate(sampled):
        if t in by_frame:
          assert present[a, f]
          np.testing.assert_array_equal(boxes[a, f], np.float32(by_frame[t]))  # exactly, as float32
          present_boxes += 1
        else:
          assert not present[a, f] and (boxes[a, f] == 0).all()
          absent_boxes += 1
    assert not present[len(tubelets):].any() and (boxes[len(tubelets):] == 0).all()
  assert seen == set(manifest)
  assert present_boxes and absent_boxes  # actors enter and leave within the clips


def test_the_same_build_twice_gives_the_same_bytes(actions):
  first = _build(actions, actions / "S1")
  second = _build(actions, actions / "S2", "--workers", "2")
  assert first == second
  for shard in first["shards"]:
    data = (actions / "S2" / shard["path"]).read_bytes()
    assert data == (actions / "S1" / shard["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == shard["sha256"]


def _png(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def test_frame_lists_carry_every_frame_and_frames_out_of_the_clip_are_error_rows(actions, tmp_path):
  for t in range(3):
    (tmp_path / f"f{t}.png").write_bytes(_png(np.full((32, 32, 3), 60 * t, np.uint8)))
  frames = ["f0.png", "f1.png", "f2.png"]
  clip = str(actions / "D" / "videos" / "train-00000.mp4")  # 16 frames
  rows = [
      {"id": "list", "video": frames, "label": 4, "tubelets": [{"label": 2, "boxes": [[2, 0.5, 0.25, 0.75, 1.0],
                                                                                     [0, 0.1, 0.2, 0.3, 0.4]]}]},
      {"id": "late", "video": clip, "tubelets": [{"label": 1, "boxes": [[15, 0, 0, 1, 1], [16, 0, 0, 1, 1]]}]},
      {"id": "long", "video": frames, "tubelets": [{"label": 1, "boxes": [[3, 0, 0, 1, 1]]}]},
  ]
  (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  info = build_shards(str(tmp_path / "manifest.jsonl"), str(tmp_path / "S"),
                      ShardOptions(seq_len=64, patch_size=16, max_images=2, num_shards=1, video=True,
                                   max_error_fraction=1))
  errors = [json.loads(line) for line in (tmp_path / "S" / "errors.jsonl").read_text().splitlines()]
  assert errors == [
      {"line": 2, "id": "late", "reason": "invalid_record",  # found by planning, which counts the file's frames
       "detail": "line 2 (id 'late'): field 'tubelets': tubelet 0: box 1: frame t = 16 is not in the clip, whose "
                 "16 frames are t = 0..15"},
      {"line": 3, "id": "long", "reason": "invalid_record",  # found by the manifest parser
       "detail": f"{tmp_path / 'manifest.jsonl'}:3 (id 'long'): field 'tubelets': tubelet 0: box 0: frame t = 3 is "
                 "not in the clip, whose 3 frames are t = 0..2"}]
  assert (info["max_frames"], info["max_actors"], info["num_classes"]) == (3, 1, 5)
  ((rid, label, frame_t, labels, boxes, present),) = _slots(tmp_path / "S", info)
  assert (rid, label, frame_t.tolist(), labels.tolist()) == ("list", 4, [0, 1, 2], [2])
  assert present.tolist() == [[True, False, True]]
  np.testing.assert_array_equal(boxes[0], np.float32([[0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0], [0.5, 0.25, 0.75, 1]]))
