import pytest

from schemas.shards import load_split
from trainers.configs import apply_overrides, load_config
from trainers.train import train
from tests.gcs import upload_to_gcs


@pytest.mark.slow
def test_trainer_reads_shards_from_gs_and_matches_local(gcs_emulator, shard_dir, tmp_path):
  upload_to_gcs(gcs_emulator, shard_dir, "datasets/small")
  remote = "gs://patchflow-test/datasets/small"
  local_data, remote_data = load_split(str(shard_dir), "val"), load_split(remote, "val")
  assert local_data.keys() == remote_data.keys()
  for key in local_data:
    assert (local_data[key] == remote_data[key]).all()
  config = apply_overrides(load_config("smoke"), {"train.steps": 3, "train.checkpoint_every": 3,
                                                   "train.log_every": 1, "model.width": 32, "model.depth": 1})
  a = train(str(shard_dir), str(tmp_path / "local"), config, log=lambda m: None)
  b = train(remote, str(tmp_path / "remote"), config, log=lambda m: None)
  assert a["params_sha256"] == b["params_sha256"]
