"""A build is published all at once: dataset_info.json, written last, names exactly the shards of this build;
a build that fails (too many bad records, a full disk, a killed job) publishes nothing and leaves no
temporary files, and readers refuse a directory without it."""

import errno
import json
import logging
import os

import pytest

from beam_jobs import build_shards as build_lib
from beam_jobs.build_shards import build_shards
from beam_jobs.options import ShardOptions
from runner.cli import main
from schemas import direct_io
from schemas.dataset_info import read_dataset_info
from schemas.errors import ContractError
from schemas.shards import PackedRecords

OPTIONS = ShardOptions(seq_len=128, patch_size=16, max_images=8, max_patches_per_image=32, num_shards=2)


def _files(root):
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _manifest(synthetic_dir, tmp_path, bad_lines=0, name="manifest.jsonl"):
  records = [json.loads(l) for l in (synthetic_dir / "manifest.jsonl").read_text().splitlines()]
  for r in records:
    r["image"] = str(synthetic_dir / r["image"])
  lines = [json.dumps(r) for r in records] + ["{not json"] * bad_lines
  (tmp_path / name).write_text("\n".join(lines) + "\n")
  return str(tmp_path / name)


def test_dataset_info_names_exactly_the_shards_on_disk_with_their_size_and_crc_digest(shard_dir):
  info = read_dataset_info(str(shard_dir))
  on_disk = sorted(p for p in _files(shard_dir) if p.endswith(".tfrecord"))
  assert sorted(s["path"] for s in info["shards"]) == on_disk
  for s in info["shards"]:
    assert s["num_bytes"] == os.path.getsize(shard_dir / s["path"])
    assert len(s["crc_digest"]) == 64
  assert sorted(_files(shard_dir)) == sorted(on_disk + ["dataset_info.json", "errors.jsonl", "lineage.json"])


def test_a_build_over_its_error_fraction_publishes_nothing_over_an_older_build(synthetic_dir, tmp_path):
  out = tmp_path / "out"
  build_shards(_manifest(synthetic_dir, tmp_path), str(out), OPTIONS)
  assert read_dataset_info(str(out))["num_errors"] == 0
  with pytest.raises(ContractError, match=r"^10 of 106 manifest records failed \(max_error_fraction 0.01\)"):
    build_shards(_manifest(synthetic_dir, tmp_path, bad_lines=10, name="bad.jsonl"), str(out), OPTIONS)
  # Only the report of what failed stays; the older build's shards and description are gone with it.
  assert _files(out) == ["errors.jsonl"]
  assert len((out / "errors.jsonl").read_text().splitlines()) == 10
  with pytest.raises(ContractError, match="dataset_info.json: not found; .* a build that did not finish"):
    PackedRecords(str(out), "train")


@pytest.fixture
def full_disk_after(monkeypatch):
  """Arms a full disk: every write of a shard file fails with ENOSPC once `n` writes went through (os.pwrite
  as the shard-file tests simulate it, for the O_DIRECT path; the ordinary path's write likewise)."""
  def arm(n):
    calls = []

    def count(size):
      calls.append(size)
      if len(calls) > n:
        raise OSError(errno.ENOSPC, "No space left on device")

    real_pwrite = os.pwrite
    monkeypatch.setattr(direct_io.os, "pwrite", lambda fd, data, offset: count(len(data)) or
                        real_pwrite(fd, data, offset))

    class FullBufferedFile(direct_io._BufferedFile):
      def write(self, piece):
        count(len(piece))
        return super().write(piece)

    monkeypatch.setattr(direct_io, "_BufferedFile", FullBufferedFile)
    return calls
  return arm


@pytest.mark.parametrize("writes_before", [0, 1])
def test_a_full_disk_fails_in_one_line_with_no_temporary_file_and_nothing_published(
    synthetic_dir, tmp_path, capsys, caplog, full_disk_after, writes_before):
  out = tmp_path / "out"
  build_shards(_manifest(synthetic_dir, tmp_path), str(out), OPTIONS)  # an older build, then a rebuild over it
  full_disk_after(writes_before)
  argv = ["shards", "build", "--manifest", str(tmp_path / "manifest.jsonl"), "--output", str(out), "--seq-len",
          "128", "--max-images", "8", "--max-patches-per-image", "32", "--seed", "1", "--token-drop", "fixed:0.5"]
  assert main(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("patchflow: error: [Errno 28] No space left on device writing shards; nothing was published")
  assert "No space left on device" in err and str(out) in err
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no worker traceback logged besides
  assert _files(out) == []  # no temporary file, no shard of either build, nothing published
  with pytest.raises(ContractError, match="not found"):
    read_dataset_info(str(out))


def test_a_job_that_dies_midway_leaves_no_temporary_files_and_publishes_nothing(synthetic_dir, tmp_path,
                                                                                monkeypatch):
  out = tmp_path / "out"
  build_shards(_manifest(synthetic_dir, tmp_path), str(out), OPTIONS)
  real = build_lib.WriteShard.process
  written = []

  def dies_on_the_third_shard(self, key_and_items):
    written.append(key_and_items[0])
    if len(written) == 3:
      raise RuntimeError("worker lost")
    yield from real(self, key_and_items)

  monkeypatch.setattr(build_lib.WriteShard, "process", dies_on_the_third_shard)
  with pytest.raises(RuntimeError, match="worker lost"):
    build_shards(str(tmp_path / "manifest.jsonl"), str(out), OPTIONS)
  assert _files(out) == []


def test_a_rebuild_unpublishes_the_older_build_before_writing_a_shard(synthetic_dir, tmp_path, monkeypatch):
  """A rebuild killed outright (SIGKILL: no clean-up runs) must not leave the older dataset_info.json over new
  shards: it is removed before the first shard is written."""
  out = tmp_path / "out"
  build_shards(_manifest(synthetic_dir, tmp_path), str(out), OPTIONS)
  seen = []
  real = build_lib.WriteShard.process

  def look_first(self, key_and_items):
    seen.append(sorted(os.listdir(out)))
    yield from real(self, key_and_items)

  monkeypatch.setattr(build_lib.WriteShard, "process", look_first)
  build_shards(str(tmp_path / "manifest.jsonl"), str(out), OPTIONS)
  assert seen and all("dataset_info.json" not in names and "lineage.json" not in names for names in seen)
  assert read_dataset_info(str(out))["num_examples"] == 96
