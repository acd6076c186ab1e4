"""Prediction over packed shards: one row per image slot into predictions.parquet (the contract's columns),
then metrics per split and per shift into metrics.json."""

import json
import os

import numpy as np
import pyarrow.parquet as pq

from evaluators.metrics import classification_metrics
from schemas import dataset_info as info_lib
from schemas.lineage import write_lineage
from schemas.predictions import predictions_table
from schemas.shards import load_split

SHIFT_PREFIX = "test-"  # split "test-noise2" is the test split under shift "noise2".


def shift_of(split: str) -> str:
  return split[len(SHIFT_PREFIX):] if split.startswith(SHIFT_PREFIX) else "none"


PREDICT_FIELDS = ("patches", "patch_yx", "segment_ids", "labels", "example_ids", "image_grid")


def slot_logits(model, data: dict, batch_size: int = 32) -> np.ndarray:
  """Logits [sequences, max_images, classes] of a loaded split, batch by batch."""
  return np.concatenate([
      np.asarray(model(data["patches"][s:s + batch_size], data["patch_yx"][s:s + batch_size],
                       data["segment_ids"][s:s + batch_size]))
      for s in range(0, len(data["labels"]), batch_size)])


def slot_rows(data: dict, scores: np.ndarray, info: dict) -> dict:
  """One row per filled image slot: example_id, label, scores [C], resolution."""
  filled = data["labels"] >= 0
  return {"example_id": [i.decode() for i in data["example_ids"][filled]], "label": data["labels"][filled],
          "logits": scores[filled], "resolution": data["image_grid"][filled].max(axis=-1) * info["patch_size"]}


def predict_split(model, shard_dir: str, split: str, info: dict, batch_size: int = 32) -> dict:
  data = load_split(shard_dir, split, info, fields=PREDICT_FIELDS)
  return slot_rows(data, slot_logits(model, data, batch_size), info)


def predict_and_evaluate(shard_dir: str, train_workdir: str, output_dir: str, log=print) -> dict:
  """Writes predictions.parquet and metrics.json under output_dir for every split but `train`."""
  from trainers.train import load_trained_model
  info = info_lib.read_dataset_info(shard_dir)
  model, _ = load_trained_model(train_workdir)
  splits = [s for s in info["splits"] if s != "train"]
  rows = {k: [] for k in ("example_id", "label", "logits", "resolution", "split", "shift")}
  metrics = {"splits": {}}
  for split in splits:
    part = predict_split(model, shard_dir, split, info)
    for key in ("example_id", "label", "logits", "resolution"):
      rows[key].extend(part[key])
    rows["split"].extend([split] * len(part["label"]))
    rows["shift"].extend([shift_of(split)] * len(part["label"]))
    metrics["splits"][split] = {"shift": shift_of(split), **classification_metrics(part["logits"], part["label"])}
    m = metrics["splits"][split]
    log(f"evaluate: {split}: accuracy {m['accuracy']:.3f} nll {m['nll']:.3f} ece {m['ece']:.3f} "
        f"({m['num_examples']} images)")
  metrics["num_classes"] = info["num_classes"]
  metrics["chance_accuracy"] = 1.0 / info["num_classes"]
  os.makedirs(output_dir, exist_ok=True)
  table = predictions_table(rows["example_id"], rows["label"], np.stack(rows["logits"]), rows["split"],
                            rows["shift"], rows["resolution"])
  path = os.path.join(output_dir, "predictions.parquet")
  pq.write_table(table, path + ".tmp")
  os.replace(path + ".tmp", path)
  with open(os.path.join(output_dir, "metrics.json.tmp"), "w", encoding="utf-8") as f:
    json.dump(json_safe(metrics), f, indent=1, sort_keys=True, allow_nan=False)
  os.replace(os.path.join(output_dir, "metrics.json.tmp"), os.path.join(output_dir, "metrics.json"))
  write_lineage(output_dir, "evaluate", {"splits": splits}, {"shards": shard_dir, "checkpoint": train_workdir})
  return metrics


def json_safe(value):
  """NaN (an empty reliability bin) becomes null: strict JSON, readable by any parser."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value
