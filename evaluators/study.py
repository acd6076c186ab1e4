"""The calibration study's evaluation and report.

evaluate_variant: the members of one trained variant (trainers/variants.py) predict val, test and every
shifted test split with the variant's uncertainty method, and evaluators/calibration.py analyses the result:
  deterministic, label_smoothing: softmax of the logits of the one member;
  mc_dropout: mean over `mc_samples` stochastic passes (dropout on) of the softmax;
  ensemble: mean over the members (one per seed) of the softmax;
  temperature_scaling (post hoc, for variants with "temperature_scaling": true): logits / T, T fitted by
    `patchflow calibrate` on the val split of the unscaled predictions.
Cost is measured as wall milliseconds per image over all passes and members (jit compilation excluded).

render_study_report: (1) ECE vs accuracy of every model, in distribution (test) and at every shift level
(Minderer et al. 2021, figure 1 style); (2) an Uncertainty Baselines style leaderboard: method | accuracy |
NLL | ECE | shifted accuracy / NLL / ECE (means over the shift levels) | params | ms per example.
"""

import functools
import html
import json
import os
import time

import numpy as np

from evaluators import plots
from evaluators.calibration import calibrate
from evaluators.metrics import softmax
from evaluators.predict import PREDICT_FIELDS, shift_of, slot_logits, slot_rows

SUMMARY_FILENAME = "summary.json"
IN_DISTRIBUTION_SPLIT = "test"


def _param_count(model) -> int:
  import jax
  from flax import nnx
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))))


@functools.cache
def _forward():
  from flax import nnx
  return nnx.jit(lambda model, patches, patch_yx, segment_ids: model(patches, patch_yx, segment_ids))


def _padded_forward(model, batch_size: int = 32):
  """The jitted forward on batches padded to batch_size (padding sequences are all segment 0), so every
  split compiles one shape."""
  forward = _forward()

  def run(patches, patch_yx, segment_ids):
    n = len(patches)
    if n < batch_size:
      pad = lambda a: np.concatenate([a, np.zeros((batch_size - n, *a.shape[1:]), a.dtype)])
      patches, patch_yx, segment_ids = pad(patches), pad(patch_yx), pad(segment_ids)
    return np.asarray(forward(model, patches, patch_yx, segment_ids))[:n]
  return run


def method_scores(members: list, variant: dict, data: dict) -> tuple[np.ndarray, str]:
  """Scores [sequences, slots, classes] of one split and their column ("logits" or "probs")."""
  run = lambda model: slot_logits(_padded_forward(model), data)
  method = variant["method"]
  if method in ("deterministic", "label_smoothing"):
    return run(members[0]), "logits"
  if method == "mc_dropout":
    model = members[0]
    model.train()  # dropout on: every pass draws new masks
    try:
      return np.mean([softmax(run(model).astype(np.float64)) for _ in range(variant["mc_samples"])], axis=0), "probs"
    finally:
      model.eval()
  return np.mean([softmax(run(m).astype(np.float64)) for m in members], axis=0), "probs"


def _write_predictions(path: str, rows: dict, column: str) -> None:
  import pyarrow.parquet as pq
  from schemas.predictions import predictions_table
  table = predictions_table(rows["example_id"], rows["label"], np.stack(rows["scores"]), rows["split"],
                            rows["shift"], rows["resolution"], score_column=column)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(table, path + ".tmp")
  os.replace(path + ".tmp", path)


def summary_row(variant: dict, method: str, calibration: dict, params: int, ms_per_example: float) -> dict:
  splits = calibration["splits"]
  if IN_DISTRIBUTION_SPLIT not in splits:
    raise ValueError(f"no {IN_DISTRIBUTION_SPLIT!r} split in the predictions (have {sorted(splits)})")
  pick = lambda m: {k: m[k] for k in ("accuracy", "nll", "ece")}
  shifted = {shift_of(s): pick(m) for s, m in splits.items() if shift_of(s) != "none"}
  mean = lambda key: float(np.mean([m[key] for m in shifted.values()])) if shifted else None
  return {"model": variant["name"], "method": method, "width": variant["width"], "depth": variant["depth"],
          "members": len(variant["seeds"]), "params": params, "ms_per_example": ms_per_example,
          **pick(splits[IN_DISTRIBUTION_SPLIT]),
          "shifted_accuracy": mean("accuracy"), "shifted_nll": mean("nll"), "shifted_ece": mean("ece"),
          "shifts": shifted, "temperature": calibration["temperature"]}


def evaluate_variant(shard_dir: str, checkpoints_dir: str, output_dir: str, log=print) -> list[dict]:
  """Writes <method>/predictions.parquet + calibration outputs and summary.json (the leaderboard rows)."""
  from schemas import dataset_info as info_lib
  from schemas.shards import load_split
  from trainers.train import load_trained_model
  from trainers.variants import VARIANT_FILENAME
  with open(os.path.join(checkpoints_dir, VARIANT_FILENAME), encoding="utf-8") as f:
    record = json.load(f)
  variant = record["variant"]
  info = info_lib.read_dataset_info(shard_dir)
  members = [load_trained_model(os.path.join(checkpoints_dir, m["dir"]))[0] for m in record["members"]]
  params = sum(_param_count(m) for m in members)
  data = {s: load_split(shard_dir, s, info, fields=PREDICT_FIELDS) for s in info["splits"] if s != "train"}
  first = next(iter(data.values()))  # compiles (one batch shape, the method's dropout mode) outside the timing
  method_scores(members, {**variant, "mc_samples": 1}, {k: v[:1] for k, v in first.items()})
  rows = {k: [] for k in ("example_id", "label", "scores", "resolution", "split", "shift")}
  seconds, images, column = 0.0, 0, "logits"
  for split, split_data in data.items():
    start = time.perf_counter()
    scores, column = method_scores(members, variant, split_data)
    seconds += time.perf_counter() - start
    part = slot_rows(split_data, scores, info)
    images += len(part["label"])
    for key, value in (("example_id", part["example_id"]), ("label", part["label"]), ("scores", part["logits"]),
                       ("resolution", part["resolution"])):
      rows[key].extend(value)
    rows["split"].extend([split] * len(part["label"]))
    rows["shift"].extend([shift_of(split)] * len(part["label"]))
  ms_per_example = seconds * 1000 / max(images, 1)
  quiet = lambda message: None
  method_dir = os.path.join(output_dir, variant["method"])
  _write_predictions(os.path.join(method_dir, "predictions.parquet"), rows, column)
  result = calibrate(os.path.join(method_dir, "predictions.parquet"), method_dir, log=quiet)
  summary = [summary_row(variant, variant["method"], result, params, ms_per_example)]
  if variant["temperature_scaling"] and column == "logits":
    scaled = {**rows, "scores": list(np.stack(rows["scores"]) / result["temperature"])}
    scaled_dir = os.path.join(output_dir, "temperature_scaling")
    _write_predictions(os.path.join(scaled_dir, "predictions.parquet"), scaled, "logits")
    scaled_result = calibrate(os.path.join(scaled_dir, "predictions.parquet"), scaled_dir, log=quiet)
    row = summary_row(variant, "temperature_scaling", scaled_result, params, ms_per_example)
    row["temperature"] = result["temperature"]  # the T applied (the scaled predictions refit to about 1)
    summary.append(row)
  for row in summary:
    log(f"study: {row['model']}/{row['method']}: test accuracy {row['accuracy']:.3f} nll {row['nll']:.3f} "
        f"ece {row['ece']:.3f}; shifted accuracy {row['shifted_accuracy'] or float('nan'):.3f} "
        f"ece {row['shifted_ece'] or float('nan'):.3f}; {row['params']} params, {row['ms_per_example']:.2f} ms/image")
  _write_summary(output_dir, summary)
  return summary


def _write_summary(output_dir: str, rows: list[dict]) -> None:
  """output_dir/summary.json, written to a temporary name and renamed."""
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, SUMMARY_FILENAME + ".tmp"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1, sort_keys=True)
  os.replace(os.path.join(output_dir, SUMMARY_FILENAME + ".tmp"), os.path.join(output_dir, SUMMARY_FILENAME))


_METHOD_ORDER = ("deterministic", "temperature_scaling", "label_smoothing", "mc_dropout", "ensemble")


def evaluate_model(shard_dir: str, checkpoints_dir: str, output_dir: str, log=print) -> list[dict]:
  """evaluate_variant for every variant that trainers.variants.train_model wrote (checkpoints_dir/<method>),
  into output_dir/<method>; output_dir/summary.json holds all their leaderboard rows."""
  from trainers.variants import VARIANT_FILENAME
  methods = sorted((m for m in os.listdir(checkpoints_dir)
                    if os.path.exists(os.path.join(checkpoints_dir, m, VARIANT_FILENAME))),
                   key=lambda m: _METHOD_ORDER.index(m) if m in _METHOD_ORDER else 99)
  rows = []
  for method in methods:
    rows += evaluate_variant(shard_dir, os.path.join(checkpoints_dir, method), os.path.join(output_dir, method),
                             log=log)
  _write_summary(output_dir, rows)
  return rows


def render_study_report(evaluation_dirs: list[str], output_path: str) -> list[dict]:
  """report.html of the study from the evaluate_variant outputs; returns the leaderboard rows."""
  from evaluators.report import _STYLE, _img, _table
  rows = []
  for directory in evaluation_dirs:
    with open(os.path.join(directory, SUMMARY_FILENAME), encoding="utf-8") as f:
      rows.extend(json.load(f))
  rows.sort(key=lambda r: (r["params"] / r["members"], r["model"], _METHOD_ORDER.index(r["method"])
                           if r["method"] in _METHOD_ORDER else 99))
  number = lambda v, digits=4: "n/a" if v is None else round(float(v), digits)
  board = [[f"{r['model']} / {r['method']}", number(r["accuracy"]), number(r["nll"]), number(r["ece"]),
            number(r["shifted_accuracy"]), number(r["shifted_nll"]), number(r["shifted_ece"]), r["params"],
            number(r["ms_per_example"], 3)] for r in rows]
  points = []
  for r in rows:
    name = f"{r['model']} / {r['method']}"
    points.append({"name": name, "shift": "none", "accuracy": r["accuracy"], "ece": r["ece"]})
    points += [{"name": name, "shift": s, "accuracy": m["accuracy"], "ece": m["ece"]} for s, m in r["shifts"].items()]
  shifts = sorted({s for r in rows for s in r["shifts"]})
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>patchflow calibration study</title>"
           f"<style>{_STYLE}</style></head><body><h1>patchflow calibration study</h1>",
           f"<p>{len(rows)} model/method pairs on the synthetic source; in distribution = the "
           f"<code>{IN_DISTRIBUTION_SPLIT}</code> split, shifted = mean over the shift levels "
           f"({html.escape(', '.join(shifts)) or 'none'}). ECE: top-label, 15 equal-width bins. Temperature "
           "scaling: T fitted on val. ms per example: all passes and members, CPU.</p>",
           "<h2>ECE vs accuracy, in and out of distribution</h2>",
           _img(plots.ece_vs_accuracy(points, "ECE vs accuracy (marker: shift level)"), "ece vs accuracy"),
           "<h2>Leaderboard</h2>",
           _table(["method", "accuracy", "NLL", "ECE", "shifted accuracy", "shifted NLL", "shifted ECE", "params",
                   "ms per example"], board),
           "<h2>Per shift level</h2>",
           _table(["method", *[f"{s} accuracy" for s in shifts], *[f"{s} ECE" for s in shifts]], [
               [f"{r['model']} / {r['method']}", *[number(r["shifts"].get(s, {}).get("accuracy")) for s in shifts],
                *[number(r["shifts"].get(s, {}).get("ece")) for s in shifts]] for r in rows]),
           "<h2>Temperatures</h2>",
           _table(["method", "temperature (fitted on val)"], [[f"{r['model']} / {r['method']}",
                                                               number(r["temperature"], 3)] for r in rows]),
           "</body></html>"]
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path + ".tmp", "w", encoding="utf-8") as f:
    f.write("\n".join(parts))
  os.replace(output_path + ".tmp", output_path)
  return rows
