"""float32 rows of width K kept for a later pass: in memory up to a budget, the rest in a temporary file.

The file is written and read with O_DIRECT (Linux; schemas/direct_io.py) when the temporary directory allows
it. Measured on the 2-core dev machine (ext4 on a virtio disk): writing 3.4 GB through the page cache cost 7 s
of system time (dirty-page throttling), more than decoding the Parquet input again (about 1 CPU s per GB); with
O_DIRECT the same write cost 0.15 CPU s (2 s wall, on a writer thread) and reading it back 0.16 CPU s (3 s
wall, read ahead by a thread). Without O_DIRECT, `RowStore(..., buffered_spill=False)` reports `ok == False`
once the rows outgrow the budget, so that its user can decode the input again instead.

Memory: the budget plus DIRECT_BUFFERS page-aligned blocks of about DIRECT_BLOCK_BYTES.
"""

import math
import os
import queue
import shutil
import tempfile
import threading

import numpy as np

from schemas import direct_io

DIRECT_BLOCK_BYTES = 1 << 23    # one O_DIRECT write / read
DIRECT_BUFFERS = 3
_MAX_UNIT_BYTES = 1 << 26       # K so awkward that page-aligned blocks of whole rows would exceed 64 MB


def _get(q: queue.Queue, stop: threading.Event):
  while not stop.is_set():
    try:
      return q.get(timeout=0.1)
    except queue.Empty:
      pass
  return None


class DirectSpill:
  """Rows appended to an unlinked temporary file opened with O_DIRECT, read back in order.

  Rows are copied into page-aligned blocks of `block_rows` rows (a whole number of pages) that a
  direct_io.DirectWriter writes on its thread, so `append` waits only when DIRECT_BUFFERS blocks are in
  flight. A failed write (a full disk) sets `error`; later appends are dropped."""

  def __init__(self, k: int, fd: int, block_rows: int):
    self.k, self.fd, self.block_rows = k, fd, block_rows
    self.block_bytes = block_rows * 4 * k
    self.rows = 0
    self.error: OSError | None = None
    self.buffers = direct_io.aligned_buffers(DIRECT_BUFFERS, self.block_bytes)
    self.arrays = [np.frombuffer(b, np.float32).reshape(block_rows, k) for b in self.buffers]
    self.writer = direct_io.DirectWriter(fd, self.buffers)
    self.finished = False

  @classmethod
  def create(cls, k: int, directory: str | None = None) -> "DirectSpill | None":
    """None when O_DIRECT is unavailable (not Linux, a filesystem such as older tmpfs) or K is awkward."""
    unit = (direct_io.PAGE // 4) // math.gcd(k, direct_io.PAGE // 4)   # rows in the smallest whole-page block
    if unit * 4 * k > _MAX_UNIT_BYTES:
      return None
    block_rows = max(1, DIRECT_BLOCK_BYTES // (unit * 4 * k)) * unit
    handle, path = tempfile.mkstemp(prefix="patchflow-rows-", dir=directory)
    os.close(handle)
    try:
      fd = direct_io.open_direct(path, os.O_RDWR)
    finally:
      os.unlink(path)  # the open descriptor keeps the data; nothing is left behind if the process dies
    if fd is None:
      return None
    try:  # some filesystems accept the flag and refuse the I/O
      probe = direct_io.aligned_buffers(1, direct_io.PAGE)[0]
      os.pwrite(fd, probe, 0)
      os.preadv(fd, [probe], 0)
    except OSError:
      os.close(fd)
      return None
    return cls(k, fd, block_rows)

  def append(self, scores: np.ndarray, index: np.ndarray) -> None:
    """Appends the rows scores[index] (float32 [n, K], index ascending row numbers)."""
    done = 0
    try:
      while done < len(index) and self.error is None:
        space = np.frombuffer(self.writer.free_space(), np.float32).reshape(-1, self.k)
        take = min(len(index) - done, len(space))
        np.take(scores, index[done:done + take], axis=0, mode="clip", out=space[:take])
        self.rows += take
        done += take
        self.writer.filled(take * 4 * self.k)
    except OSError as e:
      self.error = e

  def finish(self) -> None:
    if self.finished:
      return
    self.finished = True
    try:
      if self.error is None:
        self.writer.finish()
    except OSError as e:
      self.error = e
    finally:
      self.writer.stop()

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
        length = direct_io.round_up_to_pages(rows * 4 * self.k)
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
