"""Reading a source example's files (`plan.read_location`): only regular files, never more than the cap."""

import concurrent.futures
import os

import pytest

from beam_jobs import plan
from beam_jobs.plan import ExampleError, read_location
from beam_jobs.sources import SourceExample
from schemas.manifest import ManifestRecord


def _example(*locations, data=None):
  return SourceExample(ManifestRecord(id="a", label=0, image=locations[0], line=1), tuple(locations), data)


def _read(example, max_bytes=1 << 20, index=0):
  """read_location on a thread, so a read that blocks fails the test instead of hanging it."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(read_location, example, index, max_bytes).result(timeout=20)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory"])
def test_anything_but_a_regular_file_is_an_error_row_without_blocking_or_reading(tmp_path, kind):
  path = {"fifo": str(tmp_path / "pipe.png"), "/dev/zero": "/dev/zero", "directory": str(tmp_path)}[kind]
  if kind == "fifo":
    os.mkfifo(path)  # opened for reading, a FIFO without a writer would block for ever
  with pytest.raises(ExampleError) as e:
    _read(_example(path))
  assert e.value.reason == "not_a_file"
  expected = {"fifo": "a FIFO", "/dev/zero": "a character device", "directory": "a directory"}[kind]
  assert e.value.detail == f"{path}: not a regular file ({expected})"


def test_a_file_over_the_cap_is_an_error_row_and_one_at_the_cap_is_read(tmp_path):
  (tmp_path / "big.png").write_bytes(b"x" * 1001)
  (tmp_path / "fits.png").write_bytes(b"y" * 1000)
  with pytest.raises(ExampleError) as e:
    _read(_example(str(tmp_path / "big.png")), max_bytes=1000)
  assert e.value.reason == "file_too_large"
  assert e.value.detail == f"{tmp_path / 'big.png'}: 1001 bytes, over --max-file-bytes 1000"
  assert _read(_example(str(tmp_path / "fits.png")), max_bytes=1000) == b"y" * 1000


def test_a_file_that_grows_past_the_cap_while_read_is_cut_off(tmp_path, monkeypatch):
  """The size comes from fstat, but the read does not trust it: at most the cap plus one byte is read."""
  path = tmp_path / "growing.png"
  path.write_bytes(b"z" * 10)
  real_fstat = os.fstat
  monkeypatch.setattr(plan.os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 5, *real_fstat(fd)[7:])))
  path.write_bytes(b"z" * 5000)
  with pytest.raises(ExampleError) as e:
    _read(_example(str(path)), max_bytes=1000)
  assert e.value.reason == "file_too_large" and "more than 1000 bytes" in e.value.detail


def test_inline_bytes_over_the_cap_are_an_error_row_too():
  with pytest.raises(ExampleError) as e:
    _read(_example("tfds:x/train/1", data=(b"x" * 11,)), max_bytes=10)
  assert e.value.reason == "file_too_large"


def test_missing_and_unreadable_files_keep_their_reasons(tmp_path):
  with pytest.raises(ExampleError) as e:
    _read(_example(str(tmp_path / "missing.png")))
  assert e.value.reason == "missing_file"
  (tmp_path / "empty.png").write_bytes(b"")
  with pytest.raises(ExampleError) as e:
    _read(_example(str(tmp_path / "empty.png")))
  assert e.value.reason == "empty_file"


def test_a_gcs_object_over_the_cap_is_an_error_row(gcs_emulator):
  bucket = gcs_emulator.bucket("patchflow-test")
  bucket.blob("images/big.png").upload_from_string(b"x" * 3000)
  bucket.blob("images/small.png").upload_from_string(b"y" * 2000)
  with pytest.raises(ExampleError) as e:
    _read(_example("gs://patchflow-test/images/big.png"), max_bytes=2000)
  assert e.value.reason == "file_too_large"
  assert e.value.detail.startswith("gs://patchflow-test/images/big.png: ")
  assert "over --max-file-bytes 2000" in e.value.detail
  assert _read(_example("gs://patchflow-test/images/small.png"), max_bytes=2000) == b"y" * 2000
