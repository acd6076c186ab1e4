"""Cost of the shard builder's whole-file check at planning, per image, next to reading the header alone
(what planning did before) and a full decode.

  .venv/bin/python benchmarks/plan_check.py [--images 300] [--reps 5]

Uses the 256x256 JPEGs of shard_throughput.py and the same images saved as PNG; the variants run interleaved,
pass by pass, and the median of the passes is printed.
"""

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def header_only(data: bytes):
  from beam_jobs import image_ops
  with image_ops.open_image(data) as image:
    return image_ops.oriented_size(image)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=300)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args(argv)
  from beam_jobs import image_ops
  from shard_throughput import write_jpegs
  with tempfile.TemporaryDirectory() as tmp:
    write_jpegs(tmp, args.images)
    jpegs = [open(os.path.join(tmp, f"img{i:06d}.jpg"), "rb").read() for i in range(args.images)]
  pngs = []
  for data in jpegs:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format="PNG")
    pngs.append(buffer.getvalue())
  variants = [("header only (before)", header_only), ("whole_image_size", image_ops.whole_image_size),
              ("full decode", image_ops.decode_rgb)]
  times: dict[tuple[str, str], list[float]] = {}
  for _ in range(args.reps):
    for name, fn in variants:
      for fmt, files in (("JPEG", jpegs), ("PNG", pngs)):
        start = time.perf_counter()
        for data in files:
          fn(data)
        times.setdefault((name, fmt), []).append((time.perf_counter() - start) / len(files) * 1e3)
  print(f"{args.images} images of 256x256: JPEG {np.mean([len(d) for d in jpegs]) / 1024:.1f} KiB, "
        f"PNG {np.mean([len(d) for d in pngs]) / 1024:.1f} KiB; median of {args.reps} passes, ms per image")
  print(f"{'':24s} {'JPEG':>8s} {'PNG':>8s}")
  for name, _ in variants:
    print(f"{name:24s} {np.median(times[(name, 'JPEG')]):8.4f} {np.median(times[(name, 'PNG')]):8.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
