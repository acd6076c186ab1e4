import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from beam_jobs import synthetic_actions as actions
from beam_jobs import video
from runner.cli import main
from schemas.errors import ContractError

TINY = {"splits": {"train": 4, "val": 2, "test": 1}, "frames": 8, "size": 32}


def _digests(root) -> dict[str, str]:
  return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
          for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize("generate", [actions.generate_action_clips, actions.generate_action_classes])
def test_same_seed_same_bytes_of_every_file_and_another_seed_other_bytes(generate, tmp_path):
  generate(str(tmp_path / "a"), seed=1, **TINY)
  generate(str(tmp_path / "b"), seed=1, **TINY)
  generate(str(tmp_path / "c"), seed=2, **TINY)
  a, b, c = (_digests(tmp_path / name) for name in "abc")
  assert a == b and not any(name.endswith(".tmp") for name in a)
  assert a.keys() == c.keys()
  assert all(a[name] != c[name] for name in a if name.endswith(".mp4") or name == "manifest.jsonl")


def _check_box(box, frames):
  t, ymin, xmin, ymax, xmax = box
  assert isinstance(t, int) and 0 <= t < frames
  assert 0 <= ymin < ymax <= 1 and 0 <= xmin < xmax <= 1


def test_clip_records_follow_the_contract_and_ground_truth_repeats_their_tubes(tmp_path):
  summary = actions.generate_action_clips(str(tmp_path), seed=3, **TINY)
  records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
  assert [r["split"] for r in records] == ["train"] * 4 + ["val"] * 2 + ["test"]
  assert len({r["id"] for r in records}) == len(records)
  for r in records:
    assert set(r) == {"id", "video", "split", "tubelets"} and 1 <= len(r["tubelets"]) <= actions.MAX_ACTORS
    total, height, width = video.probe((tmp_path / r["video"]).read_bytes())
    assert (total, height, width) == (8, 32, 32)
    for tube in r["tubelets"]:
      assert set(tube) == {"label", "boxes"} and 0 <= tube["label"] < len(actions.CLASS_NAMES)
      frames = [box[0] for box in tube["boxes"]]
      assert frames == list(range(frames[0], frames[0] + len(frames)))  # consecutive, each frame once
      assert len(frames) >= actions.MIN_FRAMES // 2
      for box in tube["boxes"]:
        _check_box(box, 8)
  for split in ("train", "val", "test"):
    tubes = [json.loads(line) for line in (tmp_path / "ground_truth" / f"{split}.jsonl").read_text().splitlines()]
    assert tubes == [{"video": r["id"], **tube} for r in records if r["split"] == split for tube in r["tubelets"]]
    assert summary["tubes"][split] == len(tubes)
  classes = json.loads((tmp_path / "classes.json").read_text())
  train_labels = [t["label"] for r in records if r["split"] == "train" for t in r["tubelets"]]
  assert classes == {"class_names": list(actions.CLASS_NAMES),
                     "train_counts": np.bincount(train_labels, minlength=len(actions.CLASS_NAMES)).tolist()}


def test_class_records_follow_the_contract_and_classes_are_balanced(tmp_path):
  actions.generate_action_classes(str(tmp_path), splits={"train": 20, "val": 0}, frames=8, size=32)
  records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
  assert all(set(r) == {"id", "video", "split", "label"} and (tmp_path / r["video"]).exists() for r in records)
  counts = json.loads((tmp_path / "classes.json").read_text())["train_counts"]
  assert sum(counts) == 20 and max(counts) - min(counts) <= 1
  plans = actions.plan_action_classes(seed=0)  # the defaults: 3x the downstream train split, balanced
  assert sum(p.split == "train" for p in plans) == 3 * actions.DEFAULT_SPLITS["train"]
  assert all(len(p.actors) == 1 and p.actors[0].start == 0 and len(p.actors[0].states) == p.frames for p in plans)
  train = np.bincount([p.actors[0].label for p in plans if p.split == "train"])
  assert train.tolist() == [150] * len(actions.CLASS_NAMES)


def test_default_train_classes_are_long_tailed_as_the_profile_says():
  plans = actions.plan_action_clips(seed=0)
  assert [sum(p.split == s for p in plans) for s in ("train", "val", "test")] == [400, 100, 100]
  labels = [a.label for p in plans if p.split == "train" for a in p.actors]
  counts = np.bincount(labels, minlength=len(actions.CLASS_NAMES))
  assert (np.diff(counts) <= 0).all() and counts[0] >= 10 * counts[-1] > 0
  # The quota: each count is the profile's share of the tubelets, rounded (largest remainder).
  assert np.abs(counts - len(labels) * np.array(actions.CLASS_PROFILE)).max() < 1
  # Shape and colour are drawn apart from the action: every class common enough shows every shape and colour.
  for label in range(len(actions.CLASS_NAMES)):
    mine = [a for p in plans for a in p.actors if a.label == label]
    assert {a.shape for a in mine} == set(actions.SHAPES) and len({a.colour for a in mine}) == len(actions.COLOURS)


def test_the_action_is_recoverable_from_the_boxes_over_time():
  for plan in actions.plan_action_clips(seed=4, splits={"train": 60}):
    for actor in plan.actors:
      boxes = np.array(actions.actor_boxes(actor, plan.size))[:, 1:]
      centre_y, centre_x = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
      area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
      dy, dx = centre_y[-1] - centre_y[0], centre_x[-1] - centre_x[0]
      action = actions.CLASS_NAMES[actor.label]
      direction = {"move_right": (0, 1), "move_left": (0, -1), "move_down": (1, 0), "move_up": (-1, 0)}.get(action)
      if direction is not None:
        along, across = dy * direction[0] + dx * direction[1], dy * direction[1] - dx * direction[0]
        assert along > 0.2 and abs(across) < 1e-6
      elif action in ("grow", "shrink"):
        assert (area[-1] / area[0]) ** (1 if action == "grow" else -1) > 3
      else:  # rotate and blink stay in place (a turning triangle's box centre wobbles by 0.63 of its radius)
        assert max(np.ptp(centre_y), np.ptp(centre_x)) < 0.15
        steady = (np.ptp(boxes, axis=0) == 0).all()
        assert steady == (action == "blink" or actor.shape == "circle")
        assert (len(set(actor.states[:, 4])) == 2) == (action == "blink")


@pytest.mark.parametrize("seed", range(3))
def test_decoded_frames_are_close_to_the_drawn_ones_and_boxes_bound_what_was_drawn(seed):
  plan = actions.plan_action_classes(seed=seed, splits={"train": 1}, frames=8, size=48)[0]
  drawn = actions.render_frames(plan)
  data = actions.encode_mp4(drawn, fps=8)
  decoded = np.stack(video.decode_sampled(data, video.probe(data)[0], 8)).astype(np.float64)
  assert np.abs(decoded - drawn).mean() < 6
  # The pixels the actor changed span its box on every frame, within a pixel and a quarter (whole pixels of
  # antialiased edges; PIL's polygon edges reach a quarter pixel, one drawing pixel, out).
  changed = (drawn != actions.render_frames(dataclasses.replace(plan, actors=()))).any(-1)
  for t, *box in actions.actor_boxes(plan.actors[0], plan.size):
    ys, xs = np.nonzero(changed[t])
    np.testing.assert_allclose([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.array(box) * plan.size,
                               atol=1.25)


def test_cli_writes_the_data_sets_and_its_ground_truth_scores_itself(tmp_path, capsys):
  argv = ["--output", str(tmp_path / "clips"), "--seed", "2", "--num-train", "3", "--num-val", "1",
          "--num-test", "2", "--frames", "8", "--size", "32"]
  assert main(["synthetic", "actions", *argv]) == 0
  out, err = capsys.readouterr()
  assert out.startswith("wrote 6 clips (train 3, val 1, test 2; 8 frames of 32x32 px,") and out.count("\n") == 1
  assert "train tubelets per class: move_right " in out and "actions: 6/6 clips written" in err
  ground_truth = tmp_path / "clips" / "ground_truth" / "test.jsonl"
  detections = tmp_path / "detections.jsonl"
  detections.write_text("".join(json.dumps({**json.loads(line), "score": 1.0}) + "\n"
                                for line in ground_truth.read_text().splitlines()))
  assert main(["localisation-metrics", "--detections", str(detections), "--ground-truth", str(ground_truth),
               "--output", str(tmp_path / "metrics")]) == 0
  metrics = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
  assert metrics["frame_map@0.5"] == metrics["video_map@0.5"] == 1.0
  capsys.readouterr()
  assert main(["synthetic", "action-classes", *argv]) == 0
  assert capsys.readouterr().out.startswith("wrote 6 clips (train 3, val 1, test 2;")


def test_a_smaller_rerun_leaves_no_stale_videos(tmp_path):
  actions.generate_action_classes(str(tmp_path), splits={"train": 3}, frames=8, size=32)
  actions.generate_action_classes(str(tmp_path), splits={"train": 1}, frames=8, size=32)
  assert sorted(os.listdir(tmp_path / "videos")) == ["train-00000.mp4"]


@pytest.mark.parametrize("argv, message", [
    (["actions", "--num-train", "-1"], "split 'train': the number of clips must be a non-negative integer, got -1"),
    (["action-classes", "--num-test", "-5"], "split 'test': the number of clips must be a non-negative integer"),
    (["actions", "--size", "16"], "size: an even number of pixels, at least 32, got 16"),
    (["actions", "--size", "33"], "size: an even number of pixels, at least 32, got 33"),
    (["action-classes", "--frames", "4"], "frames: at least 8 frames per clip, got 4"),
    (["actions", "--seed", "-1"], "seed: a non-negative integer, got -1"),
])
def test_bad_arguments_are_one_clear_line_and_exit_2(argv, message, tmp_path, capsys):
  assert main(["synthetic", argv[0], "--output", str(tmp_path / "out"), *argv[1:]]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"patchflow: error: {message}") and "\n" not in err
  assert not (tmp_path / "out").exists()


def test_the_library_refuses_unknown_splits_and_bad_rates():
  with pytest.raises(ContractError, match="unknown split 'dev'"):
    actions.plan_action_clips(splits={"dev": 3})
  with pytest.raises(ContractError, match="fps: a positive integer, got 0"):
    actions.generate_action_classes("/nonexistent", splits={"train": 1}, fps=0)
