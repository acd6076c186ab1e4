"""Lineage: what every artifact records about how it was made (git revision, config, input fingerprints)."""

import hashlib
import json
import os
import subprocess
from typing import Any

LINEAGE_FILENAME = "lineage.json"
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_revision() -> str:
  """The patchflow source revision, with '+dirty' when the tree has uncommitted changes."""
  try:
    rev = subprocess.run(["git", "-C", _SOURCE_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "-C", _SOURCE_ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    return rev + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return os.environ.get("PATCHFLOW_GIT_REVISION", "unknown")


def fingerprint_path(path: str) -> str:
  """sha256 over relative paths and bytes of every file under `path` (or of the file itself)."""
  digest = hashlib.sha256()
  if path.startswith("gs://"):
    from schemas import storage
    for rel, content_hash in storage.gcs_listing(path):
      if not rel.endswith(LINEAGE_FILENAME):
        digest.update(rel.encode() + b"\0" + content_hash.encode() + b"\0")
    return digest.hexdigest()
  if os.path.isfile(path):
    files = [(os.path.basename(path), path)]
  else:
    files = sorted((os.path.relpath(os.path.join(d, n), path), os.path.join(d, n))
                   for d, _, names in os.walk(path) for n in names if n != LINEAGE_FILENAME)
  for rel, full in files:
    digest.update(rel.encode() + b"\0")
    with open(full, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()


def write_lineage(artifact_dir: str, step: str, config: dict[str, Any], inputs: dict[str, str],
                  fingerprints: dict[str, str] | None = None) -> dict:
  """`fingerprints` may hold precomputed fingerprint_path() values by input name (e.g. hashed while the
  step was reading the input)."""
  from schemas.packed import SCHEMA_VERSION
  known = fingerprints or {}
  record = {"step": step, "git_revision": git_revision(), "schema_version": SCHEMA_VERSION, "config": config,
            "inputs": {name: {"path": path, "fingerprint": known.get(name) or fingerprint_path(path)}
                       for name, path in inputs.items()}}
  os.makedirs(artifact_dir, exist_ok=True)
  with open(os.path.join(artifact_dir, LINEAGE_FILENAME), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  return record
