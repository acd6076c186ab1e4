import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import socket  # noqa: E402

import pytest  # noqa: E402

SMALL_SPLITS = {"train": 48, "val": 24, "test": 12}


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  from beam_jobs.synthetic import generate_synthetic
  out = tmp_path_factory.mktemp("synthetic")
  generate_synthetic(str(out), seed=3, splits=SMALL_SPLITS, noise_levels=(2,))
  return out


@pytest.fixture(scope="session")
def shard_dir(synthetic_dir, tmp_path_factory):
  from beam_jobs.build_shards import build_shards
  from beam_jobs.options import ShardOptions
  out = tmp_path_factory.mktemp("shards")
  build_shards(str(synthetic_dir / "manifest.jsonl"), str(out),
               ShardOptions(seq_len=128, patch_size=16, max_images=8, max_patches_per_image=32, num_shards=2))
  return out


@pytest.fixture(scope="session")
def tubelet_shard_dir(tmp_path_factory):
  """A few synthetic action clips (32 px, 8 frames, 4 sampled: 16 tokens a clip) in tubelet shards."""
  from beam_jobs.build_shards import build_shards
  from beam_jobs.options import ShardOptions
  from beam_jobs.synthetic_actions import generate_action_clips
  clips = tmp_path_factory.mktemp("action_clips")
  generate_action_clips(str(clips), seed=1, splits={"train": 6, "val": 2, "test": 3}, frames=8, size=32)
  out = tmp_path_factory.mktemp("tubelet_shards")
  build_shards(str(clips / "manifest.jsonl"), str(out),
               ShardOptions(seq_len=32, patch_size=16, max_images=2, video=True, video_frames=4, num_shards=1))
  return out


@pytest.fixture
def gcs_emulator(monkeypatch):
  """A local GCS emulator (gcp-storage-emulator) with bucket `patchflow-test`; clients reach it through
  STORAGE_EMULATOR_HOST, their documented endpoint setting. Yields a storage client bound to it."""
  from gcp_storage_emulator.server import create_server
  from schemas import storage
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket="patchflow-test")
  server.start()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  monkeypatch.setattr(storage, "_client", None)
  yield storage._gcs()
  server.stop()
