"""Cost of the shard builder's whole-file check at planning, per image, next to reading the header alone
(what planning did before) and a full decode; and whether the JPEG marker walk pays: the check and the whole of
planning one image (`plan_example`: read the file, check it, fit its grid) with the walk, and with PIL reading
the JPEG header instead (the same whole-file checks).

  .venv/bin/python benchmarks/plan_check.py [--images 300] [--reps 5]

Uses the 256x256 JPEGs of shard_throughput.py and the same images saved as PNG; the variants run interleaved,
pass by pass, and the median of the passes is printed.
"""

import argparse
import contextlib
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


@contextlib.contextmanager
def marker_walk(on: bool):
  """The JPEG marker walk as it is, or stepping aside for every file (so PIL reads every header)."""
  from beam_jobs import image_ops
  walk = image_ops._jpeg_header
  image_ops._jpeg_header = walk if on else (lambda data: None)
  try:
    yield
  finally:
    image_ops._jpeg_header = walk


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=300)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args(argv)
  from beam_jobs import image_ops
  from beam_jobs.options import ShardOptions
  from beam_jobs.plan import plan_example
  from beam_jobs.sources import SourceExample
  from schemas.manifest import ManifestRecord
  from shard_throughput import write_jpegs
  options = ShardOptions(seq_len=1024, patch_size=16, max_images=16, max_patches_per_image=256)
  with tempfile.TemporaryDirectory() as tmp:
    write_jpegs(tmp, args.images)
    files = {"JPEG": [os.path.join(tmp, f"img{i:06d}.jpg") for i in range(args.images)]}
    jpegs = [open(path, "rb").read() for path in files["JPEG"]]
    pngs = []
    for data in jpegs:
      buffer = io.BytesIO()
      Image.open(io.BytesIO(data)).save(buffer, format="PNG")
      pngs.append(buffer.getvalue())
    files["PNG"] = [path[:-len(".jpg")] + ".png" for path in files["JPEG"]]
    for path, data in zip(files["PNG"], pngs):
      with open(path, "wb") as f:
        f.write(data)
    examples = {fmt: [SourceExample(ManifestRecord(id=os.path.basename(p), label=0, image=p, line=1), (p,))
                      for p in paths] for fmt, paths in files.items()}
    plan = lambda example: plan_example(example, options)
    # (name, function, its inputs: encoded bytes or planned examples, marker walk on)
    variants = [("header only (before)", header_only, "bytes", True),
                ("whole_image_size", image_ops.whole_image_size, "bytes", True),
                ("  PIL reads JPEG header", image_ops.whole_image_size, "bytes", False),
                ("plan_example", plan, "examples", True),
                ("  PIL reads JPEG header", plan, "examples", False),
                ("full decode", image_ops.decode_rgb, "bytes", True)]
    inputs = {"bytes": {"JPEG": jpegs, "PNG": pngs}, "examples": examples}
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.reps):
      for v, (_, fn, kind, walk) in enumerate(variants):
        for fmt in ("JPEG", "PNG"):
          with marker_walk(walk):
            start = time.perf_counter()
            for item in inputs[kind][fmt]:
              fn(item)
            times.setdefault((v, fmt), []).append((time.perf_counter() - start) / args.images * 1e3)
  print(f"{args.images} images of 256x256: JPEG {np.mean([len(d) for d in jpegs]) / 1024:.1f} KiB, "
        f"PNG {np.mean([len(d) for d in pngs]) / 1024:.1f} KiB; median of {args.reps} passes, ms per image")
  print(f"{'':24s} {'JPEG':>8s} {'PNG':>8s}")
  for v, (name, _, _, _) in enumerate(variants):
    print(f"{name:24s} {np.median(times[(v, 'JPEG')]):8.4f} {np.median(times[(v, 'PNG')]):8.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
