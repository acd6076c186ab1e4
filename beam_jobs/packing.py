"""Packing images into fixed-length sequences (NaViT's Patch n' Pack)."""

from typing import Hashable, Sequence


def pack_first_fit_decreasing(items: Sequence[tuple[Hashable, int]], seq_len: int,
                              max_images: int) -> list[list[Hashable]]:
  """Packs (key, num_tokens) items into bins of at most `seq_len` tokens and `max_images` items.

  First-fit decreasing, ties broken by key, so the result depends only on the multiset of items and not on
  their arrival order (Beam gives no order guarantee). Returns bins as lists of keys, in creation order.
  """
  bins: list[list[Hashable]] = []
  free: list[int] = []
  for key, tokens in sorted(items, key=lambda kv: (-kv[1], kv[0])):
    if not 1 <= tokens <= seq_len:
      raise ValueError(f"item {key!r}: {tokens} tokens does not fit a sequence of {seq_len}")
    for b, room in enumerate(free):
      if room >= tokens and len(bins[b]) < max_images:
        bins[b].append(key)
        free[b] -= tokens
        break
    else:
      bins.append([key])
      free.append(seq_len - tokens)
  return bins
