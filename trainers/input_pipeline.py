"""The batch of step n as a pure function of (seed, n, data), so a resumed run sees exactly the batches an
uninterrupted one would.

Step n's batch comes whole from one dataset of the mixture, drawn by weight (`mixture_draws`), and is that
dataset's k-th batch, k counting its earlier draws (`batch_indices`). The trainer never loads a split: it reads
the records a batch needs from `schemas.shards.PackedRecords`, and `prefetched` reads the next batches on a
thread while the current step runs, so host memory holds a few batches, not the data.
"""

import concurrent.futures

import numpy as np

# Step n's draw is uniform number n % DRAW_BLOCK of its block's seeded stream, so it depends on (seed, n) and
# not on how many steps the run has; DRAW_STREAM keeps these streams apart from batch_indices' epoch streams.
DRAW_BLOCK = 4096
DRAW_STREAM = 0x6D6978


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


def mixture_draws(weights, seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """For steps 0..steps-1: the dataset (index into weights) each step's batch comes from, drawn with
  probability weight / sum(weights), and that dataset's batch number (how many batches it gave before)."""
  cumulative = np.cumsum(weights, dtype=np.float64) / np.sum(weights, dtype=np.float64)
  blocks = [np.random.default_rng([seed, DRAW_STREAM, block]).random(DRAW_BLOCK)
            for block in range(-(-steps // DRAW_BLOCK))]
  uniform = np.concatenate(blocks)[:steps] if blocks else np.zeros(0)
  dataset = np.minimum(np.searchsorted(cumulative, uniform, side="right"), len(weights) - 1)
  batch = np.zeros(steps, np.int64)
  for d in range(len(weights)):
    batch[dataset == d] = np.arange(np.count_nonzero(dataset == d))
  return dataset, batch
