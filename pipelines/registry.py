"""Pipeline registry: name -> KFP pipeline function. A small dict, not a plugin system."""

import importlib
import inspect
import json
import threading

from pipelines.parameters import ATTRIBUTE as RANGES_ATTRIBUTE
from schemas.errors import ContractError


# name -> the module whose build(target) defines it; imported on first use (each imports kfp and its components).
_PIPELINES = {"smoke": "pipelines.smoke", "calibration_study": "pipelines.calibration_study",
              "action_localisation": "pipelines.action_localisation"}
# kfp's DSL keeps the pipeline being defined in class attributes (dsl.pipeline_context.Pipeline's default
# pipeline, PipelineTask's task handler): two threads defining pipelines at once fail with `Nested pipelines
# are not allowed`. The UI serves requests on threads, so every definition goes through this lock.
_DEFINING = threading.Lock()


def names() -> list[str]:
  return sorted(_PIPELINES)


def get_pipeline(name: str, target: str | None = None):
  """The pipeline `name`, compiled against a runtime target of infra/targets.yaml when one is named."""
  if name not in _PIPELINES:
    raise ContractError(f"unknown pipeline {name!r} (known: {', '.join(names())})")
  from pipelines.targets import get_target
  settings = get_target(target) if target else None
  with _DEFINING:
    return importlib.import_module(_PIPELINES[name]).build(settings)


def signature(pipeline) -> dict[str, tuple[type, object]]:
  """Parameter name -> (type, default) from the Python function the pipeline was defined with."""
  fn = pipeline.pipeline_func
  return {name: (p.annotation, p.default) for name, p in inspect.signature(fn).parameters.items()}


def parameter_ranges(pipeline) -> dict:
  """Parameter name -> its declared `pipelines.parameters.Range`."""
  return getattr(pipeline.pipeline_func, RANGES_ATTRIBUTE, {})


def parse_parameters(pipeline, assignments: list[str]) -> dict[str, object]:
  """`key=value` strings -> typed parameters; unknown keys and wrong types name the parameter. A dotted key
  (`train.steps=50`) of a pipeline with an `overrides` parameter is a config override added to it."""
  sig = signature(pipeline)
  out = {}
  for assignment in assignments:
    if "=" not in assignment:
      raise ContractError(f"parameter {assignment!r}: expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    if "." in key and "overrides" in sig:
      out["overrides"] = {**out.get("overrides", {}), key: raw}
      continue
    if key not in sig:
      raise ContractError(f"unknown parameter {key!r} for pipeline {pipeline.name!r} "
                          f"(known: {', '.join(sorted(sig))})")
    out[key] = coerce(key, sig[key][0], raw)
  return out


def coerce(key: str, kind: type, raw) -> object:
  if not isinstance(raw, str):
    value = raw
  elif kind is bool:
    if raw.lower() not in ("true", "false", "1", "0"):
      raise ContractError(f"parameter {key!r}: expected bool, got {raw!r}")
    return raw.lower() in ("true", "1")
  elif kind in (list, dict):
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      raise ContractError(f"parameter {key!r}: expected a JSON {kind.__name__}, got {raw!r}") from None
  else:
    try:
      value = kind(raw)
    except ValueError:
      raise ContractError(f"parameter {key!r}: expected {kind.__name__}, got {raw!r}") from None
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise ContractError(f"parameter {key!r}: expected {kind.__name__}, got {raw!r}")
  return value


def dag_order(name: str) -> list[str]:
  """Task names in a topological order of the pipeline's DAG (for display)."""
  spec = get_pipeline(name).pipeline_spec
  tasks = spec.root.dag.tasks
  order, seen = [], set()

  def visit(task):
    if task in seen:
      return
    seen.add(task)
    for upstream in tasks[task].dependent_tasks:
      visit(upstream)
    order.append(task)
  for task in sorted(tasks):
    visit(task)
  return order
