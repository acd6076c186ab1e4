"""A small MoE classifier on patchflow's synthetic source, trained with each router, side by side.

  .venv/bin/python benchmarks/moe_router.py [--steps 150] [--experts 8] [--k 2] [--data SHARDS]

Builds a small synthetic dataset (beam_jobs.synthetic: images of 1-3 coloured shapes, label = colour of the
largest shape, 6 classes) and packed shards (beam_jobs.build_shards) in a temporary folder, unless --data
points at existing shards. The model: patch embedding -> LayerNorm -> MoE feed-forward (residual) ->
LayerNorm -> mean pool per image slot -> linear head; AdamW, loss = cross-entropy + 0.01 * load-balancing
loss. Both routers start from the same seed and see the same batches. Reported on the test split: accuracy,
the coefficient of variation (std / mean) of the tokens each expert processed (0 = perfectly balanced), the
fraction of picks dropped by capacity, and the training time (after compilation).
Expect about 1-2 minutes on 2 CPU cores.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from trainers.input_pipeline import batch_indices  # noqa: E402
from trainers.moe import ROUTERS, MoEFeedForward  # noqa: E402
from trainers.tasks.classification import slot_loss_and_accuracy  # noqa: E402

AUX_LOSS_WEIGHT = 0.01


class MoEClassifier(nnx.Module):

  def __init__(self, *, patch_dim, num_classes, max_images, width, num_experts, k, router, rngs):
    self.max_images = max_images
    self.embed = nnx.Linear(patch_dim, width, rngs=rngs)
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.moe = MoEFeedForward(width, 2 * width, num_experts, k, router=router, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, patches, segment_ids):
    x = self.embed(patches.astype(jnp.float32) / 127.5 - 1.0)
    update, aux = self.moe(self.norm1(x), segment_ids > 0)
    x = self.norm2(x + update)
    slots = (segment_ids[..., None] == jnp.arange(1, self.max_images + 1)).astype(x.dtype)
    pooled = jnp.einsum("blm,bld->bmd", slots, x) / jnp.maximum(slots.sum(axis=1), 1.0)[..., None]
    return self.head(pooled), aux


def make_data(workdir: str, seed: int) -> str:
  from beam_jobs.build_shards import build_shards
  from beam_jobs.options import ShardOptions
  from beam_jobs.synthetic import generate_synthetic
  manifest = generate_synthetic(os.path.join(workdir, "synthetic"), seed=seed,
                                splits={"train": 600, "test": 200}, noise_levels=())
  shards = os.path.join(workdir, "shards")
  build_shards(manifest, shards, ShardOptions(seq_len=256, patch_size=16, max_images=16,
                                              max_patches_per_image=64, num_shards=1))
  return shards


@nnx.jit
def train_step(model, optimizer, batch):
  def loss_fn(model):
    logits, aux = model(batch["patches"], batch["segment_ids"])
    loss, _ = slot_loss_and_accuracy(logits, batch["labels"])
    return loss + AUX_LOSS_WEIGHT * aux["load_balancing_loss"], loss
  (_, loss), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model, batch):
  logits, aux = model(batch["patches"], batch["segment_ids"])
  filled = batch["labels"] >= 0
  correct = jnp.sum(jnp.where(filled, logits.argmax(-1) == batch["labels"], False))
  return correct, filled.sum(), aux["expert_load"], aux["routed"].sum(), aux["expert_load"].sum()


def run(router: str, train, test, info, args) -> dict:
  model = MoEClassifier(patch_dim=info["patch_size"] ** 2 * 3, num_classes=info["num_classes"],
                        max_images=info["max_images"], width=args.width, num_experts=args.experts, k=args.k,
                        router=router, rngs=nnx.Rngs(args.seed))
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, 10, args.steps)
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)
  fields = ("patches", "segment_ids", "labels")
  batches = [{f: train[f][batch_indices(len(train["labels"]), args.batch_size, step, args.seed)] for f in fields}
             for step in range(args.steps)]
  train_step(model, optimizer, batches[0])                         # compile (one extra step, both routers)
  start = time.perf_counter()
  losses = [float(train_step(model, optimizer, batch)) for batch in batches[1:]]
  seconds = time.perf_counter() - start
  correct = total = routed = kept = 0
  load = np.zeros(args.experts)
  for i in range(0, len(test["labels"]), args.batch_size):
    c, t, expert_load, r, kk = eval_step(model, {f: test[f][i:i + args.batch_size] for f in fields})
    correct, total, routed, kept = correct + int(c), total + int(t), routed + float(r), kept + float(kk)
    load += np.asarray(expert_load)
  return {"router": router, "accuracy": correct / max(total, 1), "images": total,
          "load_cv": float(load.std() / max(load.mean(), 1e-9)), "min_max_load": (load.min(), load.max()),
          "dropped": 1.0 - kept / max(routed, 1.0), "final_loss": float(np.mean(losses[-10:])),
          "seconds": seconds}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--k", type=int, default=2)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data", help="existing shard directory (skips building the synthetic data)")
  args = parser.parse_args(argv)
  from schemas.dataset_info import read_dataset_info
  from schemas.shards import load_split
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    data = args.data or make_data(tmp, args.seed)
    info = read_dataset_info(data)
    train, test = load_split(data, "train", info), load_split(data, "test", info)
    print(f"data: {data if args.data else 'synthetic, built'} in {time.perf_counter() - start:.1f} s; "
          f"{len(train['labels'])} train / {len(test['labels'])} test sequences of {info['seq_len']} patches, "
          f"{info['num_classes']} classes")
  print(f"model: width {args.width}, {args.experts} experts, k={args.k}, capacity factor 1.25; "
        f"{args.steps} steps of batch {args.batch_size}; jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({os.cpu_count()} cores)")
  header = (f"{'router':<14} {'test acc':>9} {'load CV':>8} {'min/max load':>13} {'dropped':>8} "
            f"{'train loss':>11} {'train s':>8}")
  print(header)
  print("-" * len(header))
  for router in ROUTERS:
    r = run(router, train, test, info, args)
    print(f"{r['router']:<14} {r['accuracy']:>9.3f} {r['load_cv']:>8.3f} "
          f"{int(r['min_max_load'][0]):>6}/{int(r['min_max_load'][1]):<6} {r['dropped']:>8.3f} "
          f"{r['final_loss']:>11.3f} {r['seconds']:>8.1f}")
  print(f"(test split: {r['images']} images; chance accuracy {1 / info['num_classes']:.3f})")


if __name__ == "__main__":
  main()
