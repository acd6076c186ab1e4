"""float32 rows of width K kept for a later pass: in memory up to a budget, the rest in a temporary file.

The file is written and read with O_DIRECT (Linux) when the temporary directory allows it. Measured on the
2-core dev machine (ext4 on a virtio disk): writing 3.4 GB through the page cache cost 7 s of system time
(dirty-page throttling), more than decoding the Parquet input again (about 1 CPU s per GB); with O_DIRECT the
same write cost 0.15 CPU s (2 s wall, on a writer thread) and reading it back 0.16 CPU s (3 s wall, read ahead
by a thread). Without O_DIRECT, `RowStore(..., buffered_spill=False)` reports `ok == False` once the rows
outgrow the budget, so that its user can decode the input again instead.

Memory: the budget plus DIRECT_BUFFERS page-aligned blocks of about DIRECT_BLOCK_BYTES.
"""

import math
import mmap
import os
import queue
import shutil
import tempfile
import threading

import numpy as np

DIRECT_BLOCK_BYTES = 1 << 23    # one O_DIRECT write / read
DIRECT_BUFFERS = 3
DIRECT_ALIGN = 4096             # offsets, lengths and addresses of O_DIRECT I/O are multiples of this
_MAX_UNIT_BYTES = 1 << 26       # K so awkward that 4096-aligned blocks of whole rows would exceed 64 MB
use_direct_io = True            # tests switch it off to exercise the fallbacks


def _round_up(n: int, to: int) -> int:
  return -(-n // to) * to


def _get(q: queue.Queue, stop: threading.Event):
  while not stop.is_set():
    try:
      return q.get(timeout=0.1)
    except queue.Empty:
      pass
  return None


class DirectSpill:
  """Rows appended to an unlinked temporary file opened with O_DIRECT, read back in order.

  Rows are copied into page-aligned blocks of `block_rows` rows (a whole number of 4096-byte pages); a writer
  thread writes full blocks, so `append` waits only when DIRECT_BUFFERS blocks are in flight. A failed write
  (a full disk) sets `error`; later appends are dropped."""

  def __init__(self, k: int, fd: int, block_rows: int):
    self.k, self.fd, self.block_rows = k, fd, block_rows
    self.block_bytes = block_rows * 4 * k
    self.rows = 0
    self.error: OSError | None = None
    self.buffers = [mmap.mmap(-1, self.block_bytes) for _ in range(DIRECT_BUFFERS)]
    self.arrays = [np.frombuffer(b, np.float32).reshape(block_rows, k) for b in self.buffers]
    self.free: queue.Queue = queue.Queue()
    for i in range(DIRECT_BUFFERS):
      self.free.put(i)
    self.pending: queue.Queue = queue.Queue()
    self.current, self.filled, self.blocks_written = None, 0, 0
    self.writer = threading.Thread(target=self._write_loop, daemon=True)
    self.writer.start()
    self.finished = False

  @classmethod
  def create(cls, k: int, directory: str | None = None) -> "DirectSpill | None":
    """None when O_DIRECT is unavailable (not Linux, a filesystem such as older tmpfs) or K is awkward."""
    if not use_direct_io or not hasattr(os, "O_DIRECT"):
      return None
    unit = (DIRECT_ALIGN // 4) // math.gcd(k, DIRECT_ALIGN // 4)   # rows in the smallest whole-page block
    if unit * 4 * k > _MAX_UNIT_BYTES:
      return None
    block_rows = max(1, DIRECT_BLOCK_BYTES // (unit * 4 * k)) * unit
    handle, path = tempfile.mkstemp(prefix="patchflow-rows-", dir=directory)
    os.close(handle)
    try:
      fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError:
      return None
    finally:
      os.unlink(path)  # the open descriptor keeps the data; nothing is left behind if the process dies
    try:  # some filesystems accept the flag and refuse the I/O
      probe = mmap.mmap(-1, DIRECT_ALIGN)
      os.pwrite(fd, probe, 0)
      os.preadv(fd, [probe], 0)
    except OSError:
      os.close(fd)
      return None
    return cls(k, fd, block_rows)

  def _write_loop(self) -> None:
    while (item := self.pending.get()) is not None:
      index, rows, block = item
      if self.error is None:
        try:
          length = _round_up(rows * 4 * self.k, DIRECT_ALIGN)
          written = os.pwrite(self.fd, memoryview(self.buffers[index])[:length], block * self.block_bytes)
          if written != length:
            raise OSError(f"short write ({written} of {length} bytes)")
        except OSError as e:
          self.error = e
      self.free.put(index)

  def _submit(self) -> None:
    self.pending.put((self.current, self.filled, self.blocks_written))
    self.blocks_written += 1
    self.current = None

  def append(self, scores: np.ndarray, index: np.ndarray) -> None:
    """Appends the rows scores[index] (float32 [n, K], index ascending row numbers)."""
    done = 0
    while done < len(index) and self.error is None:
      if self.current is None:
        self.current, self.filled = self.free.get(), 0
      take = min(len(index) - done, self.block_rows - self.filled)
      np.take(scores, index[done:done + take], axis=0, mode="clip",
              out=self.arrays[self.current][self.filled:self.filled + take])
      self.filled += take
      self.rows += take
      done += take
      if self.filled == self.block_rows:
        self._submit()

  def finish(self) -> None:
    if self.finished:
      return
    if self.current is not None and self.filled:
      self._submit()
    self.pending.put(None)
    self.writer.join()
    self.finished = True

  def chunks(self):
    """The rows in order, block by block; a thread reads ahead (at most DIRECT_BUFFERS blocks)."""
    self.finish()
    if self.error is not None:
      raise self.error
    blocks = -(-self.rows // self.block_rows)
    free, full, stop = queue.Queue(), queue.Queue(), threading.Event()
    for i in range(DIRECT_BUFFERS):
      free.put(i)

    def read():
      for block in range(blocks):
        index = _get(free, stop)
        if index is None:
          return
        rows = min(self.block_rows, self.rows - block * self.block_rows)
        length = _round_up(rows * 4 * self.k, DIRECT_ALIGN)
        try:
          got = os.preadv(self.fd, [memoryview(self.buffers[index])[:length]], block * self.block_bytes)
          if got < rows * 4 * self.k:
            raise OSError(f"short read ({got} of {rows * 4 * self.k} bytes)")
        except OSError as e:
          full.put(e)
          return
        full.put((index, rows))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    try:
      for _ in range(blocks):
        item = full.get()
        if isinstance(item, OSError):
          raise item
        index, rows = item
        yield self.arrays[index][:rows]
        free.put(index)
    finally:
      stop.set()
      thread.join()

  def close(self) -> None:
    self.finish()
    os.close(self.fd)
    self.arrays = self.buffers = []  # the mappings go with the last array that views them


class BufferedSpill:
  """The same interface through the page cache (where O_DIRECT is unavailable)."""

  def __init__(self, k: int, rows_per_chunk: int = 1 << 13):
    self.k, self.rows, self.error, self.rows_per_chunk = k, 0, None, rows_per_chunk
    self.dir = tempfile.mkdtemp(prefix="patchflow-rows-")
    self.file = open(os.path.join(self.dir, "rows.f32"), "w+b")

  def append(self, scores: np.ndarray, index: np.ndarray) -> None:
    if self.error is not None:
      return
    try:
      self.file.write(memoryview(np.ascontiguousarray(scores[index])).cast("B"))
    except OSError as e:
      self.error = e
    self.rows += len(index)

  def finish(self) -> None:
    if self.error is None:
      try:
        self.file.flush()
      except OSError as e:
        self.error = e

  def chunks(self):
    self.finish()
    if self.error is not None:
      raise self.error
    self.file.seek(0)
    buffer = np.empty((self.rows_per_chunk, self.k), np.float32)
    while (size := self.file.readinto(memoryview(buffer).cast("B"))):
      yield buffer[:size // (4 * self.k)]

  def close(self) -> None:
    self.file.close()
    shutil.rmtree(self.dir, ignore_errors=True)


class RowStore:
  """float32 rows of width K for later passes: in memory up to `budget_bytes`, then in a DirectSpill (or, with
  `buffered_spill`, a BufferedSpill where O_DIRECT is unavailable). `ok` is False when rows were dropped: the
  budget was exceeded with no spill allowed, or a spill write failed."""

  def __init__(self, k: int, budget_bytes: int, buffered_spill: bool = True):
    self.k, self.budget, self.buffered_spill = k, budget_bytes, buffered_spill
    self.rows = 0
    self.memory: list[np.ndarray] = []
    self.memory_bytes = 0
    self.spill: DirectSpill | BufferedSpill | None = None
    self.dropped = False

  @property
  def ok(self) -> bool:
    """Whether every row appended so far is kept. Writes may be in flight: call finish() before relying on it."""
    return not self.dropped and (self.spill is None or self.spill.error is None)

  def finish(self) -> None:
    """Waits until every appended row is written (or has failed), so that `ok` is final."""
    if self.spill is not None:
      self.spill.finish()

  @property
  def spilled(self) -> str:
    return {DirectSpill: "direct", BufferedSpill: "buffered"}.get(type(self.spill), "no")

  def append(self, scores: np.ndarray, index: np.ndarray) -> None:
    """Appends the rows scores[index] (ascending row numbers of the float32 [n, K] array `scores`)."""
    if not len(index) or not self.ok:
      return
    self.rows += len(index)
    if self.spill is None:
      room = (self.budget - self.memory_bytes) // (4 * self.k)
      if room > 0:
        head = index[:room]
        self.memory.append(np.take(scores, head, axis=0, mode="clip"))
        self.memory_bytes += self.memory[-1].nbytes
        index = index[len(head):]
        if not len(index):
          return
      self.spill = DirectSpill.create(self.k) or (BufferedSpill(self.k) if self.buffered_spill else None)
      if self.spill is None:
        self.dropped = True
        return
    self.spill.append(scores, index)

  def chunks(self, rows_per_chunk: int):
    """The rows in order, as arrays of at most rows_per_chunk rows (in memory) or one spill block. Callers
    must not modify them."""
    for block in self.memory:
      for start in range(0, len(block), rows_per_chunk):
        yield block[start:start + rows_per_chunk]
    if self.spill is not None:
      yield from self.spill.chunks()

  def head(self, rows: int) -> np.ndarray:
    parts, have = [], 0
    chunks = self.chunks(rows)
    try:
      for block in chunks:
        parts.append(block[:rows - have].copy())
        have += len(parts[-1])
        if have >= rows:
          break
    finally:
      chunks.close()
    return np.concatenate(parts) if parts else np.zeros((0, self.k), np.float32)

  def close(self) -> None:
    if self.spill is not None:
      self.spill.close()
      self.spill = None
