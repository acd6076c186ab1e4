"""The train loop's readers and the evaluators' loaders refuse a shard directory that is not one published
build (schemas/shards.py checks each shard against dataset_info.json): a mixed or half-rebuilt directory, or
a build that failed its error fraction, is a clear error before any step."""

import shutil

import pytest

from runner.cli import main
from schemas.dataset_info import read_dataset_info
from schemas.errors import ContractError
from trainers.configs import apply_overrides, load_config
from trainers.train import train


@pytest.fixture
def mixed_dir(shard_dir, tmp_path):
  """The shard directory with one train shard replaced by a val shard of the same build: the state a rebuild
  killed midway over an older build leaves when the older dataset_info.json survives."""
  mixed = tmp_path / "mixed"
  shutil.copytree(shard_dir, mixed)
  info = read_dataset_info(str(mixed))
  train_shard = next(s for s in info["shards"] if s["split"] == "train")
  val_shard = next(s for s in info["shards"] if s["split"] == "val")
  shutil.copyfile(mixed / val_shard["path"], mixed / train_shard["path"])
  return mixed, train_shard["path"]


def test_training_refuses_a_mixed_directory_before_any_step(mixed_dir, tmp_path):
  mixed, replaced = mixed_dir
  config = apply_overrides(load_config("smoke"), {"train.steps": 1, "model.width": 16, "model.depth": 1})
  with pytest.raises(ContractError, match=f"{replaced}: not the shard that dataset_info.json describes"):
    train(str(mixed), str(tmp_path / "work"), config, log=lambda m: None)
  assert not (tmp_path / "work" / "checkpoints").exists()


def test_patchflow_train_on_a_mixed_directory_is_one_line(mixed_dir, tmp_path, capsys):
  mixed, replaced = mixed_dir
  code = main(["train", "--data", str(mixed), "--workdir", str(tmp_path / "work"), "--set", "train.steps=1"])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert code != 0 and err.startswith("patchflow: error: ") and replaced in err


def test_the_evaluators_loader_refuses_a_mixed_directory(mixed_dir):
  from evaluators.predict import predict_split
  mixed, replaced = mixed_dir
  with pytest.raises(ContractError, match=f"{replaced}: not the shard"):
    predict_split(None, str(mixed), "train", read_dataset_info(str(mixed)))
