"""The tubelets task (STAR) in the train loop: it trains on tubelet shards, and a resumed run is bit-identical."""

import json
import shutil

import numpy as np
import pytest

from trainers import tasks
from trainers.configs import apply_overrides, load_config
from trainers.tasks import tubelets
from trainers.train import load_trained_model, train

TINY = {"train.steps": 4, "train.checkpoint_every": 2, "train.log_every": 2, "train.batch_size": 2,
        "train.warmup_steps": 1, "model.width": 32, "model.depth": 1, "model.heads": 2, "model.mlp_dim": 32,
        "model.decoder_depth": 1, "model.num_queries": 4}


def _config():
  return apply_overrides(load_config("star_tiny"), TINY)


def test_star_tiny_names_the_tubelets_task():
  assert load_config("star_tiny")["task"] == "tubelets"
  assert tasks.get_task("tubelets") is tubelets.TASK


@pytest.mark.slow
def test_tubelets_train_and_resume_bit_identically(tubelet_shard_dir, tmp_path):
  config = _config()
  whole = train(str(tubelet_shard_dir), str(tmp_path / "whole"), config, log=lambda m: None)
  assert np.isfinite(whole["loss"])
  assert set(whole["val"]) == {"loss", "actor_accuracy", "box_iou", "clips", "actors"}
  assert whole["val"]["clips"] == 2 and whole["val"]["actors"] >= 2 and np.isfinite(whole["val"]["loss"])
  rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4]
  assert all(np.isfinite(r[k]) for r in rows for k in ("loss", "class_loss", "l1_loss", "giou_loss"))
  assert all(r["images_per_second"] > 0 for r in rows)  # clips without a clip label (-2) count as filled slots
  # Simulate a run killed after step 2's checkpoint: drop later state and start the same command again.
  shutil.copytree(tmp_path / "whole", tmp_path / "killed")
  shutil.rmtree(tmp_path / "killed" / "checkpoints" / "4")
  (tmp_path / "killed" / "final.json").unlink()
  logs = []
  resumed = train(str(tubelet_shard_dir), str(tmp_path / "killed"), config, log=logs.append)
  assert "train: resumed from checkpoint at step 2" in logs
  assert resumed["params_sha256"] == whole["params_sha256"]
  assert resumed["loss"] == whole["loss"]
  # The model rebuilds from config.json alone: F and A come from the saved dataset_info.
  model, saved = load_trained_model(str(tmp_path / "whole"))
  info = json.loads((tubelet_shard_dir / "dataset_info.json").read_text())
  assert (model.num_frames, model.max_actors) == (info["max_frames"], info["max_actors"]) == (
      saved["dataset_info"]["max_frames"], saved["dataset_info"]["max_actors"])


@pytest.mark.slow
def test_prepare_turns_shard_bytes_into_padded_tube_targets(tubelet_shard_dir):
  from schemas.dataset_info import read_dataset_info
  from schemas.shards import load_split
  info = read_dataset_info(str(tubelet_shard_dir))
  model = tubelets.TASK.build_model(_config()["model"], [_dataset(info, tubelet_shard_dir)], 0)
  batch = tubelets.prepare(model, load_split(str(tubelet_shard_dir), "train", info, tubelets.FIELDS), None)
  sequences, slots, frames, actors = len(batch["patches"]), info["max_images"], info["max_frames"], info["max_actors"]
  assert set(batch) == {*tubelets.MODEL_FIELDS, *tubelets.TARGETS}
  assert batch["tube_boxes"].shape == (sequences, slots, actors, frames, 4)
  assert batch["tube_present"].shape == (sequences, slots, actors, frames) and batch["tube_present"].any()
  assert batch["tube_labels"].shape == (sequences, slots, actors) and (batch["tube_labels"] >= 0).any()


def _dataset(info, shards):
  from trainers.mixture import Dataset
  from trainers.tasks.task import Head
  return Dataset("data", str(shards), 1.0, tubelets.TASK, Head("data", info["num_classes"]), info)

