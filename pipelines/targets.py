"""Runtime targets (infra/targets.yaml): the image and per-step resources applied at compile time."""

import os

import yaml

from schemas.errors import ContractError

TARGETS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "infra", "targets.yaml")
_STEP_KEYS = {"cpu", "memory", "accelerator"}


def load_targets(path: str = TARGETS_FILE) -> dict:
  with open(path, encoding="utf-8") as f:
    targets = yaml.safe_load(f)
  for name, target in targets.items():
    if "image" not in target:
      raise ContractError(f"{path}: target {name!r} has no 'image'")
    if not all(isinstance(a, str) for a in target.get("beam_args", [])):
      raise ContractError(f"{path}: target {name!r}: 'beam_args' must be a list of strings")
    for step, resources in (target.get("steps") or {}).items():
      unknown = set(resources) - _STEP_KEYS
      if unknown:
        raise ContractError(f"{path}: target {name!r} step {step!r}: unknown key {sorted(unknown)[0]!r}")
  return targets


def get_target(name: str) -> dict:
  targets = load_targets()
  if name not in targets:
    raise ContractError(f"unknown target {name!r} (known: {', '.join(targets)})")
  return {"name": name, **targets[name]}


def configure_task(task, step: str, target: dict | None):
  """Applies a target's image and resources to one pipeline task; returns the task."""
  if target is None:
    return task
  task.set_container_image(target["image"])
  resources = (target.get("steps") or {}).get(step, {})
  if "cpu" in resources:
    task.set_cpu_limit(str(resources["cpu"]))
  if "memory" in resources:
    task.set_memory_limit(str(resources["memory"]))
  if "accelerator" in resources:
    task.set_accelerator_type(resources["accelerator"]["type"])
    task.set_accelerator_limit(int(resources["accelerator"]["count"]))
  return task
