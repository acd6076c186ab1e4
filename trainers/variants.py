"""Variants of the calibration study: a model size and an uncertainty method, trained as one or more members.

A variant is a dict (a KFP ParallelFor item), for example
  {"name": "S", "width": 32, "depth": 1, "method": "mc_dropout", "dropout": 0.2, "mc_samples": 8}
Methods: deterministic | label_smoothing | mc_dropout | ensemble. Temperature scaling is post hoc: a variant
with "temperature_scaling": true is also evaluated with its logits divided by the temperature fitted on val.

The study's ParallelFor runs over models: a size with its methods,
  {"name": "S", "width": 32, "depth": 1, "methods": [{"method": "deterministic"}, {"method": "ensemble"}]}
and `train_model` trains each distinct member once: members whose configs are equal are the same model
(training is deterministic given config and seed), e.g. the deterministic model and the ensemble's seed-0
member.
"""

import json
import os

from schemas.errors import ContractError

METHODS = ("deterministic", "label_smoothing", "mc_dropout", "ensemble")
DEFAULTS = {"label_smoothing": 0.1, "dropout": 0.2, "mc_samples": 8, "seeds": None, "temperature_scaling": False,
            "heads": 4, "mlp_dim": None}
VARIANT_FILENAME = "variant.json"


def validate_variant(variant: dict) -> dict:
  """The variant with defaults filled in; a missing or wrong key is an error naming the variant and key."""
  if not isinstance(variant, dict):
    raise ContractError(f"variant {variant!r}: expected a dict")
  where = f"variant {variant.get('name', '?')}/{variant.get('method', '?')}"
  unknown = sorted(set(variant) - {"name", "width", "depth", "method"} - set(DEFAULTS))
  if unknown:
    raise ContractError(f"{where}: unknown key {unknown[0]!r}")
  for key in ("name", "width", "depth", "method"):
    if key not in variant:
      raise ContractError(f"{where}: missing key {key!r}")
  if variant["method"] not in METHODS:
    raise ContractError(f"{where}: method must be one of {', '.join(METHODS)}")
  out = {**DEFAULTS, **variant}
  # KFP passes a ParallelFor item through a protobuf Struct, where every number is a float.
  integral = lambda v: int(v) if isinstance(v, float) and v.is_integer() else v
  for key in ("width", "depth", "mc_samples", "heads", "mlp_dim"):
    out[key] = integral(out[key])
  out["seeds"] = [integral(s) for s in (out["seeds"] or ([0, 1, 2] if out["method"] == "ensemble" else [0]))]
  out["mlp_dim"] = out["mlp_dim"] or 2 * out["width"]
  if not all(isinstance(s, int) for s in out["seeds"]):
    raise ContractError(f"{where}: 'seeds' must be ints, got {out['seeds']!r}")
  for key in ("width", "depth", "mc_samples", "heads", "mlp_dim"):
    if not isinstance(out[key], int) or out[key] < 1:
      raise ContractError(f"{where}: {key!r} must be a positive int, got {out[key]!r}")
  if out["method"] == "ensemble" and len(out["seeds"]) < 2:
    raise ContractError(f"{where}: an ensemble needs at least 2 seeds")
  return out


def member_overrides(variant: dict, seed: int) -> dict:
  """Config overrides (on top of the study-wide config) for one member."""
  return {"seed": seed, "model.width": variant["width"], "model.depth": variant["depth"],
          "model.heads": variant["heads"], "model.mlp_dim": variant["mlp_dim"],
          "model.dropout": float(variant["dropout"]) if variant["method"] == "mc_dropout" else 0.0,
          "train.label_smoothing": float(variant["label_smoothing"]) if variant["method"] == "label_smoothing"
          else 0.0}


def base_config(config: str | dict, overrides: dict) -> dict:
  """The study-wide config: `config` (a name, a path or a config dict) with `overrides` (steps, batch size, ...)."""
  from trainers.configs import apply_overrides, load_config
  return apply_overrides(load_config(config) if isinstance(config, str) else config, overrides)


def train_variant(shard_dir: str, workdir: str, variant: dict, overrides: dict, log=print,
                  config: str | dict = "smoke") -> dict:
  """Trains every member of a variant under workdir/member-<seed> (seed = the config's seed + variant seed) and
  writes variant.json; `overrides` apply to `config` study-wide, each member's own overrides on top."""
  from trainers.configs import apply_overrides
  from trainers.train import train
  variant = validate_variant(variant)
  base = base_config(config, overrides)
  members = []
  for offset in variant["seeds"]:
    seed = base["seed"] + offset
    log(f"study: training {variant['name']}/{variant['method']} member seed {seed}")
    final = train(shard_dir, os.path.join(workdir, f"member-{seed}"), apply_overrides(base, member_overrides(variant, seed)),
                  log=log)
    members.append({"seed": seed, "dir": f"member-{seed}", "final": final})
  return _write_record(workdir, {"variant": variant, "members": members})


def _write_record(directory: str, record: dict) -> dict:
  """directory/variant.json, written to a temporary name and renamed; returns the record."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, VARIANT_FILENAME + ".tmp"), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(os.path.join(directory, VARIANT_FILENAME + ".tmp"), os.path.join(directory, VARIANT_FILENAME))
  return record


def model_variants(model: dict) -> list[dict]:
  """The variants of one model entry: its size keys merged into each of its methods (one variant per method)."""
  if not isinstance(model, dict) or not model.get("methods"):
    raise ContractError(f"model {model!r}: expected a dict with a non-empty 'methods' list")
  size = {k: v for k, v in model.items() if k != "methods"}
  variants = [validate_variant({**size, **method}) for method in model["methods"]]
  methods = [v["method"] for v in variants]
  if len(set(methods)) < len(methods):
    raise ContractError(f"model {model.get('name', '?')}: a method appears twice in {methods}")
  return variants


# Every member override, labelled in the order of the directory name.
_MEMBER_NAME_LABELS = {"seed": "seed", "model.dropout": "dropout", "train.label_smoothing": "ls", "model.width": "w",
                       "model.depth": "d", "model.heads": "h", "model.mlp_dim": "mlp"}


def _member_name(overrides: dict) -> str:
  """Every override is in the name (one without a label fails here), so members share a directory only when
  they are the same model."""
  order = list(_MEMBER_NAME_LABELS)
  return "member-" + "-".join(f"{_MEMBER_NAME_LABELS[key]}{overrides[key]:g}"
                              for key in sorted(overrides, key=order.index))


def train_model(shard_dir: str, workdir: str, model: dict, overrides: dict, log=print,
                config: str | dict = "smoke") -> list[dict]:
  """Trains the members of every variant of a model, each distinct member once, under workdir/member-*;
  writes workdir/<method>/variant.json (members' dirs relative to it) for evaluators.study.evaluate_variant.
  `overrides` apply to `config` study-wide, each member's own overrides on top."""
  from trainers.configs import apply_overrides
  from trainers.train import train
  base = base_config(config, overrides)
  trained, records = {}, []
  for variant in model_variants(model):
    members = []
    for offset in variant["seeds"]:
      seed = base["seed"] + offset
      member = member_overrides(variant, seed)
      name = _member_name(member)
      if name not in trained:
        log(f"study: training {variant['name']} {name} (for {variant['method']})")
        trained[name] = train(shard_dir, os.path.join(workdir, name), apply_overrides(base, member), log=log)
      else:
        log(f"study: {variant['name']}/{variant['method']} member seed {seed} is {name}, already trained")
      members.append({"seed": seed, "dir": os.path.join("..", name), "final": trained[name]})
    records.append(_write_record(os.path.join(workdir, variant["method"]), {"variant": variant, "members": members}))
  return records
