"""Weighted mixtures of datasets: the draws, two label spaces through two heads, exact resume, bad configs."""

import json
import os
import shutil

import numpy as np
import pytest

from schemas.errors import ContractError
from trainers import mixture
from trainers.configs import apply_overrides, load_config
from trainers.input_pipeline import DRAW_BLOCK, mixture_draws
from trainers.train import load_trained_model, train

TINY = {"train.steps": 6, "train.checkpoint_every": 3, "train.log_every": 2, "train.batch_size": 4,
        "train.warmup_steps": 2, "model.width": 32, "model.depth": 1, "model.heads": 2, "model.mlp_dim": 32}
WARM = (0, 3, 4)  # red, yellow, magenta; the other colours are cool


@pytest.fixture(scope="module")
def two_class_shards(synthetic_dir, tmp_path_factory):
  """The synthetic images under another label space (warm / cool colour), as a second dataset."""
  from beam_jobs.build_shards import build_shards
  from beam_jobs.options import ShardOptions
  out = tmp_path_factory.mktemp("warm_cool")
  with open(synthetic_dir / "manifest.jsonl", encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
    for r in records:
      if r["split"] in ("train", "val"):
        r = {**r, "image": str(synthetic_dir / r["image"]), "label": int(r["label"] not in WARM)}
        f.write(json.dumps(r) + "\n")
  (out / "classes.json").write_text(json.dumps({"class_names": ["warm", "cool"]}))
  build_shards(str(out / "manifest.jsonl"), str(out / "shards"),
               ShardOptions(seq_len=128, patch_size=16, max_images=8, max_patches_per_image=32, num_shards=2))
  return out / "shards"


def _mixture_config(colours, warm_cool, **extra):
  config = apply_overrides(load_config("smoke"), {**TINY, **extra})
  config["data"] = {"colours": 2, "warm_cool": 1}
  config["datasets"] = {"colours": {"shards": str(colours)}, "warm_cool": {"shards": str(warm_cool)}}
  return config


def test_draws_follow_the_weights_and_depend_only_on_seed_and_step():
  steps = 20 * DRAW_BLOCK + 100  # the fractions' standard deviation is < 0.002 here
  dataset, batch = mixture_draws([3, 1.0, 0.5], seed=7, steps=steps)
  np.testing.assert_allclose(np.bincount(dataset, minlength=3) / steps, [3 / 4.5, 1 / 4.5, 0.5 / 4.5], atol=0.01)
  for d in range(3):  # each dataset's batches are numbered 0, 1, 2, ... in the order drawn
    assert batch[dataset == d].tolist() == list(range(np.count_nonzero(dataset == d)))
  shorter = mixture_draws([3, 1.0, 0.5], seed=7, steps=DRAW_BLOCK + 5)
  np.testing.assert_array_equal(shorter[0], dataset[:DRAW_BLOCK + 5])  # a step's draw ignores the run's length
  assert not np.array_equal(mixture_draws([3, 1.0, 0.5], seed=8, steps=steps)[0], dataset)
  one, numbers = mixture_draws([1.0], seed=7, steps=10)
  assert one.tolist() == [0] * 10 and numbers.tolist() == list(range(10))  # one dataset: today's batches


@pytest.mark.slow
def test_two_label_spaces_train_through_two_heads_and_resume_exactly(shard_dir, two_class_shards, tmp_path):
  config = _mixture_config(shard_dir, two_class_shards)
  whole = train(None, str(tmp_path / "whole"), config, log=lambda m: None)
  assert set(whole["val"]) == {"colours", "warm_cool"}
  assert all(0 <= v["accuracy"] <= 1 and v["images"] > 0 for v in whole["val"].values())
  # The realised mixture in metrics.jsonl is the seeded draw of each step.
  drawn, _ = mixture_draws([2, 1], config["seed"], 6)
  rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
  for row in rows:
    counts = np.bincount(drawn[:row["step"]], minlength=2)
    assert row["mixture"] == {"colours": counts[0], "warm_cool": counts[1]}
    assert row["dataset"] == ("colours", "warm_cool")[drawn[row["step"] - 1]]
  assert set(drawn.tolist()) == {0, 1}  # both datasets (both heads) were trained
  # One head per label space: the colours' 6 classes, then warm/cool's 2, side by side.
  model, saved = load_trained_model(str(tmp_path / "whole"))
  assert model.head.kernel[...].shape == (32, 8)
  assert saved["dataset_info"]["warm_cool"]["num_classes"] == 2
  assert saved["data"]["colours"] == os.path.abspath(shard_dir)
  # Killed after step 3's checkpoint and started again: the same draws, the same parameters.
  shutil.copytree(tmp_path / "whole", tmp_path / "killed")
  shutil.rmtree(tmp_path / "killed" / "checkpoints" / "6")
  (tmp_path / "killed" / "final.json").unlink()
  logs = []
  resumed = train(None, str(tmp_path / "killed"), config, log=logs.append)
  assert "train: resumed from checkpoint at step 3" in logs
  assert resumed["params_sha256"] == whole["params_sha256"]
  assert (tmp_path / "killed" / "metrics.jsonl").read_text().count("\n") == len(rows)
  # Other weights are other data: resuming is refused.
  with pytest.raises(ContractError, match="was made with weights="):
    train(None, str(tmp_path / "killed"), {**config, "data": {"colours": 1, "warm_cool": 1}}, log=lambda m: None)


@pytest.mark.slow
def test_one_dataset_named_by_the_config_is_the_data_flag(shard_dir, tmp_path):
  config = apply_overrides(load_config("smoke"), {**TINY, "train.steps": 2})
  by_flag = train(str(shard_dir), str(tmp_path / "flag"), config, log=lambda m: None)
  named = {**config, "data": {"colours": 1}, "datasets": {"colours": {"shards": str(shard_dir)}}}
  by_config = train(None, str(tmp_path / "config"), named, log=lambda m: None)
  assert by_config == by_flag


BAD = [
    ({"data": {"a": 0}}, r"^data\.a: weight must be a number > 0, got 0$"),
    ({"data": {"a": -1.5}}, r"^data\.a: weight must be a number > 0, got -1\.5$"),
    ({"data": {"a": "1"}}, r"^data\.a: weight must be a number > 0, got '1'$"),
    ({"data": {"a": True}}, r"^data\.a: weight must be a number > 0, got True$"),
    ({"data": {"a": float("nan")}}, r"^data\.a: weight must be a number > 0, got nan$"),
    ({"data": {"a": 1, "b": 1}}, r"^data\.b: no entry datasets\.b saying where its shards are$"),
    ({"datasets": {"a": {"shards": "x", "task": "detection"}}},
     r"^datasets\.a\.task: unknown task 'detection' \(known: classification, tubelets, video_classification\)$"),
    ({"datasets": {"a": {"shards": "x", "shard": "y"}}}, r"^datasets\.a\.shard: unknown key \(known: shards, task, head\)$"),
    ({"datasets": {"a": {"task": "classification"}}}, r"^datasets\.a\.shards: expected a non-empty string, got None$"),
    ({"datasets": {"a": {"shards": "x"}, "c": {"shards": "y"}}}, r"^datasets\.c: not in data; give it a weight there$"),
    ({"data": []}, r"^data: expected \{dataset name: weight\}, got \[\]$"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_mixture_config_is_one_error_naming_the_key(change, message):
  config = {"data": {"a": 1}, "datasets": {"a": {"shards": "x"}}, **change}
  with pytest.raises(ContractError, match=message):
    mixture.datasets_of(config, None)


def test_data_given_twice_or_a_head_shared_across_label_spaces_is_refused(shard_dir, two_class_shards, tmp_path):
  config = _mixture_config(shard_dir, two_class_shards)
  with pytest.raises(ContractError, match=r"^data: the config names its datasets, and --data '.*' was given too"):
    train(str(shard_dir), str(tmp_path / "w"), config, log=lambda m: None)
  config["datasets"]["warm_cool"]["head"] = "colours"
  with pytest.raises(ContractError, match=r"^datasets\.warm_cool\.head: head 'colours' is also read by colours, with "
                                          r"another task or label space \(6 classes, here 2\)$"):
    train(None, str(tmp_path / "w"), config, log=lambda m: None)
  assert not (tmp_path / "w").exists()  # refused before anything was written
