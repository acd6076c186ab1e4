"""Packing efficiency on the reference mix, side by side: no packing, one open bin (what public NaViT code
does), first fit over 64 open bins (NaViT's reported <2% padding), and ours (best-fit decreasing over windows,
with the partly filled bins of all windows packed again).

  .venv/bin/python benchmarks/packing.py [--images 20000] [--seed 0]

The reference mix: image sizes with aspect ratio log-uniform in [1/3, 3] and the longer side uniform in
[64, 512] px, patch 16, each image's grid from `image_ops.fit_patch_grid` with a budget of L patches (at
L=1024 every image keeps its native grid; at L=256 the bigger ones are scaled down to at most 256 patches).
Efficiency = real tokens / (sequences x L). Baselines see the images in their (random) arrival order.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from beam_jobs import packing  # noqa: E402
from beam_jobs.image_ops import fit_patch_grid  # noqa: E402

SETTINGS = ((1024, 64), (256, 32))  # (L, M)


def reference_mix(n: int, budget: int, seed: int = 0, patch: int = 16) -> list[tuple[str, int]]:
  rng = np.random.default_rng(seed)
  aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), n))
  longer = rng.uniform(64, 512, n)
  items = []
  for i, (a, side) in enumerate(zip(aspect, longer)):
    h, w = (side / a, side) if a >= 1 else (side, side * a)
    rows, cols = fit_patch_grid(int(round(h)), int(round(w)), patch, budget)
    items.append((f"img{i:06d}", rows * cols))
  return items


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=20000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  packers = [
      ("no packing (1 image/sequence)", packing.pack_none),
      ("sequential, one open bin", packing.pack_sequential),
      ("first fit, 64 open bins", packing.pack_first_fit_open_bins),
      ("ours: BFD, window 65536 + tail", lambda i, L, M: packing.pack_windowed(i, L, M, 65536)),
      ("ours: BFD, window 2048 + tail", lambda i, L, M: packing.pack_windowed(i, L, M, 2048)),
  ]
  results = {}
  for seq_len, max_images in SETTINGS:
    items = reference_mix(args.images, seq_len, args.seed)
    sizes = dict(items)
    for name, packer in packers:
      start = time.perf_counter()
      bins = packer(items, seq_len, max_images)
      seconds = time.perf_counter() - start
      assert sorted(k for b in bins for k in b) == sorted(sizes)
      assert all(len(b) <= max_images and sum(sizes[k] for k in b) <= seq_len for b in bins)
      results[(name, seq_len)] = (packing.packing_efficiency(bins, sizes, seq_len), len(bins), seconds)
    tokens = sum(sizes.values())
    # No packing can use fewer sequences than the token volume needs, nor than there are images of more than
    # half a sequence (no two of them fit together).
    bound = max(-(-tokens // seq_len), sum(t > seq_len // 2 for t in sizes.values()))
    results[("upper bound (fewest sequences)", seq_len)] = (tokens / (bound * seq_len), bound, 0.0)
    print(f"L={seq_len} M={max_images}: {len(items)} images, {tokens} tokens, mean {tokens / len(items):.1f} "
          f"tokens/image, at least {bound} sequences")
  header = "".join(f"{f'L={L} M={M}':>28s}" for L, M in SETTINGS)
  print(f"\n{'packer':32s}{header}")
  print(f"{'':32s}" + "".join(f"{'efficiency':>12s}{'seqs':>8s}{'sec':>8s}" for _ in SETTINGS))
  for name, _ in packers + [("upper bound (fewest sequences)", None)]:
    row = "".join(f"{results[(name, L)][0]:12.4f}{results[(name, L)][1]:8d}{results[(name, L)][2]:8.2f}"
                  for L, _ in SETTINGS)
    print(f"{name:32s}{row}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
