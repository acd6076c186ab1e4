"""The shard builder's second stage: plans -> bins of at most `seq_len` tokens and `max_images` images, dealt to
shards.

Windows are a hash of the id over all splits, so all records of one id meet in one window, where duplicates are
resolved (the first line wins) and each split's examples are packed best-fit decreasing. The examples of partly
filled bins go to one tail pool per split, packed the same way. Bins are ordered by a hash of their content and
dealt round-robin, so the assignment depends only on the content.
"""

import hashlib
import math
from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs import packing
from beam_jobs.options import ShardOptions
from beam_jobs.plan import Planned, Unplannable
from beam_jobs.runtime import NAMESPACE, from_blob, to_blob
from beam_jobs.sources import error_row


def split_stats(planned: Iterable["Planned | Unplannable"]) -> dict[str, tuple[int, int]]:
  """split -> (examples, tokens) of the planned examples; the Beam job computes the same with a combiner."""
  out: dict[str, tuple[int, int]] = {}
  for p in planned:
    if isinstance(p, Planned):
      count, tokens = out.get(p.split, (0, 0))
      out[p.split] = (count + 1, tokens + p.tokens)
  return out


def split_tokens(blob: bytes):
  """A blob of plans -> (split, (examples, tokens)) per split in it, summed by the job into `split_stats`."""
  yield from split_stats(from_blob(blob)).items()


def sum_pairs(pairs) -> tuple[int, int]:
  """The job's combiner of `split_tokens`: (examples, tokens) pairs summed."""
  count, tokens = 0, 0
  for c, t in pairs:
    count, tokens = count + c, tokens + t
  return count, tokens


def shards_for_split(stats: tuple[int, int], options: ShardOptions) -> int:
  """Shards of a split: `num_shards`, fewer for a split too small to give every shard a sequence."""
  return max(1, min(options.num_shards, math.ceil(stats[1] / options.seq_len)))


def window_batches(blob: bytes, stats: dict[str, tuple[int, int]], options: ShardOptions):
  """A blob of plans -> (window, blob) per window it touches. Windows by a hash of the id over all splits, so
  all records of one id meet in one window."""
  windows = packing.num_windows(sum(count for count, _ in stats.values()), options.window_size)
  by_window: dict[int, list] = {}
  for item in from_blob(blob):
    by_window.setdefault(packing.window_of(item.id, windows), []).append(item)
  for window, items in sorted(by_window.items()):
    yield window, to_blob(items)


class PackWindow(beam.DoFn):
  """One window: duplicate ids resolved (the lowest line wins, the others are errors), unplannable winners
  become errors, then each split's examples are packed best-fit decreasing. Finished bins are assigned to
  shards; the examples of partly filled bins go to the tail pool of their split. Also emits the window's
  largest label, its tubelets' included (for num_classes)."""

  def __init__(self, options: ShardOptions):
    self._options = options
    self._tail = Metrics.counter(NAMESPACE, "examples_to_tail_pool")
    self._duplicates = Metrics.counter(NAMESPACE, "duplicate_ids")

  def process(self, window_and_blobs, stats):
    window, blobs = window_and_blobs
    items = [item for blob in blobs for item in from_blob(blob)]
    opts = self._options
    by_id: dict[str, list] = {}
    max_label = -1
    for item in items:
      by_id.setdefault(item.id, []).append(item)
      record = item.example.record
      max_label = max(max_label, -1 if record.label is None else record.label,
                      *(tube.label for tube in record.tubelets or ()))
    yield beam.pvalue.TaggedOutput("labels", max_label)
    by_split: dict[str, list[Planned]] = {}
    for rid in sorted(by_id):
      first, *duplicates = sorted(by_id[rid], key=lambda it: it.line)
      for dup in duplicates:
        self._duplicates.inc()
        yield beam.pvalue.TaggedOutput(
            "errors", error_row(dup.line, rid, "duplicate_id", f"id {rid!r} first seen on line {first.line}"))
      if isinstance(first, Unplannable):
        yield beam.pvalue.TaggedOutput("errors", error_row(first.line, rid, first.reason, first.detail))
      else:
        by_split.setdefault(first.split, []).append(first)
    for split in sorted(by_split):
      planned = {p.id: p for p in by_split[split]}
      finished, tail = packing.pack_window([(p.id, p.tokens) for p in by_split[split]], opts.seq_len,
                                           opts.max_images)
      yield from assign_bins(split, [[planned[k] for k in b] for b in finished], f"window{window}",
                             shards_for_split(stats[split], opts))
      self._tail.inc(len(tail))
      if tail:
        yield beam.pvalue.TaggedOutput("tail", (split, to_blob([planned[k] for k, _ in tail])))


def pack_tail(split_and_blobs, stats, options: ShardOptions):
  split, blobs = split_and_blobs
  bins = pack_planned([p for blob in blobs for p in from_blob(blob)], options)
  yield from assign_bins(split, bins, "tail", shards_for_split(stats[split], options))


def pack_planned(planned: list[Planned], options: ShardOptions) -> list[list[Planned]]:
  by_id = {p.id: p for p in planned}
  bins = packing.pack_best_fit_decreasing([(p.id, p.tokens) for p in planned], options.seq_len, options.max_images)
  return [[by_id[k] for k in b] for b in bins]


def bin_hash(split: str, ids: list[str]) -> str:
  return hashlib.sha256("\0".join([split] + ids).encode("utf-8")).hexdigest()[:32]


def assign_bins(split: str, bins: list[list[Planned]], salt: str, num_shards: int):
  """Bins -> ((split, shard, n), blob of [(bin hash, slot, planned), ...]), one element per shard that gets
  bins (Beam moves a few big elements much more cheaply than many small ones). Bins are ordered by a hash of their
  content and dealt round-robin from an offset drawn from `salt`, so shards are balanced and the assignment
  depends only on the content."""
  hashed = sorted((bin_hash(split, [p.id for p in b]), b) for b in bins)
  offset = packing.stable_hash(f"{split}\0{salt}") % num_shards
  per_shard: dict[tuple[str, int, int], list] = {}
  for rank, (h, members) in enumerate(hashed):
    key = (split, (offset + rank) % num_shards, num_shards)
    per_shard.setdefault(key, []).extend((h, slot, p) for slot, p in enumerate(members))
  for key in sorted(per_shard):
    yield key, to_blob(per_shard[key])


def empty_shard_markers(split_and_stats, options: ShardOptions):
  """One marker per shard of a split, so a shard that no bin lands in is still written (empty)."""
  split, stats = split_and_stats
  n = shards_for_split(stats, options)
  for shard in range(n):
    yield (split, shard, n), None
