import errno
import os
import threading
import time

import numpy as np
import pytest

from beam_jobs import shard_file
from schemas import direct_io

BLOCK = shard_file.BLOCK_BYTES


def _pieces(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, size, dtype=np.uint8) for size in sizes]


def _write(path, pieces, reserve=0):
  with shard_file.create(str(path), local=True, reserve_bytes=reserve) as f:
    for piece in pieces:
      assert f.write(piece) == piece.nbytes
  return path.read_bytes()


@pytest.fixture
def needs_o_direct(tmp_path):
  """These tests check the direct writer: skip where the temporary directory has no O_DIRECT (tmpfs before
  Linux 6.6, say), where the job would write its shards the ordinary way."""
  try:
    os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)))
  except OSError:
    pytest.skip("no O_DIRECT in the temporary directory")
  if not hasattr(os, "O_DIRECT"):
    pytest.skip("no O_DIRECT on this OS")


def _opened_direct(monkeypatch):
  """Records whether each file was opened with O_DIRECT."""
  flags = []
  real_open = os.open

  def recording_open(path, flag, *args, **kwargs):
    fd = real_open(path, flag, *args, **kwargs)
    flags.append(bool(flag & os.O_DIRECT))
    return fd

  monkeypatch.setattr(shard_file.os, "open", recording_open)
  return flags


# Empty, a tail shorter than a page, whole pages, exactly one block, pieces straddling blocks, one piece
# bigger than both blocks together (a block is handed off while the piece is still being copied).
SIZES = [[], [5], [4096, 8192], [BLOCK], [BLOCK - 3, 7, 786432 * 3, 12, 4], [2 * BLOCK + 4097, 1]]


@pytest.mark.usefixtures("needs_o_direct")
@pytest.mark.parametrize("sizes", SIZES, ids=[str(len(s)) + "-" + str(sum(s)) for s in SIZES])
@pytest.mark.parametrize("reserve", [0, 64 << 20])
def test_direct_and_buffered_files_hold_exactly_the_bytes_written(tmp_path, monkeypatch, sizes, reserve):
  pieces = _pieces(sizes)
  expected = b"".join(p.tobytes() for p in pieces)
  opened = _opened_direct(monkeypatch)
  assert _write(tmp_path / "direct", pieces, reserve) == expected
  assert opened == [True]  # ext4 under tmp_path takes O_DIRECT: the direct writer ran
  monkeypatch.setattr(direct_io, "use_direct_io", False)
  assert _write(tmp_path / "buffered", pieces, reserve) == expected
  assert opened == [True, False]


def test_pieces_may_be_bytes_or_contiguous_arrays_of_any_shape(tmp_path):
  patches = np.arange(3 * 768, dtype=np.int64).astype(np.uint8).reshape(3, 768)
  with shard_file.create(str(tmp_path / "mixed"), local=True) as f:
    f.write(b"header")
    f.write(patches)
    f.write(memoryview(b"footer"))
  assert (tmp_path / "mixed").read_bytes() == b"header" + patches.tobytes() + b"footer"


def test_a_file_system_refusing_o_direct_gets_an_ordinary_file(tmp_path, monkeypatch):
  real_open = os.open

  def no_direct(path, flags, *args, **kwargs):
    if flags & os.O_DIRECT:
      raise OSError(errno.EINVAL, "Invalid argument")
    return real_open(path, flags, *args, **kwargs)

  monkeypatch.setattr(shard_file.os, "open", no_direct)
  pieces = _pieces([BLOCK + 10])
  assert _write(tmp_path / "f", pieces, reserve=BLOCK * 2) == pieces[0].tobytes()


@pytest.mark.usefixtures("needs_o_direct")
def test_a_write_refused_for_its_alignment_is_retried_without_o_direct(tmp_path, monkeypatch):
  import fcntl
  real_pwrite, refused = os.pwrite, []

  def strict_pwrite(fd, data, offset):
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:  # as a file system needing larger alignment would
      refused.append(offset)
      raise OSError(errno.EINVAL, "Invalid argument")
    return real_pwrite(fd, data, offset)

  monkeypatch.setattr(shard_file.os, "pwrite", strict_pwrite)
  pieces = _pieces([BLOCK + 5000, 3])
  assert _write(tmp_path / "f", pieces) == b"".join(p.tobytes() for p in pieces)
  assert refused == [0]  # the first write cleared O_DIRECT for the rest


@pytest.mark.usefixtures("needs_o_direct")
@pytest.mark.parametrize("failing_write", [0, 1, 2], ids=["first block", "last block", "tail"])
def test_a_failed_write_is_raised_to_the_writer_and_the_descriptor_closed(tmp_path, monkeypatch, failing_write):
  real_pwrite, calls, fds = os.pwrite, [], []

  def full_disk(fd, data, offset):
    calls.append(offset)
    fds.append(fd)
    if len(calls) > failing_write:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_pwrite(fd, data, offset)

  monkeypatch.setattr(shard_file.os, "pwrite", full_disk)
  with pytest.raises(OSError, match="No space left"):
    _write(tmp_path / "f", _pieces([BLOCK + 10, BLOCK]))
  with pytest.raises(OSError, match="Bad file descriptor"):
    os.fstat(fds[0])


def test_an_error_in_the_writing_block_stops_without_writing_the_rest(tmp_path):
  with pytest.raises(RuntimeError, match="decode failed"):
    with shard_file.create(str(tmp_path / "f"), local=True, reserve_bytes=1 << 20) as f:
      f.write(_pieces([BLOCK + 100])[0])
      raise RuntimeError("decode failed")
  # The first block went to disk before the error; the 100-byte tail did not: the temporary file is not whole,
  # which is why the job writes under a temporary name.
  assert os.path.getsize(tmp_path / "f") < BLOCK + 100


@pytest.mark.usefixtures("needs_o_direct")
def test_a_block_is_never_refilled_while_it_is_being_written(tmp_path, monkeypatch):
  real_pwrite, changed = os.pwrite, []

  def slow_pwrite(fd, data, offset):
    before = bytes(data)
    time.sleep(0.02)  # the filling thread runs on meanwhile
    changed.append(bytes(data) != before)
    return real_pwrite(fd, data, offset)

  monkeypatch.setattr(shard_file.os, "pwrite", slow_pwrite)
  pieces = _pieces([786444] * 20)  # records of about a sequence each: 15 MB, blocks handed off mid-piece
  assert _write(tmp_path / "f", pieces) == b"".join(p.tobytes() for p in pieces)
  assert len(changed) > 3 and not any(changed)


@pytest.mark.usefixtures("needs_o_direct")
@pytest.mark.parametrize("most", [8192, 1000], ids=["whole pages", "part of a page"])
def test_short_writes_are_continued(tmp_path, monkeypatch, most):
  real_pwrite = os.pwrite
  monkeypatch.setattr(shard_file.os, "pwrite", lambda fd, data, offset: real_pwrite(fd, data[:most], offset))
  pieces = _pieces([BLOCK + 5000, 77])
  # A write cut short mid-page leaves an unaligned rest, which O_DIRECT refuses: the rest goes the ordinary way.
  assert _write(tmp_path / "f", pieces) == b"".join(p.tobytes() for p in pieces)


@pytest.mark.usefixtures("needs_o_direct")
def test_a_refused_tail_write_alone_is_retried_without_o_direct(tmp_path, monkeypatch):
  import fcntl
  real_pwrite = os.pwrite

  def no_short_direct_writes(fd, data, offset):
    if len(data) < BLOCK and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
      raise OSError(errno.EINVAL, "Invalid argument")
    return real_pwrite(fd, data, offset)

  monkeypatch.setattr(shard_file.os, "pwrite", no_short_direct_writes)
  pieces = _pieces([2 * BLOCK + 123])
  assert _write(tmp_path / "f", pieces, reserve=3 * BLOCK) == pieces[0].tobytes()


def test_without_o_direct_on_the_os_files_are_written_the_ordinary_way(tmp_path, monkeypatch):
  monkeypatch.delattr(os, "O_DIRECT")
  pieces = _pieces([BLOCK + 1, 5])
  assert _write(tmp_path / "f", pieces, reserve=4 * BLOCK) == b"".join(p.tobytes() for p in pieces)


@pytest.mark.usefixtures("needs_o_direct")
def test_abandoning_waits_for_the_write_in_flight_before_closing_and_keeps_the_error(tmp_path, monkeypatch):
  real_pwrite, real_close, events = os.pwrite, os.close, []

  def slow_pwrite(fd, data, offset):
    time.sleep(0.2)
    events.append("write done")
    return real_pwrite(fd, data, offset)

  def failing_close(fd):
    events.append("close")
    real_close(fd)
    if threading.current_thread() is threading.main_thread():
      raise OSError(errno.EIO, "Input/output error")  # as a network file system may say on close

  monkeypatch.setattr(shard_file.os, "pwrite", slow_pwrite)
  monkeypatch.setattr(shard_file.os, "close", failing_close)
  with pytest.raises(RuntimeError, match="decode failed"):
    with shard_file.create(str(tmp_path / "f"), local=True) as f:
      f.write(_pieces([BLOCK])[0])  # a full block: its write starts on the writer thread
      raise RuntimeError("decode failed")
  assert events == ["write done", "close"]


def test_the_file_mode_is_that_of_an_ordinary_new_file(tmp_path):
  with open(tmp_path / "ordinary", "wb"):
    pass
  _write(tmp_path / "shard", [])
  assert os.stat(tmp_path / "shard").st_mode == os.stat(tmp_path / "ordinary").st_mode


def test_a_remote_file_goes_through_beam_filesystems():
  from tests.test_beam_jobs import memfs
  with shard_file.create("memfs://bucket/shard.tmp", local=False, reserve_bytes=1 << 20) as f:
    f.write(b"record")
  assert memfs.OBJECTS["memfs://bucket/shard.tmp"] == b"record"
