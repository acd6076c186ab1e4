import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from beam_jobs.options import ShardOptions
from beam_jobs.pack import PackWindow, pack_tail, split_stats, window_batches
from beam_jobs.plan import Planned
from beam_jobs.runtime import from_blob, to_blob
from beam_jobs.sources import SourceExample
from schemas.manifest import ManifestRecord


def _planned(rid, tokens, split="train"):
  record = ManifestRecord(id=rid, label=0, image=f"{rid}.png", split=split, line=int(rid[1:]) + 1)
  return Planned(SourceExample(record, (f"/x/{rid}.png",)), 1, tokens, 1, tokens)


def test_windows_and_tail_pool_assign_every_example_once_within_both_limits():
  rng = np.random.default_rng(0)
  planned = [_planned(f"e{i}", int(t)) for i, t in enumerate(rng.integers(1, 100, 300))]
  options = ShardOptions(seq_len=128, max_images=4, num_shards=3, window_size=50)
  stats = split_stats(planned)
  sizes = {p.id: p.tokens for p in planned}

  def check(assigned):
    bins = {}
    for (split, shard, n), batch in assigned:
      assert split == "train" and n == 3 and 0 <= shard < 3
      for h, slot, p in from_blob(batch):
        bins.setdefault((shard, h), []).append((slot, p.id))
    ids = [rid for members in bins.values() for _, rid in members]
    assert sorted(ids) == sorted(sizes)
    for members in bins.values():
      assert sorted(s for s, _ in members) == list(range(len(members)))
      assert len(members) <= 4 and sum(sizes[rid] for _, rid in members) <= 128
    assert len({shard for shard, _ in bins}) == 3

  with TestPipeline(runner="FnApiRunner") as p:
    stats_side = beam.pvalue.AsDict(p | "Stats" >> beam.Create(list(stats.items())))
    blobs = [to_blob(planned[i:i + 37]) for i in range(0, len(planned), 37)]  # as PlanExamples emits them
    windows = (p | beam.Create(blobs)
               | beam.FlatMap(window_batches, stats_side, options)  # 300 examples in windows of 50
               | beam.GroupByKey()
               | beam.ParDo(PackWindow(options), stats_side).with_outputs("tail", "errors", "labels",
                                                                          main="assigned"))
    tail = windows.tail | "GroupTail" >> beam.GroupByKey() | beam.FlatMap(pack_tail, stats_side, options)
    assert_that((windows.assigned, tail) | beam.Flatten() | beam.combiners.ToList(),
                lambda lists: check(lists[0]))
