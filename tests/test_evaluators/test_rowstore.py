"""evaluators/rowstore.py: rows kept in memory, then spilled, come back in order."""

import numpy as np
import pytest

from evaluators import rowstore
from schemas import direct_io


@pytest.mark.parametrize("k", [6, 1000, 1001])
def test_direct_spill_gives_back_the_rows_in_order(k):
  spill = rowstore.DirectSpill.create(k)
  if spill is None:
    pytest.skip("no O_DIRECT in the temporary directory")
  try:
    rng = np.random.default_rng(k)
    parts = [rng.standard_normal((n, k)).astype(np.float32) for n in (1, 700, spill.block_rows, 3)]
    picks = [np.flatnonzero(rng.random(len(p)) < .7) for p in parts]
    for part, pick in zip(parts, picks):
      spill.append(part, pick)
    back = np.concatenate([block.copy() for block in spill.chunks()])
    np.testing.assert_array_equal(back, np.concatenate([p[i] for p, i in zip(parts, picks)]))
    assert len(np.concatenate(list(spill.chunks()))) == len(back)  # read again, e.g. by a second Newton pass
  finally:
    spill.close()


def test_row_store_head_and_memory_then_spill():
  store = rowstore.RowStore(3, budget_bytes=3 * 4 * 5)
  rows = np.arange(36, dtype=np.float32).reshape(12, 3)
  store.append(rows, np.arange(4))
  store.append(rows, np.arange(4, 12))
  try:
    assert store.ok and store.rows == 12 and store.spilled in ("direct", "buffered")
    np.testing.assert_array_equal(np.concatenate([c.copy() for c in store.chunks(2)]), rows)
    np.testing.assert_array_equal(store.head(7), rows[:7])
  finally:
    store.close()
  dropped = rowstore.RowStore(3, budget_bytes=3 * 4 * 5, buffered_spill=False)
  was_direct = direct_io.use_direct_io
  direct_io.use_direct_io = False
  try:
    dropped.append(rows, np.arange(12))
    assert not dropped.ok
  finally:
    direct_io.use_direct_io = was_direct
    dropped.close()
