"""Local files written past the page cache: O_DIRECT from page-aligned blocks that a worker thread writes while
the next block fills, disk space reserved with fallocate(2), and ordinary writes where the OS or the file system
refuses O_DIRECT (tmpfs before Linux 6.6, some FUSE mounts) or its alignment.

Its users write data that the page cache would only cost them: shard files, written once and never read back
by the job (beam_jobs/shard_file.py), and calibrate's spilled rows, written once and read back by its own
thread (evaluators/rowstore.py). Each module records what bypassing the cache saved it.
"""

import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import mmap
import os

PAGE = 4096             # O_DIRECT offsets, lengths and buffer addresses are multiples of this
use_direct_io = True    # tests switch it off to exercise the ordinary ways


def round_up_to_pages(nbytes: int) -> int:
  return -(-nbytes // PAGE) * PAGE


def aligned_buffers(count: int, nbytes: int) -> list[mmap.mmap]:
  """`count` buffers of `nbytes` each, page-aligned as O_DIRECT needs (anonymous maps are)."""
  return [mmap.mmap(-1, nbytes) for _ in range(count)]


def open_direct(path: str, flags: int, mode: int = 0o666) -> int | None:
  """`path` opened with `flags` | O_DIRECT; None where the OS or the file system has no O_DIRECT."""
  if not use_direct_io or not hasattr(os, "O_DIRECT"):
    return None
  try:
    return os.open(path, flags | os.O_DIRECT, mode)
  except OSError:  # EINVAL: this file system has no O_DIRECT
    return None


@functools.lru_cache(maxsize=1)
def _libc_fallocate():
  try:
    fallocate = ctypes.CDLL(None, use_errno=True).fallocate
  except (OSError, AttributeError, TypeError):  # not Linux (no such symbol, or no process handle on Windows)
    return None
  fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
  fallocate.restype = ctypes.c_int
  return fallocate


def preallocate(fd: int, nbytes: int) -> bool:
  """Reserves `nbytes` of disk for a local file about to be written (fallocate(2); the file reads as that long,
  zeros after what is written, until it is truncated). Writing into reserved blocks spares ext4 its per-block
  allocation work. Best effort: False for a file system or an OS without fallocate (never posix_fallocate's
  fallback, which writes zeros over the whole range first), or when the disk is short of the space; a
  reservation that failed part-way can still have made the file longer, so writers truncate it at the end."""
  fallocate = _libc_fallocate()
  return fallocate is not None and nbytes > 0 and fallocate(fd, 0, 0, nbytes) == 0


class DirectWriter:
  """Bytes appended to a file descriptor opened with O_DIRECT, through `buffers` (page-aligned blocks of one
  size, a whole number of pages): a full block is written by a worker thread (os.pwrite releases the GIL)
  while the next one fills, so appending waits only when every block is in flight. A failed write (a full
  disk, say) raises from the next call that waits for its block, or from finish(). A write the file system
  refuses for its alignment (EINVAL) clears O_DIRECT on the descriptor and is retried as an ordinary write.
  The caller owns the descriptor and the buffers."""

  def __init__(self, fd: int, buffers: list[mmap.mmap]):
    self._fd = fd
    self._views = [memoryview(b) for b in buffers]
    self.block_bytes = len(self._views[0])
    self._in_flight: list[concurrent.futures.Future | None] = [None] * len(buffers)
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="direct-writer")
    self._current, self._fill, self._offset = 0, 0, 0   # block filling, bytes in it, file offset of its start

  def write(self, piece) -> int:
    data = memoryview(piece).cast("B")
    done = 0
    while done < len(data):
      n = min(self.block_bytes - self._fill, len(data) - done)
      self._views[self._current][self._fill:self._fill + n] = data[done:done + n]
      done += n
      self.filled(n)
    return len(data)

  def free_space(self) -> memoryview:
    """The unfilled rest of the block filling, for a caller that fills it in place and then calls filled()."""
    return self._views[self._current][self._fill:]

  def filled(self, nbytes: int) -> None:
    """Counts `nbytes` more of the block filling as written to; a full block is handed to the worker."""
    self._fill += nbytes
    if self._fill == self.block_bytes:
      self._hand_off()

  def _hand_off(self) -> None:
    """Starts writing the filling block and waits until the next one is free to fill."""
    block = self._current
    self._in_flight[block] = self._pool.submit(self._pwrite, self._views[block][:self._fill], self._offset)
    self._offset += self._fill
    self._current, self._fill = (block + 1) % len(self._views), 0
    self._wait(self._current)

  def _wait(self, block: int) -> None:
    future, self._in_flight[block] = self._in_flight[block], None
    if future is not None:
      future.result()  # a failed write raises here, in the appending thread

  def _pwrite(self, view: memoryview, offset: int) -> None:
    import fcntl  # here, not at the top: only a POSIX system with O_DIRECT gets here

    while len(view):
      try:
        n = os.pwrite(self._fd, view, offset)
      except OSError as e:
        if e.errno != errno.EINVAL or not fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_DIRECT:
          raise
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        continue
      if n == 0:  # no progress and no error: do not spin
        raise OSError(errno.EIO, f"write of {len(view)} bytes at offset {offset} wrote nothing")
      view, offset = view[n:], offset + n

  def finish(self) -> int:
    """Writes the last block, padded with zeros to whole pages, and waits for every write; returns the number
    of bytes appended (the file is longer by the padding)."""
    size = self._offset + self._fill
    padded = round_up_to_pages(self._fill)
    self._views[self._current][self._fill:padded] = bytes(padded - self._fill)
    for later in range(1, len(self._views)):  # the blocks in flight, oldest first
      self._wait((self._current + later) % len(self._views))
    self._pwrite(self._views[self._current][:padded], self._offset)
    return size

  def stop(self) -> None:
    """Lets a write still in flight finish and ends the worker thread."""
    self._pool.shutdown()
    # The buffers are unmapped when the last reference goes: closing them here could fail while a traceback
    # still holds a view of one, and hide the error being raised.
    self._views = None


class _DirectFile:
  """A new file written by a DirectWriter from two blocks, truncated on close to the bytes given."""

  def __init__(self, fd: int, block_bytes: int):
    self._fd = fd
    self._writer = DirectWriter(fd, aligned_buffers(2, block_bytes))

  def write(self, piece) -> int:
    return self._writer.write(piece)

  def close(self, abandon: bool = False) -> None:
    """Writes what is left and truncates the file to the bytes given; with `abandon`, only stops."""
    try:
      if not abandon:
        os.ftruncate(self._fd, self._writer.finish())  # drops the padding and whatever was reserved beyond it
    finally:
      self._writer.stop()  # before its descriptor goes
      with contextlib.suppress(OSError) if abandon else contextlib.nullcontext():  # keep the error abandoning
        os.close(self._fd)


class _BufferedFile:
  """An ordinary local file, truncated on close to what was written (a reservation may have made it longer, even
  one that failed part-way)."""

  def __init__(self, fd: int):
    self._file = os.fdopen(fd, "wb")

  def write(self, piece) -> int:
    return self._file.write(piece)

  def close(self, abandon: bool = False) -> None:
    if abandon:
      with contextlib.suppress(OSError):  # keep the error abandoning
        self._file.close()
      return
    try:
      self._file.flush()
      self._file.truncate()
    finally:
      self._file.close()


def create_file(path: str, reserve_bytes: int, block_bytes: int):
  """A new local file at `path` (emptied if it exists) to write() pieces to, then close() (or
  close(abandon=True) to stop on an error); once closed it holds exactly the bytes written. It is written with
  O_DIRECT from two blocks of `block_bytes` (a whole number of pages) where the file system allows, else the
  ordinary way; `reserve_bytes` (an upper bound of its size) are reserved first."""
  flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
  fd = open_direct(path, flags)
  direct = fd is not None
  if fd is None:
    fd = os.open(path, flags, 0o666)
  try:
    preallocate(fd, reserve_bytes)
    return _DirectFile(fd, block_bytes) if direct else _BufferedFile(fd)
  except BaseException:
    os.close(fd)
    raise
