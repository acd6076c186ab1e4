"""Action localisation of a trained STAR run: detections and ground truth on the packed frames' source indices,
frame/video mAP through evaluators.localisation, and the report."""

import json

import numpy as np
import pytest

from evaluators.localisation import localisation_metrics
from evaluators.tubelets import (FIELDS, detected_tubes, evaluate_localisation, ground_truth_tubes,
                                 render_localisation_report)
from schemas.dataset_info import read_dataset_info
from schemas.shards import load_split, tubelet_arrays
from trainers.star import predict_tubelets

MAP_KEYS = {"frame_map@0.5", "video_map@0.2", "video_map@0.5", "per_class"}


@pytest.fixture(scope="module")
def test_split(tubelet_shard_dir):
  info = read_dataset_info(str(tubelet_shard_dir))
  data = load_split(str(tubelet_shard_dir), "test", info, FIELDS)
  return info, data, tubelet_arrays(data, info)


def _write(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def test_the_ground_truth_scored_against_itself_has_every_map_one(test_split, tmp_path):
  _, data, tubes = test_split
  truth = ground_truth_tubes(data, tubes)
  assert {tube["video"] for tube in truth} == {i.decode() for i in data["example_ids"].ravel() if i}
  as_detections = [{**tube, "score": 1.0} for tube in truth]
  metrics = localisation_metrics(_write(tmp_path / "d.jsonl", as_detections), _write(tmp_path / "g.jsonl", truth),
                                 str(tmp_path / "out"), log=lambda m: None)
  assert (metrics["frame_map@0.5"], metrics["video_map@0.2"], metrics["video_map@0.5"]) == (1.0, 1.0, 1.0)


def test_detections_are_on_the_source_frames_packed(test_split):
  """A model output that shows an action at every packed frame of every filled slot: each detected box's frame is
  the slot's frame_t at that packed frame, in order."""
  info, data, tubes = test_split
  sequences, slots, frames = tubes["frame_t"].shape
  logits = np.full((sequences, slots, 2, frames, info["num_classes"] + 1), -5.0, np.float32)
  logits[..., 3] = 5.0
  outputs = {"logits": logits, "boxes": np.tile(np.float32([0.1, 0.2, 0.5, 0.6]), (sequences, slots, 2, frames, 1)),
             "slots": data["example_ids"] != b""}
  detections = detected_tubes(predict_tubelets(outputs, 0.05), data, tubes)
  assert len(detections) == 2 * int(outputs["slots"].sum())
  for detection in detections:
    b, m = (int(i[0]) for i in np.nonzero(data["example_ids"] == detection["video"].encode()))
    frame_t = tubes["frame_t"][b, m]
    assert [box[0] for box in detection["boxes"]] == frame_t[frame_t >= 0].tolist()
    assert detection["label"] == 3 and detection["boxes"][0][1:] == pytest.approx([0.1, 0.2, 0.5, 0.6])


@pytest.fixture(scope="module")
def evaluated(tubelet_shard_dir, tmp_path_factory):
  from trainers.configs import apply_overrides, load_config
  from trainers.train import train
  root = tmp_path_factory.mktemp("tubelet_run")
  config = apply_overrides(load_config("star_tiny"), {
      "train.steps": 2, "train.checkpoint_every": 2, "train.log_every": 1, "train.batch_size": 2,
      "train.warmup_steps": 1, "model.width": 32, "model.depth": 1, "model.heads": 2, "model.mlp_dim": 32,
      "model.decoder_depth": 1, "model.num_queries": 4})
  train(str(tubelet_shard_dir), str(root / "train"), config, log=lambda m: None)
  metrics = evaluate_localisation(str(tubelet_shard_dir), str(root / "train"), str(root / "eval"), score_threshold=0.0,
                                  log=lambda m: None)
  return root, metrics


@pytest.mark.slow
def test_evaluate_localisation_writes_detections_truth_and_metrics(evaluated, test_split):
  root, metrics = evaluated
  _, data, tubes = test_split
  assert set(metrics) == MAP_KEYS
  assert json.loads((root / "eval" / "metrics.json").read_text()) == metrics
  assert json.loads((root / "eval" / "lineage.json").read_text())["step"] == "evaluate_localisation"
  truth = [json.loads(line) for line in (root / "eval" / "ground_truth.jsonl").read_text().splitlines()]
  assert truth == json.loads(json.dumps(ground_truth_tubes(data, tubes)))
  frames_of = {data["example_ids"][b, m].decode(): set(tubes["frame_t"][b, m].tolist())
               for b, m in np.ndindex(data["example_ids"].shape) if data["example_ids"][b, m]}
  for line in (root / "eval" / "detections.jsonl").read_text().splitlines():
    detection = json.loads(line)
    assert set(detection) == {"video", "label", "score", "boxes"}
    assert {box[0] for box in detection["boxes"]} <= frames_of[detection["video"]]


@pytest.mark.slow
def test_the_report_shows_the_maps_per_class_training_and_frames(evaluated, tubelet_shard_dir):
  root, metrics = evaluated
  summary = render_localisation_report(str(tubelet_shard_dir), str(root / "eval"), str(root / "report.html"),
                                       train_dir=str(root / "train"))
  assert summary == {k: metrics[k] for k in ("frame_map@0.5", "video_map@0.2", "video_map@0.5")}
  page = (root / "report.html").read_text()
  for section in ("Per class", "Dataset and packing", "Training", "Tubes on test clips", "Lineage"):
    assert f"<h2>{section}</h2>" in page, section
  assert page.count("<img") == 2  # the training curve and the frames
  info = read_dataset_info(str(tubelet_shard_dir))
  assert all(f"{label} {info['class_names'][int(label)]}" in page for label in metrics["per_class"])
  assert not (root / "report.html.tmp").exists()
