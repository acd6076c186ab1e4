"""The shifted scores d = z - max z that `patchflow calibrate` needs after its decoding pass: those of the fit
rows, read by every Newton pass of the temperature fit, and those of the held-out rows, read once to apply the
fitted temperature.

Both are kept in memory up to a budget (the fit rows up to 256 MB, the held-out rows up to 32 MB); beyond it
they go to temporary files written and read with O_DIRECT (evaluators/rowstore.py). Where O_DIRECT is not
available the fit rows spill through the page cache and the held-out rows are not kept: decoding them from the
input again is cheaper than writing gigabytes through the page cache.
"""

import numpy as np

from evaluators.prediction_stream import Source
from evaluators.rowstore import RowStore
from schemas.errors import ContractError

STORE_BUDGET_BYTES = 1 << 28    # fit rows kept in memory up to this (read by every Newton pass), then spilled
HELD_MEMORY_BYTES = 1 << 25     # held-out rows (read once) kept in memory up to this, then spilled


class TemperatureRows:
  """The shifted scores of the fit rows (`fit`) and, unless they outgrow memory without O_DIRECT or a spill
  write fails, of the held-out rows (`held`), appended chunk by chunk in row order."""

  def __init__(self, source: Source, fit_mask: np.ndarray, budget_bytes: int = STORE_BUDGET_BYTES):
    self.path, self.fit_mask = source.path, fit_mask
    self.fit = RowStore(source.num_classes, budget_bytes)
    self.held = RowStore(source.num_classes, min(budget_bytes, HELD_MEMORY_BYTES), buffered_spill=False)

  def append(self, d: np.ndarray, row0: int) -> None:
    """Keeps the shifted scores d of rows row0, row0 + 1, ..."""
    fit_here = self.fit_mask[row0:row0 + len(d)]
    self.fit.append(d, np.flatnonzero(fit_here))
    if self.held.ok:
      self.held.append(d, np.flatnonzero(~fit_here))

  def finish(self) -> None:
    """Waits until the last blocks are written, so that `held_kept` is final; an error when the fit rows
    could not be kept."""
    self.fit.finish(), self.held.finish()
    if not self.fit.ok:
      raise ContractError(f"{self.path}: cannot keep the temperature fit rows in a temporary file "
                          f"({self.fit.spill.error})")

  @property
  def held_kept(self) -> bool:
    return self.held.ok

  def held_chunks(self, rows_per_chunk: int):
    """(row numbers, shifted scores of those rows) over the kept held-out rows, in order."""
    index, done = np.flatnonzero(~self.fit_mask), 0
    for d in self.held.chunks(rows_per_chunk):
      yield index[done:done + len(d)], d
      done += len(d)

  def close(self) -> None:
    self.fit.close()
    self.held.close()
