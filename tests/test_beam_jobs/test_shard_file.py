import errno
import os

import numpy as np
import pytest

from beam_jobs import shard_file

BLOCK = shard_file.BLOCK_BYTES


def _pieces(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, size, dtype=np.uint8) for size in sizes]


def _write(path, pieces, reserve=0):
  with shard_file.create(str(path), local=True, reserve_bytes=reserve) as f:
    for piece in pieces:
      assert f.write(piece) == piece.nbytes
  return path.read_bytes()


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


@pytest.mark.parametrize("sizes", SIZES, ids=[str(len(s)) + "-" + str(sum(s)) for s in SIZES])
@pytest.mark.parametrize("reserve", [0, 64 << 20])
def test_direct_and_buffered_files_hold_exactly_the_bytes_written(tmp_path, monkeypatch, sizes, reserve):
  pieces = _pieces(sizes)
  expected = b"".join(p.tobytes() for p in pieces)
  opened = _opened_direct(monkeypatch)
  assert _write(tmp_path / "direct", pieces, reserve) == expected
  assert opened == [True]  # ext4 under tmp_path takes O_DIRECT: the direct writer ran
  monkeypatch.setattr(shard_file, "use_direct_io", False)
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


def test_preallocate_reserves_a_local_file(tmp_path):
  with open(tmp_path / "shard.tmp", "wb") as f:
    assert shard_file.preallocate(f.fileno(), 1 << 20)  # Linux, a local file system with fallocate
    assert os.fstat(f.fileno()).st_size == 1 << 20
    assert not shard_file.preallocate(f.fileno(), 0)
