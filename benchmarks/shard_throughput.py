"""Shard builder throughput: images per second per core through the whole job, next to the floor of
decoding the same JPEGs alone with PIL in a plain loop.

  .venv/bin/python benchmarks/shard_throughput.py [--images 4000] [--runs 1 2:threads 2:processes] [--reps 3]

Writes 256x256 JPEGs (quality 90, gradients plus noise and shapes, ~20 KiB each) to a temporary directory,
then measures, in rounds that each run every variant once (so a change in the machine's load hits all of
them), with one more floor after the last round so that every job run has a floor just before and just after it:
(1) the floor: read + PIL decode to an RGB array in a plain loop, one core; (2) `build_shards` on the
in-process runner with 1 worker, 2 worker threads and 2 worker processes (the shards of every run are checked
to be identical). The job is timed from the call to its return, so Beam's start-up is included. L=1024, P=16, M=16, budget 256
patches (a 256x256 image is exactly 16x16 patches, 4 per sequence).

Each round also times a 16-image job, which is almost all Beam start-up and pipeline construction, paid once per
run: the last line puts it next to the whole job.

Every run writes into a fresh directory, as a first build into an empty directory does (while shards went through
the page cache, renaming one over the last round's made ext4 flush it first, 0.2-0.4 s per run here).

The "of it sys" column is the kernel's part of the CPU seconds: reading the JPEGs, memory the process maps, and
for the job its file system work (local shards are written with O_DIRECT, so not copied into the page cache).

Two figures per row: per core by wall clock (images / seconds / cores used) and per CPU-second (images /
CPU seconds of this process and its worker processes). On a machine shared with other jobs the wall-clock
figure moves with their load; the CPU-second figure does not.
"""

import argparse
import io
import itertools
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_jpegs(directory: str, count: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 255.0
  records = []
  for i in range(count):
    a, b, c = rng.uniform(0, 255, 3)
    base = np.stack([a * yy + (255 - a) * xx, b * xx, c * (1 - yy)], -1) * 0.8
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
      x0, y0 = rng.integers(0, 200, 2)
      draw.ellipse([x0, y0, x0 + rng.integers(20, 56), y0 + rng.integers(20, 56)], fill=tuple(rng.integers(0, 256, 3)))
    name = f"img{i:06d}.jpg"
    image.save(os.path.join(directory, name), format="JPEG", quality=90)
    records.append({"id": f"img{i:06d}", "image": name, "label": i % 10})
  manifest = os.path.join(directory, "manifest.jsonl")
  with open(manifest, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return manifest


def _clocks() -> tuple[float, float, float]:
  """(wall, user + system CPU, system CPU) of this process and of its finished children (the Beam workers)."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  system = own.ru_stime + children.ru_stime
  return time.perf_counter(), own.ru_utime + children.ru_utime + system, system


def measured(fn, *args, **kwargs):
  """fn's result and its (wall s, CPU s, of it system s)."""
  before = _clocks()
  result = fn(*args, **kwargs)
  return result, tuple(after - start for after, start in zip(_clocks(), before))


def bracketed_ratios(runs: list[float], floors: list[float]) -> list[float]:
  """Each run's seconds over the mean of the floors timed just before and just after it (floors[i] and
  floors[i + 1]): the machine's speed drifts within minutes here, and the mean of the two cancels a steady drift."""
  if len(floors) != len(runs) + 1:
    raise ValueError(f"{len(runs)} runs need {len(runs) + 1} floors around them, got {len(floors)}")
  return [run / ((before + after) / 2) for run, before, after in zip(runs, floors, floors[1:])]


def pil_floor(directory: str, count: int) -> None:
  for i in range(count):
    with open(os.path.join(directory, f"img{i:06d}.jpg"), "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (256, 256, 3)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=4000)
  parser.add_argument("--runs", nargs="+", default=["1", "2:threads", "2:processes"],
                      help="job runs as WORKERS[:threads|processes]")
  parser.add_argument("--reps", type=int, default=3, help="rounds; each round runs the floor and every job once")
  args = parser.parse_args(argv)
  from beam_jobs.build_shards import build_shards
  from beam_jobs.options import ShardOptions
  options = ShardOptions(seq_len=1024, patch_size=16, max_images=16, max_patches_per_image=256, num_shards=8)
  names = ["PIL decode loop (floor)"]
  cores = {names[0]: 1}
  for run in args.runs:
    workers, _, mode = run.partition(":")
    names.append(f"build_shards, {workers} {mode or 'worker'}")
    cores[names[-1]] = int(workers)
  times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}  # (wall, CPU, of it system)
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    manifest = write_jpegs(tmp, args.images)
    print(f"wrote {args.images} JPEGs of 256x256 ({sum(os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp)) / args.images / 1024:.1f} KiB each) "
          f"in {time.perf_counter() - t:.1f} s", flush=True)
    pil_floor(tmp, min(200, args.images))  # warm the page cache and PIL
    tiny = os.path.join(tmp, "tiny.jsonl")  # a 16-image job: what every run pays for Beam's start-up
    with open(manifest) as f, open(tiny, "w") as out:
      out.writelines(itertools.islice(f, 16))
    startup: list[tuple[float, float, float]] = []
    digests = set()
    for _ in range(args.reps):  # interleaved: every round measures every variant under the same load
      times[names[0]].append(measured(pil_floor, tmp, args.images)[1])
      shutil.rmtree(os.path.join(tmp, "shards-tiny"), ignore_errors=True)
      startup.append(measured(build_shards, tiny, os.path.join(tmp, "shards-tiny"), options, workers=1)[1])
      for name, run in zip(names[1:], args.runs):
        workers, _, mode = run.partition(":")
        beam_args = [f"--direct_running_mode={dict(threads='multi_threading', processes='multi_processing')[mode]}"] if mode else []
        out = os.path.join(tmp, f"shards-{run.replace(':', '-')}")
        shutil.rmtree(out, ignore_errors=True)  # untimed: every run starts from an empty directory, as a first build
        info, clocks = measured(build_shards, manifest, out, options, workers=int(workers), beam_args=beam_args)
        times[name].append(clocks)
        assert info["num_examples"] == args.images, info["num_examples"]
        digests.add(tuple(s["sha256"] for s in info["shards"]))
    times[names[0]].append(measured(pil_floor, tmp, args.images)[1])  # closes the last round's bracket
    assert len(digests) == 1, "runs gave different shards"
  n = args.images
  print(f"\n{n} images, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; median of "
        f"{args.reps} interleaved rounds (of the floor's {args.reps + 1} runs); floor/this is the median over rounds "
        f"of that round's ratio to the mean of the floors run just before and just after it")
  print(f"{'':28s} {'cores':>5s} {'wall s':>7s} {'img/s/core':>10s} {'floor/this':>10s} {'CPU s':>7s} "
        f"{'img/CPU-s':>9s} {'floor/this':>10s} {'of it sys':>9s}  rounds' CPU ratios")
  floors = times[names[0]]
  for name in names:
    wall, cpu, system = np.median(times[name], axis=0)
    if name == names[0]:
      wall_ratio = cpu_ratio = 1.0
      rounds = ""
    else:
      walls = [w * cores[name] for w, _, _ in times[name]]  # core-seconds by the wall clock
      cpu_ratios = bracketed_ratios([c for _, c, _ in times[name]], [c for _, c, _ in floors])
      wall_ratio = np.median(bracketed_ratios(walls, [w for w, _, _ in floors]))
      cpu_ratio = np.median(cpu_ratios)
      rounds = " ".join(f"{r:.2f}" for r in cpu_ratios)
    print(f"{name:28s} {cores[name]:5d} {wall:7.2f} {n / wall / cores[name]:10.1f} {wall_ratio:10.2f} "
          f"{cpu:7.2f} {n / cpu:9.1f} {cpu_ratio:10.2f} {system:9.2f}  {rounds}")
  tiny_wall, tiny_cpu, _ = np.median(startup, axis=0)
  job_cpu = np.median([c for _, c, _ in times[names[1]]]) if len(names) > 1 else float("nan")
  print(f"Beam's start-up: a 16-image job takes {tiny_wall:.2f} s wall, {tiny_cpu:.2f} CPU-s ({tiny_cpu / job_cpu:.0%} "
        f"of the first job above); it is paid once per run, whatever the number of images")
  return 0


if __name__ == "__main__":
  sys.exit(main())
