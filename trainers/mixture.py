"""A run's data: a weighted mixture of datasets (big_vision's `config.input.data`), each read by a task through
one of the model's heads.

  config["data"] = {"up": 3, "down": 1}            # dataset name -> weight (a number > 0; normalised)
  config["datasets"] = {"up": {"shards": "gs://b/up", "task": "classification", "head": "up"},
                        "down": {"shards": "/data/down"}}

`task` defaults to classification and `head` to the dataset's name; datasets that share a head share its label
space. A config without `data` trains on the one shard directory given as `--data` (`train(data_dir, ...)`):
a mixture of one dataset named `data`, read by the config's `task` key (classification when absent).

A run on one dataset writes its records (config.json, the checkpoints' data position, final.json) as it
always has; a mixture of several writes each dataset's by name (`by_dataset`).
"""

import dataclasses
import hashlib
import math
import os

from schemas import dataset_info as info_lib
from schemas import storage
from schemas.errors import ContractError
from trainers.tasks import get_task
from trainers.tasks.task import Head, Task

SINGLE = "data"  # the name of the one dataset given as --data
DATASET_KEYS = ("shards", "task", "head")
DEFAULT_TASK = "classification"
# What config.json keeps of a dataset_info: every shape a model is built from (with its task's `info_keys`).
SAVED_INFO_KEYS = ("fingerprint", "seq_len", "patch_size", "max_images", "num_classes", "max_patches_per_image")


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  shards: str
  weight: float
  task: Task
  head: Head
  info: dict = dataclasses.field(compare=False)  # its dataset_info.json


def datasets_of(config: dict, data_dir: str | None) -> tuple[Dataset, ...]:
  """The run's datasets in name order, checked, each with the dataset_info of its shards."""
  entries = _entries(config, data_dir)
  return _with_heads(entries, {name: info_lib.read_dataset_info(e["shards"]) for name, e in entries.items()})


def saved_record(datasets) -> dict:
  """config.json's `data` (where the shards are) and `dataset_info` (their shapes)."""
  return {"data": by_dataset(datasets, lambda d: d.shards if storage.is_gcs(d.shards) else os.path.abspath(d.shards)),
          "dataset_info": by_dataset(datasets, lambda d: {k: d.info[k] for k in SAVED_INFO_KEYS + d.task.info_keys})}


def saved_datasets(saved: dict) -> tuple[Dataset, ...]:
  """The datasets of a finished run from its config.json (see saved_record), without reading the shards."""
  config = saved["config"]
  entries = _entries(config, None if "data" in config else saved["data"])
  infos = {name: saved["dataset_info"] for name in entries} if len(entries) == 1 else saved["dataset_info"]
  return _with_heads(entries, infos)


def by_dataset(datasets, value_of):
  """value_of(dataset) for a run on one dataset (what such runs always wrote), else {name: value_of(dataset)}."""
  if len(datasets) == 1:
    return value_of(datasets[0])
  return {d.name: value_of(d) for d in datasets}


def model_task(datasets) -> Task:
  """The task whose build_model builds the run's model: the first dataset's. The datasets may name different
  tasks of one model family (Task.family), whose builder gives each head the kind its task reads; tasks of
  different families would need two models."""
  first = datasets[0]
  for dataset in datasets[1:]:
    if dataset.task.family != first.task.family:
      raise ContractError(f"datasets.{dataset.name}.task: {dataset.task.name!r} trains a {dataset.task.family} model, "
                          f"but {first.name}'s {first.task.name!r} trains a {first.task.family} model; one run trains "
                          f"one model")
  return first.task


def data_position(step: int, config: dict, datasets, num_sequences: dict) -> dict:
  """What a resumed run must match to replay the same batches: the batch at step n is f(seed, n, data)."""
  position = {"next_step": step + 1, "seed": config["seed"], "batch_size": config["train"]["batch_size"],
              "num_sequences": by_dataset(datasets, lambda d: num_sequences[d.name]),
              "shards_sha256": by_dataset(datasets, _shards_sha256)}
  if len(datasets) > 1:
    position["weights"] = {d.name: d.weight for d in datasets}
  return position


def _shards_sha256(dataset: Dataset) -> str:
  return hashlib.sha256("".join(s["sha256"] for s in dataset.info["shards"]).encode()).hexdigest()


def _entries(config: dict, data_dir: str | None) -> dict[str, dict]:
  """name -> {weight, shards, task, head name}, in name order; a bad entry is an error naming its key."""
  if "data" not in config:
    if data_dir is None:
      raise ContractError("no data: give a shard directory (--data) or a config with `data` and `datasets`")
    task = get_task(config.get("task", DEFAULT_TASK))
    return {SINGLE: {"weight": 1.0, "shards": data_dir, "task": task, "head": SINGLE}}
  if data_dir is not None:
    raise ContractError(f"data: the config names its datasets, and --data {data_dir!r} was given too; give one")
  weights, specs = config["data"], config.get("datasets", {})
  if not isinstance(weights, dict) or not weights:
    raise ContractError(f"data: expected {{dataset name: weight}}, got {weights!r}")
  if not isinstance(specs, dict):
    raise ContractError(f"datasets: expected {{dataset name: {{shards, task, head}}}}, got {specs!r}")
  unweighted = sorted(set(specs) - set(weights))
  if unweighted:
    raise ContractError(f"datasets.{unweighted[0]}: not in data; give it a weight there")
  entries = {}
  for name in sorted(weights):
    weight = weights[name]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (weight > 0 and math.isfinite(weight)):
      raise ContractError(f"data.{name}: weight must be a number > 0, got {weight!r}")
    spec = specs.get(name)
    if not isinstance(spec, dict):
      raise ContractError(f"data.{name}: no entry datasets.{name} saying where its shards are")
    unknown = sorted(set(spec) - set(DATASET_KEYS))
    if unknown:
      raise ContractError(f"datasets.{name}.{unknown[0]}: unknown key (known: {', '.join(DATASET_KEYS)})")
    entry = {"weight": float(weight), "shards": spec.get("shards"), "head": spec.get("head", name),
             "task": get_task(spec.get("task", DEFAULT_TASK), f"datasets.{name}.task")}
    for key in ("shards", "head"):
      if not isinstance(entry[key], str) or not entry[key]:
        raise ContractError(f"datasets.{name}.{key}: expected a non-empty string, got {entry[key]!r}")
    entries[name] = entry
  return entries


def _with_heads(entries: dict, infos: dict) -> tuple[Dataset, ...]:
  """The datasets with their heads: a head's label space is its datasets' (they must agree); the heads of a
  model family sit side by side in name order (Head.offset; NaViT's one output layer holds them all)."""
  readers = {}  # head name -> the first dataset that reads it
  for name, entry in entries.items():
    first = readers.setdefault(entry["head"], name)
    same = (entries[first]["task"], infos[first]["num_classes"]) == (entry["task"], infos[name]["num_classes"])
    if not same:
      raise ContractError(f"datasets.{name}.head: head {entry['head']!r} is also read by {first}, with another task "
                          f"or label space ({infos[first]['num_classes']} classes, here {infos[name]['num_classes']})")
  heads, next_offset = {}, {}
  for head_name in sorted(readers):
    first = readers[head_name]
    task, num_classes = entries[first]["task"], infos[first]["num_classes"]
    heads[head_name] = Head(head_name, num_classes, next_offset.get(task.family, 0))
    next_offset[task.family] = heads[head_name].offset + num_classes
  return tuple(Dataset(name, e["shards"], e["weight"], e["task"], heads[e["head"]], infos[name])
               for name, e in entries.items())
