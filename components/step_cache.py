"""A content-addressed step cache for local runs.

kfp.local's own cache keys on artifact URIs, which differ per run, so a step fed by an upstream artifact
never hits. Here the key is the step name, a digest of the step's code (its library packages), its
parameters and the content fingerprints of its input artifacts. A hit copies the cached outputs into place
and returns the cached result; a miss runs the step and stores its outputs under the key (temporary name,
then rename). Every component body goes through run_cached. It is enabled when the environment variable
CACHE_DIR_ENV names a directory: the local runner sets it for the steps it starts (runner/local_run.py);
remote runs use Vertex/KFP caching instead.
"""

import hashlib
import json
import os
import shutil
import sys
from typing import Any, Callable

CACHE_DIR_ENV = "PATCHFLOW_CACHE"
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_digest(packages: tuple[str, ...], root: str = _SOURCE_ROOT) -> str:
  digest = hashlib.sha256()
  for package in sorted(packages):
    for folder, _, names in sorted(os.walk(os.path.join(root, package))):
      for name in sorted(n for n in names if n.endswith(".py")):
        path = os.path.join(folder, name)
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
          digest.update(f.read())
  return digest.hexdigest()


def cache_key(step: str, packages: tuple[str, ...], params: dict, inputs: dict[str, str],
              root: str = _SOURCE_ROOT) -> str:
  from schemas.lineage import fingerprint_path
  payload = {"step": step, "code": code_digest(packages, root), "params": params,
             "inputs": {name: fingerprint_path(path) for name, path in sorted(inputs.items())}}
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _copy(src: str, dst: str) -> None:
  if os.path.isdir(src):
    shutil.copytree(src, dst, dirs_exist_ok=True)
  else:
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    shutil.copyfile(src, dst)


def run_cached(step: str, packages: tuple[str, ...], params: dict, inputs: dict[str, str],
               outputs: dict[str, str], fn: Callable[[], Any]) -> Any:
  """Runs fn() unless an identical step ran before; returns fn's (JSON-able) result either way."""
  cache_root = os.environ.get(CACHE_DIR_ENV)
  if not cache_root:
    return fn()
  key = cache_key(step, packages + ("components",), params, inputs)
  entry = os.path.join(cache_root, step, key)
  if os.path.exists(os.path.join(entry, "result.json")):
    for name, path in outputs.items():
      _copy(os.path.join(entry, name), path)
    with open(os.path.join(entry, "result.json"), encoding="utf-8") as f:
      result = json.load(f)
    print(f"cache: {step} hit {key}", file=sys.stderr, flush=True)
    return result
  result = fn()
  tmp = f"{entry}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  for name, path in outputs.items():
    _copy(path, os.path.join(tmp, name))
  with open(os.path.join(tmp, "result.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, sort_keys=True)
  if os.path.exists(entry):  # another run stored it meanwhile; same key, same content
    shutil.rmtree(tmp)
  else:
    os.replace(tmp, entry)
  print(f"cache: {step} stored {key}", file=sys.stderr, flush=True)
  return result
