"""The train loop: packed shards in, an orbax checkpoint, metrics.jsonl and final.json out.

  python -m trainers.train --data SHARDS --workdir DIR [--config smoke] [--set train.steps=100 ...]
  python -m trainers.train --workdir DIR --config MIXTURE.py   # the config's `data` names the datasets

Every task runs through this loop (trainers/tasks/: the fields it reads, its model, its loss, its eval
outputs); each step's batch comes from one dataset of the mixture (trainers/mixture.py). Started again on the
same workdir it resumes from the last checkpoint and replays the same batches.
"""

import argparse
import functools
import json
import os
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx
from flax.core import FrozenDict

from schemas.errors import ContractError
from schemas.lineage import write_lineage
from schemas.packed import EMPTY_SLOT_LABEL
from schemas.shards import PackedRecords, load_split
from trainers import checkpointing, mixture, sharding
from trainers.configs import apply_overrides, load_config
from trainers.input_pipeline import batch_indices, mixture_draws, prefetched


class UnusableModelError(RuntimeError):
  """The training ran, and its checkpoint is written, but the model it gives is of no use (unusable_because)."""


def unusable_because(metrics: dict, task, head) -> str | None:
  """Why a model with these validation metrics is of no use, or None: its loss is not finite, or its task has
  labels and it gets no more of them right than chance (1 / the head's classes)."""
  if not np.isfinite(metrics["loss"]):
    return f"validation loss is {metrics['loss']}"
  # 1e-6: accuracies are float32 means, so exactly chance (5 right of 30 in 6 classes) may read a hair above it.
  if task.accuracy is not None and metrics[task.accuracy] <= 1 / head.num_classes + 1e-6:
    return (f"validation {task.accuracy} {metrics[task.accuracy]:.3f} is at or below chance "
            f"(1/{head.num_classes} = {1 / head.num_classes:.3f})")
  return None


def make_optimizer(model, train_config: dict):
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_config["learning_rate"], warmup_steps=train_config["warmup_steps"],
      decay_steps=max(train_config["steps"], train_config["warmup_steps"] + 1), end_value=0.0)
  tx = optax.adamw(schedule, weight_decay=train_config["weight_decay"])
  return nnx.Optimizer(model, tx, wrt=nnx.Param), schedule


@functools.partial(nnx.jit, static_argnames=("task", "head", "options"))
def train_step(model, optimizer, batch, task, head, options=FrozenDict()):
  """One optimizer step on the task's loss through `head` -> (loss, metrics); `options` are its loss_options."""
  def loss_fn(model):
    return task.loss(model, batch, head, **options)
  (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, metrics


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


def train(data_dir: str | None, workdir: str, config: dict, log=print) -> dict:
  """Trains on the shard directory `data_dir` or, when it is None, on the datasets that the config's `data`
  names (trainers/mixture.py); every dataset is read by its task (trainers/tasks/)."""
  datasets = mixture.datasets_of(config, data_dir)
  task = mixture.model_task(datasets)
  tc = config["train"]
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config["mesh"]["data"], config["mesh"]["model"])
  if tc["batch_size"] % config["mesh"]["data"]:
    raise ContractError(f"train.batch_size ({tc['batch_size']}) must be divisible by mesh.data "
                        f"({config['mesh']['data']})")
  # Train splits are read batch by batch, never loaded; validation splits are small and loaded whole.
  records = {d.name: PackedRecords(d.shards, "train", d.info) for d in datasets}
  val_data = {d.name: load_split(d.shards, "val", d.info, d.task.fields) for d in datasets if "val" in d.info["splits"]}
  model = task.build_model(config["model"], datasets, config["seed"])
  manager = checkpointing.checkpoint_manager(workdir, tc["keep_checkpoints"])
  if tc.get("init_from") and manager.latest_step() is None:  # a resumed run restores its own checkpoint instead
    init_from(model, tc["init_from"], log)
  optimizer, schedule = make_optimizer(model, tc)
  sharding.shard_nodes(mesh, model, optimizer)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  num_sequences = {name: len(r) for name, r in records.items()}
  start = checkpointing.restore_latest(
      manager, model, optimizer, expect_position=mixture.data_position(0, config, datasets, num_sequences)) or 0
  # Only now that a resume is accepted: a refused one leaves the earlier run's config.json as it was.
  with open(os.path.join(workdir, "config.json.tmp"), "w", encoding="utf-8") as f:
    json.dump({"config": config, **mixture.saved_record(datasets)}, f, indent=1, sort_keys=True)
  os.replace(os.path.join(workdir, "config.json.tmp"), os.path.join(workdir, "config.json"))
  _truncate_metrics(metrics_path, start)
  if start:
    log(f"train: resumed from checkpoint at step {start}")
  import tensorflow as tf
  summaries = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
  flops_per_step = {d.name: model_flops_per_sequence(config["model"], d.info) * tc["batch_size"] for d in datasets}
  peak = peak_tflops(tc)
  loss_options = {d.name: FrozenDict(d.task.loss_options(config)) for d in datasets}
  # Step n's batch is batch number batch_number[n-1] of dataset drawn[n-1]: a function of (seed, n), so a
  # resumed run replays them; batches_seen is the realised mixture.
  drawn, batch_number = mixture_draws([d.weight for d in datasets], config["seed"], tc["steps"])
  batches_seen = np.bincount(drawn[:start], minlength=len(datasets))
  model.train()
  window_start, window_images, window_steps, window_flops = time.perf_counter(), 0, 0, 0.0
  loss = float("nan")

  def read_step(step):
    dataset = datasets[drawn[step - 1]]
    indices = batch_indices(num_sequences[dataset.name], tc["batch_size"], int(batch_number[step - 1]),
                            config["seed"])
    return dataset, records[dataset.name].read(indices, dataset.task.fields)

  try:
    for step, (dataset, host_batch) in prefetched(read_step, range(start + 1, tc["steps"] + 1)):
      with jax.set_mesh(mesh):  # the model pins its activations to this mesh (sharding.ACTIVATION_RULES)
        batch = sharding.shard_batch(mesh, dataset.task.prepare(model, host_batch, dataset.head))
        loss, metrics = train_step(model, optimizer, batch, task=dataset.task, head=dataset.head,
                                   options=loss_options[dataset.name])
      batches_seen[drawn[step - 1]] += 1
      window_images += int((host_batch["labels"] != EMPTY_SLOT_LABEL).sum())  # clips without a label (-2) count
      window_steps += 1
      window_flops += flops_per_step[dataset.name]
      is_log, is_save = step % tc["log_every"] == 0 or step == tc["steps"], step % tc["checkpoint_every"] == 0
      if is_log or is_save or step == tc["steps"]:
        loss = float(loss)
        if not np.isfinite(loss):
          manager.wait_until_finished()
          raise FloatingPointError(f"train: loss is {loss} at step {step}; stopped, the last good checkpoint "
                                   f"(step {manager.latest_step()}) is kept in {workdir}/checkpoints")
      if is_log:
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        metrics = {k: float(v) for k, v in metrics.items()}
        row = {"step": step, "loss": loss, **metrics, "learning_rate": float(schedule(step - 1)),
               "images_per_second": window_images / elapsed, "steps_per_second": window_steps / elapsed,
               "tflops_per_second": window_flops / elapsed / 1e12, "dataset": dataset.name,
               "mixture": {d.name: int(n) for d, n in zip(datasets, batches_seen)}}
        row["mfu"] = row["tflops_per_second"] / (peak * len(jax.devices())) if peak else None
        _append_jsonl(metrics_path, row)
        with summaries.as_default(step=step):
          for key in ("loss", *metrics, "learning_rate", "images_per_second", "tflops_per_second"):
            tf.summary.scalar(key, row[key])
        mfu = f" MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        log(f"train: step {step}/{tc['steps']} loss {loss:.4f} {_describe(metrics)} "
            f"lr {row['learning_rate']:.2e} {row['images_per_second']:.0f} img/s "
            f"{row['tflops_per_second'] * 1e3:.1f} GFLOP/s{mfu}")
        window_start, window_images, window_steps, window_flops = time.perf_counter(), 0, 0, 0.0
      if is_save or step == tc["steps"]:
        position = mixture.data_position(step, config, datasets, num_sequences)
        checkpointing.save(manager, step, model, optimizer, position)
  finally:
    for r in records.values():
      r.close()  # their gs:// reader threads, also when the loss goes NaN
  manager.wait_until_finished()
  summaries.flush()
  final = {"step": tc["steps"], "loss": float(loss), "params_sha256": checkpointing.params_sha256(model)}
  val = {d.name: d.task.evaluate(model, val_data[d.name], d.head, tc["batch_size"]) for d in datasets
         if d.name in val_data}
  for name, metrics in val.items():
    log(f"train: validation ({name}) {_describe(metrics)}")
  if val:  # a run on one dataset writes its metrics as such runs always have; a mixture, each dataset's by name
    final["val"] = val[datasets[0].name] if len(datasets) == 1 else val
  write_lineage(workdir, "train", config,
                {"shards" if len(datasets) == 1 else f"shards/{d.name}": d.shards for d in datasets})
  with open(os.path.join(workdir, "final.json.tmp"), "w", encoding="utf-8") as f:
    json.dump(final, f, indent=1, sort_keys=True)
  os.replace(os.path.join(workdir, "final.json.tmp"), os.path.join(workdir, "final.json"))
  # Only after the checkpoint and final.json are written, so the run can be inspected (or accepted later).
  for d in datasets:
    why = unusable_because(val[d.name], d.task, d.head) if d.name in val else None
    if why and not tc.get("allow_useless_model"):
      raise UnusableModelError(f"train: the model is not usable: {why} (dataset {d.name!r}); its checkpoint is "
                               f"kept in {workdir}/checkpoints; set train.allow_useless_model=True to accept it")
  return final


def _describe(metrics: dict) -> str:
  return " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def load_trained_model(workdir: str):
  """The model of a finished (or interrupted) run, restored from its newest checkpoint, and its config."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  config, datasets = saved["config"], mixture.saved_datasets(saved)
  model = mixture.model_task(datasets).build_model(config["model"], datasets, config["seed"])
  optimizer, _ = make_optimizer(model, config["train"])
  manager = checkpointing.checkpoint_manager(workdir, config["train"]["keep_checkpoints"])
  if checkpointing.restore_latest(manager, model, optimizer) is None:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to load")
  model.eval()
  return model, saved


def init_from(model, source_workdir: str, log=print) -> dict:
  """Sets every parameter of `model` whose path and shape match one of the run in `source_workdir` (its newest
  checkpoint) to that run's value, and leaves the others as initialised: `train.init_from`, pretrain then
  finetune (the encoder transfers; a new head, or one with another number of classes, starts fresh).
  -> {"loaded", "left", "skipped"}: the parameter paths of each kind, logged with their counts."""
  if not os.path.isfile(os.path.join(source_workdir, "config.json")):
    raise ContractError(f"train.init_from: {source_workdir!r} holds no training run (no config.json)")
  try:
    source, _ = load_trained_model(source_workdir)
  except FileNotFoundError as e:
    raise ContractError(f"train.init_from: {e}") from None
  source_params = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
  found = {"loaded": [], "left": [], "skipped": []}
  matched, values = [], 0
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, other = "/".join(map(str, path)), source_params.get(path)
    if other is None:
      found["left"].append(name)
    elif (other.shape, other.dtype) != (param.shape, param.dtype):
      found["skipped"].append(f"{name} {tuple(other.shape)} -> {tuple(param.shape)}")
    else:
      found["loaded"].append(name)
      matched.append((path, other))
      values += int(np.prod(param.shape))
  nnx.update(model, nnx.from_flat_state(matched))
  log(f"train: init_from {source_workdir}: loaded {len(found['loaded'])} parameters ({values} values); "
      f"left as initialised {len(found['left'])}: {', '.join(found['left']) or '-'}; "
      f"skipped {len(found['skipped'])} (shape differs): {', '.join(found['skipped']) or '-'}")
  return found


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m trainers.train", description=__doc__.splitlines()[0])
  parser.add_argument("--data", help="a shard directory; omit it when the config's `data` names the datasets")
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
