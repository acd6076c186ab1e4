"""A training that ends with an unusable model fails, after writing its checkpoint: non-finite validation loss,
or validation accuracy at or below chance when the task has labels; `train.allow_useless_model` accepts it."""

import json
import math
import os
import re

import numpy as np
import pytest

from trainers.configs import apply_overrides, load_config
from trainers.tasks import classification, tubelets, video_classification
from trainers.tasks.task import Head
from trainers.train import UnusableModelError, train, unusable_because

TINY = {"train.steps": 2, "train.checkpoint_every": 2, "train.log_every": 1, "train.batch_size": 4,
        "train.warmup_steps": 1, "model.width": 32, "model.depth": 1, "model.heads": 2, "model.mlp_dim": 32}


def _config(**extra):
  return apply_overrides(load_config("smoke"), {**TINY, **extra})


@pytest.mark.slow
def test_a_diverged_run_fails_after_writing_its_checkpoint(shard_dir, tmp_path):
  workdir = tmp_path / "w"
  with pytest.raises(UnusableModelError) as caught:
    train(str(shard_dir), str(workdir), _config(**{"train.learning_rate": 1e10}), log=lambda m: None)
  message = str(caught.value)
  # The figure named depends on how far the weights flew: past float32 (loss nan) or only far (accuracy).
  assert re.match(r"train: the model is not usable: validation (loss is (nan|inf)|accuracy 0\.\d+ is at or below "
                  r"chance \(1/6 = 0\.167\)) \(dataset 'data'\)", message), message
  assert f"{workdir}/checkpoints" in message and "train.allow_useless_model=True" in message
  assert "\n" not in message
  assert (workdir / "checkpoints" / "2").is_dir()  # kept for inspection
  val = json.loads((workdir / "final.json").read_text())["val"]  # the figures, kept with the checkpoint
  assert not math.isfinite(val["loss"]) or val["accuracy"] <= 1 / 6
  accepted = train(str(shard_dir), str(tmp_path / "accepted"),
                   _config(**{"train.learning_rate": 1e10, "train.allow_useless_model": True}), log=lambda m: None)
  assert json.dumps(accepted["val"], sort_keys=True) == json.dumps(val, sort_keys=True)  # the same training, accepted


@pytest.mark.slow
def test_a_normal_tiny_run_passes(shard_dir, tmp_path):
  final = train(str(shard_dir), str(tmp_path / "w"), _config(**{"train.steps": 6, "train.checkpoint_every": 3}),
                log=lambda m: None)
  assert math.isfinite(final["val"]["loss"]) and final["val"]["accuracy"] > 1 / 6


@pytest.mark.parametrize("task, metrics, classes, reason", [
    (classification.TASK, {"loss": 1.7, "accuracy": 0.5}, 6, None),
    (classification.TASK, {"loss": float("nan"), "accuracy": 0.5}, 6, "validation loss is nan"),
    (classification.TASK, {"loss": float("inf"), "accuracy": 0.5}, 6, "validation loss is inf"),
    (classification.TASK, {"loss": 1.7, "accuracy": 1 / 6}, 6,
     "validation accuracy 0.167 is at or below chance (1/6 = 0.167)"),
    (classification.TASK, {"loss": 1.7, "accuracy": 0.1}, 6, "validation accuracy 0.100 is at or below chance"),
    (classification.TASK, {"loss": 1.7, "accuracy": float(np.float32(5 / 30))}, 6,
     "validation accuracy 0.167 is at or below chance"),  # a float32 mean of exactly chance
    (classification.TASK, {"loss": 1.7, "accuracy": 6 / 30}, 6, None),
    (video_classification.TASK, {"loss": 1.1, "accuracy": 0.25}, 4,
     "validation accuracy 0.250 is at or below chance (1/4 = 0.250)"),
    (tubelets.TASK, {"loss": 4.0, "actor_accuracy": 0.2, "box_iou": 0.3}, 4,
     "validation actor_accuracy 0.200 is at or below chance (1/4 = 0.250)"),
    (tubelets.TASK, {"loss": 4.0, "actor_accuracy": 0.3, "box_iou": 0.3}, 4, None),
])
def test_unusable_means_non_finite_loss_or_accuracy_at_chance(task, metrics, classes, reason):
  found = unusable_because(metrics, task, Head("data", classes))
  assert found == reason if reason is None else found.startswith(reason), found


def test_the_override_is_a_documented_config_key():
  assert load_config("smoke")["train"]["allow_useless_model"] is False
  docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "training.md"), encoding="utf-8").read()
  assert "train.allow_useless_model" in docs
