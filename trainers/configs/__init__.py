"""Config registry: name -> module with get_config(); `--set key=value` overrides dotted keys.

A pipeline's train step builds its config the same way (build_config): a config name or file, then the
pipeline's shortcut parameters (SHORTCUTS; 0 keeps the config's value), then a dict of dotted overrides.
"""

import ast
import copy
import importlib
import importlib.util
import os

from schemas.errors import ContractError

NAMES = ("smoke", "navit_s16", "navit_b16", "star_tiny")
# Pipeline parameters that stand for a config key, for `patchflow run smoke --set steps=50`.
SHORTCUTS = {"steps": "train.steps", "batch_size": "train.batch_size", "learning_rate": "train.learning_rate",
             "width": "model.width", "depth": "model.depth"}
REQUIRED_KEYS = ("seed", "train.steps", "train.batch_size", "train.checkpoint_every", "train.log_every",
                 "mesh.data", "mesh.model")


def load_config(name_or_path: str) -> dict:
  if name_or_path in NAMES:
    module = importlib.import_module(f"trainers.configs.{name_or_path}")
  elif os.path.isfile(name_or_path):
    spec = importlib.util.spec_from_file_location("patchflow_user_config", name_or_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    raise ContractError(f"config {name_or_path!r}: not a known name ({', '.join(NAMES)}) nor a file")
  config = module.get_config()
  validate_config(config, name_or_path)
  return config


def validate_config(config: dict, where: str) -> None:
  for dotted in REQUIRED_KEYS:
    node = config
    for part in dotted.split("."):
      if not isinstance(node, dict) or part not in node:
        raise ContractError(f"config {where!r}: missing required key {dotted!r}")
      node = node[part]
    if dotted != "seed" and (not isinstance(node, int) or node < 1):
      raise ContractError(f"config {where!r}: key {dotted!r} must be a positive int, got {node!r}")


def apply_overrides(config: dict, overrides: dict) -> dict:
  """Returns a copy with dotted keys replaced; unknown keys and type changes are errors naming the key."""
  config = copy.deepcopy(config)
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
      if not isinstance(node.get(part), dict):
        raise ContractError(f"config override {dotted!r}: unknown key {part!r}")
      node = node[part]
    if leaf not in node or isinstance(node[leaf], dict):
      raise ContractError(f"config override {dotted!r}: unknown key {leaf!r}")
    old = node[leaf]
    if isinstance(value, str) and not isinstance(old, str):
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        raise ContractError(f"config override {dotted!r}: cannot parse {value!r}") from None
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    # A dict pipeline parameter reaches a KFP step through a protobuf Struct, where every number is a float.
    if type(old) is int and isinstance(value, float) and value.is_integer():
      value = int(value)
    if type(value) is not type(old):
      raise ContractError(f"config override {dotted!r}: expected {type(old).__name__}, got {value!r}")
    node[leaf] = value
  validate_config(config, "after overrides")
  return config


def build_config(name_or_path: str, overrides: dict, **shortcuts) -> dict:
  """What a pipeline's train step trains: the config, then its shortcut parameters (keys of SHORTCUTS; 0 keeps
  the config's value), then `overrides` (dotted keys, which win)."""
  unknown = sorted(set(shortcuts) - set(SHORTCUTS))
  if unknown:
    raise ContractError(f"unknown shortcut parameter {unknown[0]!r} (known: {', '.join(SHORTCUTS)})")
  if not isinstance(overrides, dict):
    raise ContractError(f"overrides: expected a JSON object of dotted config keys, got {overrides!r}")
  from_shortcuts = {SHORTCUTS[name]: value for name, value in shortcuts.items() if value}
  return apply_overrides(load_config(name_or_path), {**from_shortcuts, **overrides})
