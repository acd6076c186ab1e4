"""Benchmark: the whole `patchflow calibrate` command vs the floor, a bare read-plus-ECE numpy pass over the
same file, side by side in one run (each in its own process; wall time, CPU time and peak RSS of that process), the two
interleaved `--repeat` times; ratios are medians of the per-pair ratios.

  .venv/bin/python benchmarks/calibrate.py                       # 1M rows x 1000 classes (a 4 GB file)
  .venv/bin/python benchmarks/calibrate.py --rows 100000         # 100k x 1000 while iterating

The predictions file is generated once, streamed in row groups (memory: one row group), and reused.
torchmetrics and netcal are run only when importable; otherwise the table says "not installed".
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROW_GROUP = 16384
NUM_BINS = 15


def generate(path: str, rows: int, classes: int, seed: int = 0) -> None:
  """Logits ~ N(0, 1), the label's logit raised by 3 for 70% of rows: a realistic accuracy/ECE mix."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  schema = pa.schema([("example_id", pa.string()), ("label", pa.int32()), ("logits", pa.list_(pa.float32()))])
  rng = np.random.default_rng(seed)
  with pq.ParquetWriter(path + ".tmp", schema, compression="none") as writer:
    for start in range(0, rows, ROW_GROUP):
      n = min(ROW_GROUP, rows - start)
      labels = rng.integers(0, classes, n).astype(np.int32)
      logits = rng.standard_normal((n, classes), dtype=np.float32)
      logits[np.arange(n), labels] += np.where(rng.random(n) < 0.7, 3.0 + np.log(classes) / 2, 0.0).astype(np.float32)
      offsets = pa.array(np.arange(n + 1, dtype=np.int32) * classes)
      writer.write_table(pa.table({
          "example_id": pa.array([f"ex-{start + i:08d}" for i in range(n)]), "label": labels,
          "logits": pa.ListArray.from_arrays(offsets, pa.array(logits.reshape(-1)))}, schema=schema),
          row_group_size=ROW_GROUP)
  os.replace(path + ".tmp", path)


def floor(path: str) -> dict:
  """The floor: read every row group, softmax confidence and argmax, 15-bin ECE. Nothing else. It reads with
  the same pyarrow options as `patchflow calibrate` (pre_buffer off: 5x faster here than the default)."""
  import pyarrow.parquet as pq
  count, conf_sum, correct_sum = np.zeros(NUM_BINS), np.zeros(NUM_BINS), np.zeros(NUM_BINS)
  file = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
  for batch in file.iter_batches(batch_size=8192, columns=["label", "logits"], use_threads=False):
    labels = batch.column(0).to_numpy()
    x = batch.column(1).values.to_numpy().reshape(len(labels), -1)
    top = x.max(axis=1)
    confidence = 1.0 / np.exp(x - top[:, None]).sum(axis=1, dtype=np.float64)
    correct = x.argmax(axis=1) == labels
    index = np.minimum((confidence * NUM_BINS).astype(np.int64), NUM_BINS - 1)
    count += np.bincount(index, minlength=NUM_BINS)
    conf_sum += np.bincount(index, weights=confidence, minlength=NUM_BINS)
    correct_sum += np.bincount(index, weights=correct, minlength=NUM_BINS)
  return {"ece": float(np.abs(correct_sum - conf_sum).sum() / count.sum())}


def _env() -> dict:
  # Bytecode caches on, as in a normal Python setup (some sandboxes set PYTHONDONTWRITEBYTECODE, which makes
  # every run compile matplotlib and friends again: about 1.5 s here).
  return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(argv: list[str]) -> dict:
  """Runs a command; wall seconds, CPU seconds and peak RSS of the process (wait4)."""
  start = time.perf_counter()
  process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
  out, err = process.stdout.read(), process.stderr.read()
  _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - start
  if process.returncode:
    raise SystemExit(f"{' '.join(argv)} failed ({process.returncode}):\n{err[-2000:]}")
  return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
          "stdout": out, "stderr": err}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=1_000_000)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--file", default=None, help="predictions file (generated when missing)")
  parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each contender (medians)")
  parser.add_argument("--floor", default=None, help=argparse.SUPPRESS)  # internal: run the floor on FILE
  args = parser.parse_args(argv)
  if args.floor:
    print(json.dumps(floor(args.floor)))
    return 0
  path = args.file or os.path.join(tempfile.gettempdir(), "patchflow-bench",
                                   f"predictions-{args.rows}x{args.classes}.parquet")
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    start = time.perf_counter()
    generate(path, args.rows, args.classes)
    print(f"generated {path} in {time.perf_counter() - start:.1f} s")
  size_gb = os.path.getsize(path) / 1e9
  print(f"file: {path} ({args.rows} x {args.classes} float32 logits, {size_gb:.2f} GB); "
        f"{os.cpu_count()} CPU cores")
  with open(path, "rb") as f:  # warm the page cache so both contenders read from memory
    while f.read(1 << 24):
      pass
  exe = os.path.join(os.path.dirname(sys.executable), "patchflow")
  with tempfile.TemporaryDirectory() as warm:  # imports, bytecode and font caches, once, on a tiny file
    generate(os.path.join(warm, "tiny.parquet"), 100, 10)
    timed([sys.executable, __file__, "--floor", os.path.join(warm, "tiny.parquet")])
    timed([exe, "calibrate", "--predictions", os.path.join(warm, "tiny.parquet"), "--output", warm])
  floors, runs, results = [], [], []
  for _ in range(args.repeat):  # interleaved, so that load from other processes hits both alike
    floors.append(timed([sys.executable, __file__, "--floor", path]))
    with tempfile.TemporaryDirectory() as out:
      runs.append(timed([exe, "calibrate", "--predictions", path, "--output", out]))
      with open(os.path.join(out, "calibration.json"), encoding="utf-8") as f:
        results.append(json.load(f))
  floor_ece = json.loads(floors[0]["stdout"])["ece"]
  result = results[0]
  phases = [line for line in runs[-1]["stderr"].splitlines() if line.startswith("calibrate: ")]
  load = os.getloadavg()[0]
  print("phases of the last patchflow calibrate run (wall):\n  " + "\n  ".join(phases))
  median = lambda values: float(np.median(values))
  print(f"{'contender (median of ' + str(args.repeat) + ' interleaved runs)':62s} {'seconds':>8s} {'x floor':>8s} "
        f"{'CPU s':>7s} {'x floor':>8s} {'peak RSS MB':>12s} {'ECE':>10s}")
  for name, group, ece in (("floor: read + 15-bin ECE (numpy)", floors, floor_ece),
                           ("patchflow calibrate (every metric, figures, HTML, lineage)", runs, result["ece"])):
    wall_ratio = median([r["seconds"] / f["seconds"] for r, f in zip(group, floors)])
    cpu_ratio = median([r["cpu_seconds"] / f["cpu_seconds"] for r, f in zip(group, floors)])
    print(f"{name:62s} {median([r['seconds'] for r in group]):8.2f} {wall_ratio:8.2f} "
          f"{median([r['cpu_seconds'] for r in group]):7.2f} {cpu_ratio:8.2f} "
          f"{max(r['peak_rss_mb'] for r in group):12.0f} {ece:10.6f}")
  print("per run, wall x floor: " + " ".join(f"{r['seconds'] / f['seconds']:.2f}" for r, f in zip(runs, floors)) +
        "; CPU x floor: " + " ".join(f"{r['cpu_seconds'] / f['cpu_seconds']:.2f}" for r, f in zip(runs, floors)))
  for name in ("torchmetrics", "netcal"):
    if importlib.util.find_spec(name) is None:
      print(f"{name:62s} not installed")
    else:
      print(f"{name:62s} installed, but not run by this script (run it in its own environment)")
  print(f"ECE agrees with the floor to {abs(result['ece'] - floor_ece):.2e}; 1-minute load average at the end: "
        f"{load:.1f} on {os.cpu_count()} cores (other processes make wall times noisy; CPU seconds less so)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
