"""Shard builder throughput on video files: clips per second through the whole job, next to the floor of
decoding the same mp4 clips with PyAV alone in a plain loop.

  .venv/bin/python benchmarks/video_throughput.py [--clips 400] [--frames 16] [--size 64] [--video-frames 8] [--reps 5]

Writes the synthetic action clips (`generate_action_clips`: mpeg4 in mp4, coloured actors with tubelets, all
in the train split) to a temporary directory, then measures, in rounds that each run both variants once (so a
change in the machine's load hits both), with one more floor after the last round so that every job run has
a floor just before and just after it (as benchmarks/shard_throughput.py does):

(1) the floor: read each file, open it with PyAV, decode every frame on one thread and convert the
    `--video-frames` frames that `beam_jobs.video.sample_indices` picks to RGB arrays, also on one thread: one
    decode, the least any reader must do to get those frames (they must be counted before they are sampled);
    checked to give the builder's pixels;
(2) `build_shards` with `ShardOptions(video=True, video_frames=F)` on the in-process runner with 1 worker,
    the tubelets packed too (L=1024, P=16, M=16, budget L, 8 shards: a 64x64 clip keeps its 4x4 patch grid
    on every frame, 8 clips of 128 tokens per sequence). Timed from the call to its return, Beam's start-up
    included; every run writes into a fresh directory and every run's shards are checked to be identical.

Each round also times a job on the first 16 clips, almost all Beam start-up and pipeline construction, paid
once per run: the last line puts it next to the whole job.

Two figures per row: clips per wall-second and clips per CPU-second (of this process and any children). On a
machine shared with other jobs the wall-clock figure moves with their load; the CPU-second figure does not.
The ratio job/floor is the median over rounds of each job run over the mean of the floors on either side.
"""

import argparse
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
import time

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from beam_jobs import video as video_lib  # noqa: E402
from benchmarks.shard_throughput import bracketed_ratios, measured  # noqa: E402

STARTUP_CLIPS = 16


def write_clips(directory: str, clips: int, frames: int, size: int) -> tuple[str, list[str]]:
  """The action clips under `directory`: (manifest path, video file paths in manifest order)."""
  from beam_jobs.synthetic_actions import generate_action_clips
  summary = generate_action_clips(directory, splits={"train": clips}, frames=frames, size=size)
  with open(summary["manifest"]) as f:
    videos = [os.path.join(directory, json.loads(line)["video"]) for line in f]
  return summary["manifest"], videos


def sampled_rgb(data: bytes, num_frames: int) -> list[np.ndarray]:
  """One decode of a video file on one thread; the frames that beam_jobs/video.py samples, as uint8 RGB,
  converted on one thread too (PyAV's default, threads=0, starts swscale threads for every frame: the same
  pixels, at several times the wall time of a 64x64 frame here)."""
  with av.open(io.BytesIO(data), mode="r") as container:
    stream = container.streams.video[0]
    stream.thread_type, stream.thread_count = "NONE", 1
    decoded = list(container.decode(stream))
  wanted = video_lib.sample_indices(len(decoded), num_frames)
  return [decoded[i].to_ndarray(format="rgb24", threads=1) for i in wanted]


def pyav_floor(videos: list[str], num_frames: int) -> None:
  for path in videos:
    with open(path, "rb") as f:
      data = f.read()
    sampled_rgb(data, num_frames)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--clips", type=int, default=400)
  parser.add_argument("--frames", type=int, default=16, help="frames per clip")
  parser.add_argument("--size", type=int, default=64, help="frame side in pixels")
  parser.add_argument("--video-frames", type=int, default=8, help="frames sampled from each clip (F)")
  parser.add_argument("--reps", type=int, default=5, help="rounds; each round runs the floor and the job once")
  args = parser.parse_args(argv)
  from beam_jobs.build_shards import build_shards
  from beam_jobs.options import ShardOptions
  options = ShardOptions(seq_len=1024, patch_size=16, max_images=16, num_shards=8, video=True,
                         video_frames=args.video_frames)
  floor_name, job_name = "PyAV decode loop (floor)", "build_shards, 1 worker"
  floors: list[tuple[float, float, float]] = []  # (wall, CPU, of it system) per run
  jobs: list[tuple[float, float, float]] = []
  startup: list[tuple[float, float, float]] = []
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    manifest, videos = write_clips(tmp, args.clips, args.frames, args.size)
    kib = sum(os.path.getsize(v) for v in videos) / len(videos) / 1024
    print(f"wrote {args.clips} clips of {args.frames} frames of {args.size}x{args.size} ({kib:.1f} KiB each) in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    for path in videos[:8]:  # the floor yields the frames the builder decodes (and warms the page cache, PyAV)
      with open(path, "rb") as f:
        data = f.read()
      total = video_lib.probe(data)[0]
      for mine, builders in zip(sampled_rgb(data, args.video_frames),
                                video_lib.decode_sampled(data, total, args.video_frames), strict=True):
        np.testing.assert_array_equal(mine, builders)
    pyav_floor(videos, args.video_frames)
    tiny = os.path.join(tmp, "tiny.jsonl")
    with open(manifest) as f, open(tiny, "w") as out:
      out.writelines(itertools.islice(f, STARTUP_CLIPS))
    digests = set()
    for _ in range(args.reps):  # interleaved: every round measures both variants under the same load
      floors.append(measured(pyav_floor, videos, args.video_frames)[1])
      shutil.rmtree(os.path.join(tmp, "shards-tiny"), ignore_errors=True)
      startup.append(measured(build_shards, tiny, os.path.join(tmp, "shards-tiny"), options, workers=1)[1])
      out = os.path.join(tmp, "shards")
      shutil.rmtree(out, ignore_errors=True)  # untimed: every run starts from an empty directory, as a first build
      info, clocks = measured(build_shards, manifest, out, options, workers=1)
      jobs.append(clocks)
      assert info["num_examples"] == args.clips, info["num_examples"]
      digests.add(tuple(s["sha256"] for s in info["shards"]))
    floors.append(measured(pyav_floor, videos, args.video_frames)[1])  # closes the last round's bracket
    assert len(digests) == 1, "runs gave different shards"
  n = args.clips
  print(f"\n{n} clips of {args.frames} frames, {args.size}x{args.size}, {args.video_frames} sampled; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; median of {args.reps} "
        f"interleaved rounds (of the floor's {args.reps + 1} runs); this/floor is the median over rounds of that "
        f"round's ratio to the mean of the floors run just before and just after it")
  print(f"{'':26s} {'wall s':>7s} {'clips/s':>8s} {'this/floor':>10s} {'CPU s':>7s} {'clips/CPU-s':>11s} "
        f"{'this/floor':>10s} {'of it sys':>9s}  rounds' CPU ratios")
  for name, runs in ((floor_name, floors), (job_name, jobs)):
    wall, cpu, system = np.median(runs, axis=0)
    if runs is floors:
      wall_ratio = cpu_ratio = 1.0
      rounds = ""
    else:
      cpu_ratios = bracketed_ratios([c for _, c, _ in runs], [c for _, c, _ in floors])
      wall_ratio = np.median(bracketed_ratios([w for w, _, _ in runs], [w for w, _, _ in floors]))
      cpu_ratio = np.median(cpu_ratios)
      rounds = " ".join(f"{r:.2f}" for r in cpu_ratios)
    print(f"{name:26s} {wall:7.2f} {n / wall:8.1f} {wall_ratio:10.2f} {cpu:7.2f} {n / cpu:11.1f} {cpu_ratio:10.2f} "
          f"{system:9.2f}  {rounds}")
  tiny_wall, tiny_cpu, _ = np.median(startup, axis=0)
  job_cpu = np.median([c for _, c, _ in jobs])
  print(f"Beam's start-up: a {min(STARTUP_CLIPS, n)}-clip job takes {tiny_wall:.2f} s wall, {tiny_cpu:.2f} CPU-s "
        f"({tiny_cpu / job_cpu:.0%} of the job above); it is paid once per run, whatever the number of clips")
  return 0


if __name__ == "__main__":
  sys.exit(main())
