"""The batch of step n as a pure function of (seed, n, data), so a resumed run sees exactly the batches an
uninterrupted one would.

The trainer never loads a split: it reads the records a batch needs from `schemas.shards.PackedRecords`, and
`prefetched` reads the next batches on a thread while the current step runs, so host memory holds a few
batches, not the data.
"""

import concurrent.futures

import numpy as np

MODEL_INPUTS = ("patches", "patch_yx", "segment_ids", "image_grid", "labels")


def prefetched(read_step, steps, depth: int = 2):
  """Yields (step, read_step(step)) for each step, reading up to `depth` steps ahead on a thread."""
  steps = list(steps)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    pending = [pool.submit(read_step, s) for s in steps[:depth]]
    for n, step in enumerate(steps):
      batch = pending.pop(0).result()
      if n + depth < len(steps):
        pending.append(pool.submit(read_step, steps[n + depth]))
      yield step, batch


def batch_indices(num_sequences: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of the batch at `step`: epochs are seeded permutations, batches wrap across epochs."""
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start + len(out), num_sequences)
    order = np.random.default_rng([seed, epoch]).permutation(num_sequences)
    out.extend(order[offset:offset + batch_size - len(out)])
  return np.asarray(out)
