"""What checking each shard against dataset_info.json costs a reader at open.

  .venv/bin/python benchmarks/shard_open.py [--shards DIR] [--reps 30]

Builds the demo's shards (the smoke pipeline's data and shard options) unless --shards names a directory,
then opens every split with `schemas.shards.PackedRecords` (the index walk over the framing, which now also
gives each shard's size and CRC digest to check) and, for scale, reads every shard whole for its sha256 (the
check a reader would make from the sha256 that dataset_info.json also records). Medians of --reps passes, the
page cache warm.
"""

import argparse
import hashlib
import os
import statistics
import tempfile
import time


def demo_shards(directory: str) -> str:
  from beam_jobs.build_shards import build_shards
  from beam_jobs.options import ShardOptions
  build_shards("synthetic:seed=0,train=600,val=150,test=150", directory,
               ShardOptions(seq_len=256, patch_size=16, max_images=16, max_patches_per_image=64, num_shards=2))
  return directory


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shards", default=None)
  parser.add_argument("--reps", type=int, default=30)
  args = parser.parse_args()
  from schemas.dataset_info import read_dataset_info
  from schemas.shards import PackedRecords
  directory = args.shards or demo_shards(os.path.join(tempfile.mkdtemp(), "shards"))
  info = read_dataset_info(directory)
  shards = info["shards"]

  def open_all():
    for split in info["splits"]:
      PackedRecords(directory, split, info).close()

  def sha256_all():
    for shard in shards:
      with open(os.path.join(directory, shard["path"]), "rb") as f:
        hashlib.sha256(f.read()).hexdigest()

  for name, run in (("open with the per-shard check", open_all), ("sha256 of every shard", sha256_all)):
    run()
    times = []
    for _ in range(args.reps):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    print(f"{name}: {statistics.median(times) * 1e3 / len(shards):.3f} ms per shard "
          f"({len(shards)} shards, {info['num_sequences']} sequences, "
          f"{sum(s.get('num_bytes', 0) for s in shards) / 1e6:.1f} MB)")


if __name__ == "__main__":
  main()
