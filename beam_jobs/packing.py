"""Packing images into fixed-length sequences (NaViT's Patch n' Pack).

Every packer takes (key, num_tokens) items and returns bins as lists of keys; a bin holds at most `seq_len`
tokens and at most `max_images` items. The production path is `pack_best_fit_decreasing` over large windows of
items, with the partly filled bins of every window released into one tail pool that is packed again
(`pack_window` + `pack_windowed`), so only the last bin or two of a whole split are left partly filled. The
other packers are the baselines the packing benchmark compares against.
"""

import bisect
import hashlib
from typing import Hashable, Iterable, Sequence

Item = tuple[Hashable, int]

# A window's bin with more than this fraction of its tokens free (and room for another image) goes back to the
# tail pool: the window ran out of items small enough to fill it, the pool of all windows may not have.
TAIL_FRACTION = 0.05


def _check_items(items: Sequence[Item], seq_len: int, max_images: int) -> None:
  if seq_len < 1 or max_images < 1:
    raise ValueError(f"seq_len ({seq_len}) and max_images ({max_images}) must be >= 1")
  seen = set()
  for key, tokens in items:
    if not 1 <= tokens <= seq_len:
      raise ValueError(f"item {key!r}: {tokens} tokens does not fit a sequence of {seq_len}")
    if key in seen:
      raise ValueError(f"item {key!r}: key appears twice")
    seen.add(key)


def pack_best_fit_decreasing(items: Sequence[Item], seq_len: int, max_images: int) -> list[list[Hashable]]:
  """Best-fit decreasing: items from largest to smallest, each into the open bin it leaves the least room in.

  Ties are broken by key (items) and by bin creation order (bins), so the result depends only on the set of
  items, never on their arrival order (Beam gives no order guarantee). A bin with `max_images` items or no
  room left is closed. O(n log n) comparisons; bins are returned in creation order, keys in insertion order.
  """
  _check_items(items, seq_len, max_images)
  bins: list[list[Hashable]] = []
  open_bins: list[tuple[int, int]] = []  # sorted (free tokens, bin index) of bins that can take another item.
  for key, tokens in sorted(items, key=lambda kv: (-kv[1], kv[0])):
    at = bisect.bisect_left(open_bins, (tokens, -1))
    if at < len(open_bins):
      free, b = open_bins.pop(at)
    else:
      free, b = seq_len, len(bins)
      bins.append([])
    bins[b].append(key)
    free -= tokens
    if free > 0 and len(bins[b]) < max_images:
      bisect.insort(open_bins, (free, b))
  return bins


def pack_first_fit_decreasing(items: Sequence[Item], seq_len: int, max_images: int) -> list[list[Hashable]]:
  """First-fit decreasing (the spine's packer), kept as a reference point."""
  _check_items(items, seq_len, max_images)
  bins: list[list[Hashable]] = []
  free: list[int] = []
  for key, tokens in sorted(items, key=lambda kv: (-kv[1], kv[0])):
    for b, room in enumerate(free):
      if room >= tokens and len(bins[b]) < max_images:
        bins[b].append(key)
        free[b] -= tokens
        break
    else:
      bins.append([key])
      free.append(seq_len - tokens)
  return bins


def pack_window(items: Sequence[Item], seq_len: int, max_images: int,
                tail_fraction: float = TAIL_FRACTION) -> tuple[list[list[Hashable]], list[Item]]:
  """Packs one window; returns (finished bins, tail items). Bins left with more than `tail_fraction` of
  `seq_len` free and room for another image are undone and their items returned for the tail pool."""
  sizes = dict(items)
  finished, tail = [], []
  for keys in pack_best_fit_decreasing(items, seq_len, max_images):
    free = seq_len - sum(sizes[k] for k in keys)
    if free > tail_fraction * seq_len and len(keys) < max_images:
      tail.extend((k, sizes[k]) for k in keys)
    else:
      finished.append(keys)
  return finished, tail


def stable_hash(key: str) -> int:
  """A 64-bit hash of a string that is the same in every process (Python's hash() is salted per process)."""
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def num_windows(num_items: int, window_size: int) -> int:
  return max(1, -(-num_items // window_size))


def window_of(key: str, windows: int) -> int:
  return stable_hash(key) % windows


def pack_windowed(items: Sequence[tuple[str, int]], seq_len: int, max_images: int, window_size: int,
                  tail_fraction: float = TAIL_FRACTION) -> list[list[str]]:
  """The whole production packing in one process (the Beam job runs the same steps in parallel): items go to
  windows by a hash of their key, each window is packed best-fit decreasing, and the partly filled bins of all
  windows are packed again together. Keys must be strings (they are hashed)."""
  windows = num_windows(len(items), window_size)
  by_window: dict[int, list[tuple[str, int]]] = {}
  for key, tokens in items:
    by_window.setdefault(window_of(key, windows), []).append((key, tokens))
  bins, tail = [], []
  for w in sorted(by_window):
    finished, released = pack_window(by_window[w], seq_len, max_images, tail_fraction)
    bins += finished
    tail += released
  return bins + pack_best_fit_decreasing(tail, seq_len, max_images)


def pack_none(items: Iterable[Item], seq_len: int, max_images: int) -> list[list[Hashable]]:
  """Baseline: one image per sequence."""
  return [[key] for key, _ in items]


def pack_sequential(items: Iterable[Item], seq_len: int, max_images: int) -> list[list[Hashable]]:
  """Baseline: one open bin, closed as soon as the next item (in arrival order) does not fit."""
  bins: list[list[Hashable]] = []
  current: list[Hashable] = []
  used = 0
  for key, tokens in items:
    if current and (used + tokens > seq_len or len(current) >= max_images):
      bins.append(current)
      current, used = [], 0
    current.append(key)
    used += tokens
  if current:
    bins.append(current)
  return bins


def pack_first_fit_open_bins(items: Iterable[Item], seq_len: int, max_images: int,
                             open_limit: int = 64) -> list[list[Hashable]]:
  """Baseline: first fit over at most `open_limit` open bins, in arrival order; when none fits and the limit
  is reached, the fullest open bin is closed to make room."""
  closed: list[list[Hashable]] = []
  open_bins: list[tuple[list[Hashable], int]] = []  # (keys, used tokens)
  for key, tokens in items:
    for i, (keys, used) in enumerate(open_bins):
      if used + tokens <= seq_len and len(keys) < max_images:
        keys.append(key)
        open_bins[i] = (keys, used + tokens)
        break
    else:
      if len(open_bins) >= open_limit:
        fullest = max(range(len(open_bins)), key=lambda i: open_bins[i][1])
        closed.append(open_bins.pop(fullest)[0])
      open_bins.append(([key], tokens))
  return closed + [keys for keys, _ in open_bins]


def packing_efficiency(bins: Sequence[Sequence[Hashable]], sizes: dict, seq_len: int) -> float:
  """Real tokens over (sequences x seq_len)."""
  return sum(sizes[k] for b in bins for k in b) / max(1, len(bins) * seq_len)
