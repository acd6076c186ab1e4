"""dataset_info.json: the description of a shard directory that every reader takes its shapes from."""

import json
import re
from typing import Any

from schemas import storage
from schemas.errors import ContractError
from schemas.manifest import split_name_problem
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
    raise ContractError(f"{path}: not found; is {shard_dir!r} a patchflow shard directory (and not a build that "
                        f"did not finish)?")
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


_SHARD_PATH = re.compile(r"([^/]+)/shard-[0-9]{5,}-of-[0-9]{5,}\.tfrecord")
_ANOTHER_BUILD = "a shard of another build, or of a rebuild that did not finish; rebuild the directory"


def split_shards(shard_dir: str, info: dict[str, Any], split: str) -> list[tuple[str, dict[str, Any]]]:
  """(path, dataset_info entry) of each shard of `split`; an entry whose path could lead outside shard_dir is
  refused."""
  if split not in info["splits"]:
    raise ContractError(f"{shard_dir}: no split {split!r} (has: {sorted(info['splits'])})")
  shards = []
  for entry in info["shards"]:
    if entry["split"] != split:
      continue
    match = _SHARD_PATH.fullmatch(entry["path"])
    if not match or split_name_problem(match.group(1)):
      raise ContractError(f"{storage.join(shard_dir, FILENAME)}: shard path {entry['path']!r} is not "
                          f"SPLIT/shard-SSSSS-of-NNNNN.tfrecord")
    shards.append((storage.join(shard_dir, entry["path"]), entry))
  return shards


def check_shard(entry: dict[str, Any], found, path: str) -> None:
  """Refuses a shard file that is not the one its dataset_info entry describes: `found` is the file's
  `tfrecord.RecordIndex` (its size and the digest of its records' CRCs), which the readers walk anyway. Entries
  of builds from before these keys were recorded carry neither and are read as before (every record's CRC is
  still checked as it is read)."""
  if "num_bytes" not in entry:
    return
  if found.num_bytes != entry["num_bytes"]:
    raise ContractError(f"{path}: not the shard that dataset_info.json describes ({found.num_bytes} bytes, not "
                        f"{entry['num_bytes']}): {_ANOTHER_BUILD}")
  if found.crc_digest != entry["crc_digest"]:
    raise ContractError(f"{path}: not the shard that dataset_info.json describes (its records' CRC digest "
                        f"differs): {_ANOTHER_BUILD}")
