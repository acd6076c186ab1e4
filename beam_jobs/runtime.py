"""How the shard builder runs on Beam workers, apart from what it computes: the job's metrics namespace and
progress lines, plans moved between stages as pickled blobs, and the garbage collector kept out of the way of
the job's many small objects. The stages (plan, pack, write) call these; none of them changes a byte of output.
"""

import contextlib
import gc
import pickle
import sys
import threading
import time

NAMESPACE = "build_shards"


class Progress:
  """A progress line on stderr at most every `every` seconds, per worker process (local runs show them)."""

  def __init__(self, what: str, every: float = 10.0):
    self._what, self._every = what, every
    self._count, self._start, self._last = 0, None, 0.0

  def add(self, n: int = 1) -> None:
    now = time.monotonic()
    if self._start is None:
      self._start = self._last = now
    self._count += n
    if now - self._last >= self._every:
      self._last = now
      rate = self._count / max(1e-9, now - self._start)
      print(f"build_shards: {self._count} {self._what} in this worker ({rate:.0f}/s)", file=sys.stderr, flush=True)


def to_blob(items: list) -> bytes:
  """Plans (or anything picklable) as one pickled element. After planning, plans travel in blobs of many: Beam
  encodes, sizes (it samples element sizes by encoding them) and moves one bytes object far more cheaply than
  a list of dataclasses, each pickled on its own, or one element per plan."""
  return pickle.dumps(items, pickle.HIGHEST_PROTOCOL)


def from_blob(blob: bytes) -> list:
  """The items of a blob. The garbage collector is paused meanwhile: unpickling thousands of small objects
  triggers collections that each walk every live object of the worker, which cost three times the unpickling
  itself; the objects made here hold no cycles."""
  with gc_paused():
    return pickle.loads(blob)


_GC_PAUSE_LOCK = threading.Lock()
_gc_pause = {"depth": 0, "was_enabled": False}


@contextlib.contextmanager
def gc_paused():
  """The cyclic garbage collector off for the block, from whichever worker thread: the first to enter turns it
  off, the last to leave turns it back on if it was on."""
  with _GC_PAUSE_LOCK:
    if _gc_pause["depth"] == 0:
      _gc_pause["was_enabled"] = gc.isenabled()
      gc.disable()
    _gc_pause["depth"] += 1
  try:
    yield
  finally:
    with _GC_PAUSE_LOCK:
      _gc_pause["depth"] -= 1
      if _gc_pause["depth"] == 0 and _gc_pause["was_enabled"]:
        gc.enable()


@contextlib.contextmanager
def heap_frozen(in_process: bool):
  """For a run in this process: the objects that exist before it (Beam's and every imported module's, ~10^5)
  are set aside from garbage collection meanwhile, so each full collection that the job's allocations trigger
  walks the job's own objects only (50 ms less each). Left alone when the caller froze objects itself."""
  if not in_process or gc.get_freeze_count():
    yield
    return
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()
