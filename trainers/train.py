"""The train loop: packed shards in, an orbax checkpoint, metrics.jsonl and final.json out.

  python -m trainers.train --data SHARDS --workdir DIR [--config smoke] [--set train.steps=100 ...]

Started again on the same workdir it resumes from the last checkpoint and replays the same batches.
"""

import argparse
import functools
import hashlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from schemas import dataset_info as info_lib
from schemas import storage
from schemas.lineage import write_lineage
from schemas.errors import ContractError
from schemas.shards import PackedRecords, load_split
from trainers import checkpointing, sharding
from trainers.configs import apply_overrides, load_config
from trainers.input_pipeline import MODEL_INPUTS, batch_indices, prefetched
from trainers.model import build_model


def slot_loss_and_accuracy(logits, labels, label_smoothing: float = 0.0):
  """Mean cross-entropy and accuracy over filled image slots (label >= 0); empty slots weigh nothing."""
  filled = labels >= 0
  safe = jnp.where(filled, labels, 0)
  targets = optax.smooth_labels(jax.nn.one_hot(safe, logits.shape[-1]), label_smoothing)
  losses = optax.softmax_cross_entropy(logits, targets)
  count = jnp.maximum(filled.sum(), 1)
  loss = jnp.where(filled, losses, 0.0).sum() / count
  accuracy = jnp.where(filled, logits.argmax(-1) == safe, False).sum() / count
  return loss, accuracy


def make_optimizer(model, train_config: dict):
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_config["learning_rate"], warmup_steps=train_config["warmup_steps"],
      decay_steps=max(train_config["steps"], train_config["warmup_steps"] + 1), end_value=0.0)
  tx = optax.adamw(schedule, weight_decay=train_config["weight_decay"])
  return nnx.Optimizer(model, tx, wrt=nnx.Param), schedule


def _forward(model, batch, train, return_aux_loss=False):
  return model(batch["patches"], batch["patch_yx"], batch["segment_ids"], batch.get("image_grid"), train=train,
               return_aux_loss=return_aux_loss)


@functools.partial(nnx.jit, static_argnames=("label_smoothing", "aux_weight"))
def train_step(model, optimizer, batch, label_smoothing=0.0, aux_weight=0.0):
  def loss_fn(model):
    logits, aux = _forward(model, batch, True, return_aux_loss=True)  # aux: MoE load balancing; 0 if dense
    loss, accuracy = slot_loss_and_accuracy(logits, batch["labels"], label_smoothing)
    return loss + aux_weight * aux, accuracy
  (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, accuracy


@nnx.jit
def eval_step(model, batch):
  return slot_loss_and_accuracy(_forward(model, batch, False), batch["labels"])


def evaluate_split(model, data: dict, batch_size: int) -> dict:
  model.eval()
  total_loss = total_correct = total = 0.0
  for start in range(0, len(data["labels"]), batch_size):
    batch = {k: data[k][start:start + batch_size] for k in MODEL_INPUTS}
    n = float((batch["labels"] >= 0).sum())
    loss, accuracy = eval_step(model, batch)
    total_loss += float(loss) * n
    total_correct += float(accuracy) * n
    total += n
  return {"loss": total_loss / max(total, 1), "accuracy": total_correct / max(total, 1), "images": int(total)}


# Dense bf16 peak TFLOP/s per chip, for model-FLOPs utilisation; override with train.peak_tflops.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0,
               "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0}


def model_flops_per_sequence(model_config: dict, info: dict) -> float:
  """Training FLOPs (forward + backward = 3x forward) of one packed sequence, counting matmuls only."""
  length, width, mlp = info["seq_len"], model_config["width"], model_config["mlp_dim"]
  patch_dim = info["patch_size"] ** 2 * 3
  per_layer = 2 * length * (4 * width * width + 2 * width * mlp) + 2 * 2 * length * length * width
  forward = 2 * length * patch_dim * width + model_config["depth"] * per_layer
  return 3.0 * forward


def peak_tflops(train_config: dict) -> float | None:
  if train_config.get("peak_tflops"):
    return float(train_config["peak_tflops"])
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS.items() if kind.startswith(k)), None)


def _append_jsonl(path: str, row: dict) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")
    f.flush()


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drops metric lines written after the checkpoint we resume from, so the curve has no duplicate steps."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(rows)
  os.replace(path + ".tmp", path)


def data_position(step: int, config: dict, info: dict, num_sequences: int) -> dict:
  """What a resumed run must match to replay the same batches: the batch at step n is f(seed, n, data)."""
  shards = hashlib.sha256("".join(s["sha256"] for s in info["shards"]).encode()).hexdigest()
  return {"next_step": step + 1, "seed": config["seed"], "batch_size": config["train"]["batch_size"],
          "num_sequences": num_sequences, "shards_sha256": shards}


def train(data_dir: str, workdir: str, config: dict, log=print) -> dict:
  info = info_lib.read_dataset_info(data_dir)
  tc = config["train"]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump({"config": config, "dataset_info": {k: info[k] for k in (
        "fingerprint", "seq_len", "patch_size", "max_images", "num_classes", "max_patches_per_image")},
        "data": data_dir if storage.is_gcs(data_dir) else os.path.abspath(data_dir)}, f, indent=1, sort_keys=True)
  mesh = sharding.make_mesh(config["mesh"]["data"], config["mesh"]["model"])
  if tc["batch_size"] % config["mesh"]["data"]:
    raise ContractError(f"train.batch_size ({tc['batch_size']}) must be divisible by mesh.data "
                        f"({config['mesh']['data']})")
  train_records = PackedRecords(data_dir, "train", info)  # read batch by batch; the split is never loaded
  val_data = load_split(data_dir, "val", info, MODEL_INPUTS) if "val" in info["splits"] else None
  model = build_model(config["model"], info, config["seed"])
  optimizer, schedule = make_optimizer(model, tc)
  sharding.shard_nodes(mesh, model, optimizer)
  manager = checkpointing.checkpoint_manager(workdir, tc["keep_checkpoints"])
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  num_sequences = len(train_records)
  start = checkpointing.restore_latest(manager, model, optimizer,
                                       expect_position=data_position(0, config, info, num_sequences)) or 0
  _truncate_metrics(metrics_path, start)
  if start:
    log(f"train: resumed from checkpoint at step {start}")
  import tensorflow as tf
  summaries = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
  flops_per_step = model_flops_per_sequence(config["model"], info) * tc["batch_size"]
  peak = peak_tflops(tc)
  model.train()
  window_start, window_images, window_steps = time.perf_counter(), 0, 0
  loss = float("nan")
  read_step = lambda step: train_records.read(
      batch_indices(num_sequences, tc["batch_size"], step - 1, config["seed"]), MODEL_INPUTS)
  try:
    for step, host_batch in prefetched(read_step, range(start + 1, tc["steps"] + 1)):
      batch = sharding.shard_batch(mesh, host_batch)
      with jax.set_mesh(mesh):  # the model pins its activations to this mesh (sharding.ACTIVATION_RULES)
        loss, accuracy = train_step(model, optimizer, batch, label_smoothing=tc["label_smoothing"],
                                    aux_weight=config["model"]["moe"]["aux_weight"])
      window_images += int((host_batch["labels"] >= 0).sum())
      window_steps += 1
      is_log, is_save = step % tc["log_every"] == 0 or step == tc["steps"], step % tc["checkpoint_every"] == 0
      if is_log or is_save or step == tc["steps"]:
        loss = float(loss)
        if not np.isfinite(loss):
          manager.wait_until_finished()
          raise FloatingPointError(f"train: loss is {loss} at step {step}; stopped, the last good checkpoint "
                                   f"(step {manager.latest_step()}) is kept in {workdir}/checkpoints")
      if is_log:
        elapsed = time.perf_counter() - window_start
        row = {"step": step, "loss": loss, "accuracy": float(accuracy), "learning_rate": float(schedule(step - 1)),
               "images_per_second": window_images / max(elapsed, 1e-9),
               "steps_per_second": window_steps / max(elapsed, 1e-9)}
        row["tflops_per_second"] = flops_per_step * row["steps_per_second"] / 1e12
        row["mfu"] = row["tflops_per_second"] / (peak * len(jax.devices())) if peak else None
        _append_jsonl(metrics_path, row)
        with summaries.as_default(step=step):
          for key in ("loss", "accuracy", "learning_rate", "images_per_second", "tflops_per_second"):
            tf.summary.scalar(key, row[key])
        mfu = f" MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        log(f"train: step {step}/{tc['steps']} loss {loss:.4f} accuracy {row['accuracy']:.3f} "
            f"lr {row['learning_rate']:.2e} {row['images_per_second']:.0f} img/s "
            f"{row['tflops_per_second'] * 1e3:.1f} GFLOP/s{mfu}")
        window_start, window_images, window_steps = time.perf_counter(), 0, 0
      if is_save or step == tc["steps"]:
        checkpointing.save(manager, step, model, optimizer, data_position(step, config, info, num_sequences))
  finally:
    train_records.close()  # its gs:// reader threads, also when the loss goes NaN
  manager.wait_until_finished()
  summaries.flush()
  final = {"step": tc["steps"], "loss": float(loss), "params_sha256": checkpointing.params_sha256(model)}
  if val_data is not None:
    final["val"] = evaluate_split(model, val_data, tc["batch_size"])
    log(f"train: validation accuracy {final['val']['accuracy']:.3f} on {final['val']['images']} images")
  write_lineage(workdir, "train", config, {"shards": data_dir})
  with open(os.path.join(workdir, "final.json.tmp"), "w", encoding="utf-8") as f:
    json.dump(final, f, indent=1, sort_keys=True)
  os.replace(os.path.join(workdir, "final.json.tmp"), os.path.join(workdir, "final.json"))
  return final


def load_trained_model(workdir: str):
  """The model of a finished (or interrupted) run, restored from its newest checkpoint, and its config."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  config, info = saved["config"], saved["dataset_info"]
  model = build_model(config["model"], info, config["seed"])
  optimizer, _ = make_optimizer(model, config["train"])
  manager = checkpointing.checkpoint_manager(workdir, config["train"]["keep_checkpoints"])
  if checkpointing.restore_latest(manager, model, optimizer) is None:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to load")
  model.eval()
  return model, saved


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m trainers.train", description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="smoke")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  args = parser.parse_args(argv)
  overrides = dict(kv.split("=", 1) for kv in args.set)
  config = apply_overrides(load_config(args.config), overrides)
  final = train(args.data, args.workdir, config, log=lambda m: print(m, file=sys.stderr, flush=True))
  print(json.dumps(final))
  return 0


if __name__ == "__main__":
  sys.exit(main())
