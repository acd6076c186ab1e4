"""gs:// end to end against a local GCS emulator: the shard builder writes shards to gs:// through Beam's
GCS IO, and the trainer reads them back from gs:// through google-cloud-storage."""

import json

import pytest

from beam_jobs.build_shards import build_shards
from beam_jobs.options import ShardOptions
from schemas.dataset_info import read_dataset_info
from trainers.configs import apply_overrides, load_config
from trainers.train import train


@pytest.mark.slow
def test_shards_written_to_gs_train_like_local_ones(gcs_emulator, synthetic_dir, shard_dir, tmp_path):
  options = ShardOptions(seq_len=128, patch_size=16, max_images=8, max_patches_per_image=32, num_shards=2)
  remote = "gs://patchflow-test/runs/shards"
  build_shards(str(synthetic_dir / "manifest.jsonl"), remote, options)
  info = read_dataset_info(remote)
  local = read_dataset_info(str(shard_dir))
  assert [(s["path"], s["sha256"]) for s in info["shards"]] == [(s["path"], s["sha256"]) for s in local["shards"]]
  blobs = {b.name for b in gcs_emulator.bucket("patchflow-test").list_blobs(prefix="runs/shards/")}
  assert "runs/shards/errors.jsonl" in blobs and not [b for b in blobs if ".tmp" in b]
  config = apply_overrides(load_config("smoke"), {"train.steps": 2, "train.checkpoint_every": 2,
                                                   "model.width": 32, "model.depth": 1})
  a = train(remote, str(tmp_path / "remote"), config, log=lambda m: None)
  b = train(str(shard_dir), str(tmp_path / "local"), config, log=lambda m: None)
  assert a["params_sha256"] == b["params_sha256"]
  assert json.loads((tmp_path / "remote" / "config.json").read_text())["data"] == remote


def test_lineage_fingerprints_gs_inputs_by_content(gcs_emulator):
  from schemas.lineage import fingerprint_path
  bucket = gcs_emulator.bucket("patchflow-test")
  bucket.blob("d/a.txt").upload_from_string(b"one")
  first = fingerprint_path("gs://patchflow-test/d")
  assert first == fingerprint_path("gs://patchflow-test/d/")
  bucket.blob("d/a.txt").upload_from_string(b"two")
  assert fingerprint_path("gs://patchflow-test/d") != first
