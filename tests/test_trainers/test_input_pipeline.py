import numpy as np

from schemas.shards import PackedRecords
from trainers.input_pipeline import batch_indices, prefetched


def test_prefetched_batches_equal_direct_reads_in_step_order(shard_dir):
  records = PackedRecords(str(shard_dir), "train")
  read_step = lambda step: records.read(batch_indices(len(records), 3, step, seed=5), fields=("labels",))
  got = list(prefetched(read_step, range(4, 11), depth=2))
  assert [step for step, _ in got] == list(range(4, 11))
  for step, batch in got:
    np.testing.assert_array_equal(batch["labels"], read_step(step)["labels"])
  records.close()
