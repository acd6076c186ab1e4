"""The benchmarks' baselines must measure what they claim to; a wrong baseline makes every ratio wrong."""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainers.tasks.classification import forward, slot_loss_and_accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_unmasked_vit_baseline_trains_and_differs_from_the_masked_model():
  bench = _load("trainer_throughput")
  rng = np.random.default_rng(0)
  batch = bench.make_batch([[300, 200, 100], [512, 256]] + [[64]] * (bench.ROWS - 2), rng)
  cfg = {"width": 32, "depth": 1, "heads": 2, "mlp_dim": 64}

  @nnx.jit
  def loss_and_grad_norm(model, batch):
    def loss_fn(model):
      return slot_loss_and_accuracy(forward(model, batch, True), batch["labels"])[0]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    return loss, optax_global_norm(grads)

  results = {}
  for use_mask in (True, False):
    model, _, _ = bench.make_trainer(cfg, use_mask=use_mask)
    model.head.kernel[...] = jnp.asarray(rng.normal(size=model.head.kernel[...].shape), jnp.float32)
    results[use_mask] = [float(x) for x in loss_and_grad_norm(model, batch)]
  # Both variants really differentiate through their weights (a baseline on constant weights has no gradient)...
  assert results[True][1] > 0 and results[False][1] > 0
  # ...and the unmasked one really attends across images.
  assert not np.isclose(results[True][0], results[False][0], rtol=1e-6)


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_shard_throughput_benchmark_runs_end_to_end_on_a_few_images(capsys):
  """A tiny run of the whole benchmark: every row and the start-up line print, and the job wrote every image
  (the script asserts it and that all runs gave the same shards)."""
  bench = _load("shard_throughput")
  assert bench.main(["--images", "24", "--runs", "1", "2:threads", "--reps", "2"]) == 0
  out = capsys.readouterr().out
  for row in ("PIL decode loop (floor)", "build_shards, 1 worker", "build_shards, 2 threads", "Beam's start-up"):
    assert row in out


def test_video_throughput_benchmark_runs_end_to_end_on_a_few_clips(capsys):
  """A tiny run of the video benchmark: both rows print with their figures, and the start-up line (the script
  asserts that the floor decodes the builder's pixels, that the job wrote every clip and that runs agree)."""
  bench = _load("video_throughput")
  assert bench.main(["--clips", "12", "--frames", "8", "--size", "32", "--video-frames", "4", "--reps", "1"]) == 0
  out = capsys.readouterr().out
  rows = {}
  for line in out.splitlines():
    for name in ("PyAV decode loop (floor)", "build_shards, 1 worker"):
      if line.startswith(name):
        rows[name] = [float(v) for v in line[len(name):].split()]
  # wall s, clips/s, job/floor, CPU s, clips/CPU-s, job/floor, of it sys; the job's row adds its rounds' ratios.
  assert len(rows["PyAV decode loop (floor)"]) == 7 and len(rows["build_shards, 1 worker"]) == 8
  assert rows["PyAV decode loop (floor)"][2] == rows["PyAV decode loop (floor)"][5] == 1.0
  job = rows["build_shards, 1 worker"]
  assert all(v > 0 for i, v in enumerate(job) if i != 6) and job[6] >= 0  # a tiny job's system time can round to 0
  assert re.search(r"^Beam's start-up: a 12-clip job takes [0-9.]+ s wall, [0-9.]+ CPU-s \([0-9]+% ", out, re.M)


def test_bracketed_ratios_cancel_a_steady_drift_of_the_machine():
  """A job that always costs twice the floor, on a machine slowing down steadily: the floor measured before a run
  alone would say 2.2x and 2.17x; the mean of the floors on both sides of each run says 2x."""
  bench = _load("shard_throughput")
  floors = [1.0, 1.2, 1.4]  # timed before round 1, between rounds 1 and 2, after round 2
  runs = [2 * 1.1, 2 * 1.3]  # each run timed halfway between two floors
  np.testing.assert_allclose(bench.bracketed_ratios(runs, floors), [2.0, 2.0])
  with np.testing.assert_raises(ValueError):
    bench.bracketed_ratios(runs, floors[:2])
