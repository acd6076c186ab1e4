"""Trainer benchmarks, measured side by side in one run (CPU here; the same script runs on GPU/TPU).

  .venv/bin/python benchmarks/trainer_throughput.py [--steps 10]

1. Packed NaViT vs the same model on padded one-image-per-row batches, equal tokens per batch, on the shard
   builder's reference size mix (aspect log-uniform in [1/3, 3], longer side uniform in [64, 512], patch 16).
2. Masked attention overhead: the packed model's train step with vs without the segment mask.
3. Input vs compute: reading a batch from shards with the trainer's reader, and placing it, vs one train step.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from beam_jobs.image_ops import fit_patch_grid  # noqa: E402
from beam_jobs.packing import pack_first_fit_decreasing  # noqa: E402
from trainers import sharding  # noqa: E402
from trainers.configs import apply_overrides, load_config  # noqa: E402
from trainers.input_pipeline import batch_indices  # noqa: E402
from trainers.model import build_model  # noqa: E402
from trainers.tasks.classification import FIELDS, TASK  # noqa: E402
from trainers.tasks.task import Head  # noqa: E402
from trainers.train import make_optimizer, model_flops_per_sequence, train_step  # noqa: E402

SEQ_LEN, PATCH, ROWS, MAX_IMAGES = 1024, 16, 8, 32
HEAD = Head("data", num_classes=10)  # make_trainer's model: one head


def reference_token_counts(n: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), n))
  longer = rng.uniform(64, 512, n)
  h = np.where(aspect >= 1, longer / aspect, longer)
  w = np.where(aspect >= 1, longer, longer * aspect)
  return np.array([r * c for r, c in (fit_patch_grid(int(a), int(b), PATCH, SEQ_LEN) for a, b in zip(h, w))])


def make_batch(groups: list[list[int]], rng) -> dict:
  """One batch of ROWS sequences; each group is the token counts of the images sharing a row."""
  seg = np.zeros((ROWS, SEQ_LEN), np.int32)
  yx = np.zeros((ROWS, SEQ_LEN, 2), np.int32)
  grid = np.zeros((ROWS, MAX_IMAGES, 2), np.int32)
  labels = np.full((ROWS, MAX_IMAGES), -1, np.int32)
  for r, group in enumerate(groups):
    pos = 0
    for slot, n in enumerate(group):
      seg[r, pos:pos + n] = slot + 1
      yx[r, pos:pos + n, 1] = np.arange(n) % 32
      yx[r, pos:pos + n, 0] = np.arange(n) // 32
      grid[r, slot] = (max(1, n // 32), min(n, 32))
      labels[r, slot] = rng.integers(0, 10)
      pos += n
  patches = rng.integers(0, 256, (ROWS, SEQ_LEN, PATCH * PATCH * 3), dtype=np.uint8)
  return {"patches": patches, "patch_yx": yx, "segment_ids": seg, "image_grid": grid, "labels": labels}


def make_trainer(model_cfg, use_mask=True):
  info = {"patch_size": PATCH, "num_classes": 10, "max_images": MAX_IMAGES, "max_patches_per_image": SEQ_LEN,
          "seq_len": SEQ_LEN}
  config = apply_overrides(load_config("smoke"), {f"model.{k}": v for k, v in model_cfg.items()})
  model = build_model(config["model"], info, 0)
  # The unmasked ViT of the same size: same code path, every token sees every token. (An earlier version
  # wrapped __call__ around the outer model object, so under nnx.jit the baseline ran on constant weights and
  # skipped the backward pass; tests/test_benchmarks.py now checks the baseline really trains.)
  model.mask_images = use_mask
  optimizer, _ = make_optimizer(model, config["train"])
  model.train()
  return model, optimizer, model_flops_per_sequence(config["model"], info) * ROWS


def time_side_by_side(trainers: dict, batches: dict, steps: int) -> dict:
  """Median step time per variant, the variants interleaved step by step so that whatever else the machine
  is doing weighs on all of them alike."""
  for name, (model, optimizer, _) in trainers.items():
    train_step(model, optimizer, batches[name][0], TASK, HEAD)[0].block_until_ready()  # compile
  times = {name: [] for name in trainers}
  for i in range(steps):
    for name, (model, optimizer, _) in trainers.items():
      start = time.perf_counter()
      train_step(model, optimizer, batches[name][i % len(batches[name])], TASK, HEAD)[0].block_until_ready()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  counts = reference_token_counts(20_000)
  keys = [(i, int(n)) for i, n in enumerate(counts[:4000])]
  bins = [[counts[i] for i in b] for b in pack_first_fit_decreasing(keys, SEQ_LEN, MAX_IMAGES)]
  # FFD opens bins largest-first; draw bins at random so the batches hold a representative mix.
  bins = [bins[i] for i in rng.permutation(len(bins))]
  packed_batches = [make_batch(bins[i * ROWS:(i + 1) * ROWS], rng) for i in range(4)]
  padded_batches = [make_batch([[int(n)] for n in counts[i * ROWS:(i + 1) * ROWS]], rng) for i in range(4)]
  images = lambda bs: np.mean([(b["labels"] >= 0).sum() for b in bs])
  tokens = lambda bs: np.mean([(b["segment_ids"] > 0).sum() for b in bs])
  model_cfg = {"width": 128, "depth": 2, "heads": 4, "mlp_dim": 256}
  print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; model width 128 depth 2; "
        f"batch {ROWS} x {SEQ_LEN} tokens; reference mix mean {counts.mean():.0f} tokens/image")

  trainers = {"packed": make_trainer(model_cfg), "padded": make_trainer(model_cfg),
              "unmasked": make_trainer(model_cfg, use_mask=False)}
  t = time_side_by_side(trainers, {"packed": packed_batches, "padded": padded_batches,
                                   "unmasked": packed_batches}, args.steps)
  packed_t, padded_t, unmasked_t, flops = t["packed"], t["padded"], t["unmasked"], trainers["packed"][2]
  print("\n1. packed vs padded (equal tokens per batch)")
  print(f"   {'':8} {'images/step':>11} {'real tokens':>11} {'step ms':>8} {'images/s':>9}")
  for name, bs, t in (("padded", padded_batches, padded_t), ("packed", packed_batches, packed_t)):
    print(f"   {name:8} {images(bs):11.1f} {tokens(bs):11.0f} {t * 1e3:8.1f} {images(bs) / t:9.1f}")
  print(f"   packed / padded images per second: {(images(packed_batches) / packed_t) / (images(padded_batches) / padded_t):.2f}x")

  print("\n2. masked attention overhead (same model, same tokens)")
  print(f"   unmasked ViT step {unmasked_t * 1e3:.1f} ms, masked NaViT step {packed_t * 1e3:.1f} ms: "
        f"overhead {packed_t / unmasked_t - 1:+.1%}")
  print(f"   model FLOPs/step {flops / 1e9:.1f} GFLOP -> {flops / packed_t / 1e9:.1f} GFLOP/s achieved")

  print("\n3. input pipeline vs train step")
  read_t, n_seq = shard_read_seconds_per_batch()
  print(f"   reading a {ROWS}-sequence batch from local shards (index lookup, read, CRC check, parse; {n_seq} sequences of "
        f"{SEQ_LEN} tokens): {read_t * 1e3:.1f} ms vs train step {packed_t * 1e3:.1f} ms "
        f"({read_t / packed_t:.1%} of a step; the trainer reads it on a thread while the previous step runs)")
  mesh = sharding.make_mesh(1, 1)
  batch = packed_batches[0]
  start = time.perf_counter()
  for _ in range(20):
    jax.block_until_ready(sharding.shard_batch(mesh, batch))
  print(f"   placing it on the device: {(time.perf_counter() - start) / 20 * 1e3:.2f} ms")


def shard_read_seconds_per_batch() -> tuple[float, int]:
  """Median time to read one batch of ROWS random sequences with the trainer's own reader."""
  from beam_jobs.build_shards import build_shards
  from beam_jobs.options import ShardOptions
  from beam_jobs.synthetic import generate_synthetic
  from schemas.shards import PackedRecords
  with tempfile.TemporaryDirectory() as tmp:
    manifest = generate_synthetic(os.path.join(tmp, "data"), splits={"train": 1500}, noise_levels=())
    build_shards(manifest, os.path.join(tmp, "shards"), ShardOptions(seq_len=SEQ_LEN, max_images=MAX_IMAGES,
                                                                     num_shards=4))
    records = PackedRecords(os.path.join(tmp, "shards"), "train")
    records.read(batch_indices(len(records), ROWS, 0, 0), FIELDS)  # warm: TensorFlow's import and first parse
    times = []
    for step in range(1, 21):
      start = time.perf_counter()
      records.read(batch_indices(len(records), ROWS, step, 0), FIELDS)
      times.append(time.perf_counter() - start)
    n = len(records)
    records.close()
    return float(np.median(times)), n


if __name__ == "__main__":
  main()
