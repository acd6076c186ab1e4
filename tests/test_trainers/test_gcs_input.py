import os

import pytest

from schemas.shards import load_split
from trainers.configs import apply_overrides, load_config
from trainers.train import train


def _upload(client, local_dir, prefix):
  bucket = client.bucket("patchflow-test")
  for folder, _, names in os.walk(local_dir):
    for name in names:
      path = os.path.join(folder, name)
      bucket.blob(f"{prefix}/{os.path.relpath(path, local_dir)}").upload_from_filename(path)


@pytest.mark.slow
def test_trainer_reads_shards_from_gs_and_matches_local(gcs_emulator, shard_dir, tmp_path):
  _upload(gcs_emulator, shard_dir, "datasets/small")
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
