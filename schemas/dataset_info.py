"""dataset_info.json: the description of a shard directory that every reader takes its shapes from."""

import json
import os
from typing import Any

from schemas import storage
from schemas.errors import ContractError
from schemas.packed import PackedSpec, check_fingerprint

FILENAME = "dataset_info.json"
ERRORS_FILENAME = "errors.jsonl"
REQUIRED_KEYS = ("schema_version", "fingerprint", "seq_len", "patch_size", "max_images", "text_len",
                 "num_classes", "num_examples", "num_sequences", "num_errors", "packing_efficiency",
                 "tokens_dropped", "splits", "shards")


def validate_dataset_info(info: dict[str, Any], where: str = FILENAME) -> dict[str, Any]:
  missing = [k for k in REQUIRED_KEYS if k not in info]
  if missing:
    raise ContractError(f"{where}: missing key {missing[0]!r}")
  version = check_fingerprint(info["fingerprint"], where)
  if info["schema_version"] != version:
    raise ContractError(f"{where}: key 'schema_version' is {info['schema_version']!r}, but fingerprint "
                        f"{info['fingerprint']!r} is schema version {version}")
  for key in ("seq_len", "patch_size", "max_images", "num_classes"):
    if not isinstance(info[key], int) or info[key] < 1:
      raise ContractError(f"{where}: key {key!r} must be a positive int, got {info[key]!r}")
  if not isinstance(info["splits"], dict):
    raise ContractError(f"{where}: key 'splits' must map split name -> counts")
  return info


def read_dataset_info(shard_dir: str) -> dict[str, Any]:
  path = storage.join(shard_dir, FILENAME)
  if not storage.exists(path):
    raise ContractError(f"{path}: not found; is {shard_dir!r} a patchflow shard directory?")
  with storage.open_file(path, "r") as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise ContractError(f"{path}: not valid JSON ({e.msg})") from None
  return validate_dataset_info(info, path)


def packed_spec(info: dict[str, Any]) -> PackedSpec:
  """The fields of the shards described, as their schema version had them."""
  return PackedSpec(seq_len=info["seq_len"], patch_size=info["patch_size"], max_images=info["max_images"],
                    text_len=info.get("text_len", 0), video=info.get("video", False),
                    version=info["schema_version"])


def split_shard_paths(shard_dir: str, info: dict[str, Any], split: str) -> list[str]:
  if split not in info["splits"]:
    raise ContractError(f"{shard_dir}: no split {split!r} (has: {sorted(info['splits'])})")
  return [storage.join(shard_dir, s["path"]) for s in info["shards"] if s["split"] == split]
