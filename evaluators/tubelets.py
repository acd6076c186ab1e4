"""Action localisation of a trained STAR model on a split of tubelet shards: detections, the ground truth they
meet, frame- and video-mAP (evaluators/localisation.py), and a report.html with pictures of the tubes.

Detections and ground truth are on the same frames: the frames packed in the shards (`--video-frames`
sampled from each clip), each written as its source frame index (`frame_t`), as `patchflow
localisation-metrics` expects; the video of a tube is its slot's example id. A clip's actors on frames that
were not sampled are not scored, since the model never saw those frames.
"""

import json
import os

import numpy as np
from flax import nnx

from evaluators import plots
from evaluators.localisation import localisation_metrics
from evaluators.report import _STYLE, _img, _read_json, _table, lineage_parts, write_page
from schemas import dataset_info as info_lib
from schemas.lineage import write_lineage
from schemas.shards import load_split, tubelet_arrays

DETECTIONS_FILENAME, GROUND_TRUTH_FILENAME = "detections.jsonl", "ground_truth.jsonl"
# Low: average precision ranks every detection, so low-scoring ones still add recall at the bottom of the list.
SCORE_THRESHOLD = 0.05
MODEL_FIELDS = ("patches", "patch_yx", "patch_t", "segment_ids")  # STAR's inputs, in its call order
FIELDS = (*MODEL_FIELDS, "example_ids", "frame_t", "tube_labels", "tube_boxes", "tube_present")


def ground_truth_tubes(data: dict, tubes: dict) -> list[dict]:
  """The true tubes of a loaded split at its packed frames: {"video", "label", "boxes": [[t, 4 coords], ...]}."""
  out = []
  for b, m in np.ndindex(data["example_ids"].shape):
    video = data["example_ids"][b, m].decode()
    for a in np.flatnonzero(tubes["tube_labels"][b, m] >= 0):
      frames = np.flatnonzero(tubes["tube_present"][b, m, a])
      if frames.size:  # an actor only on frames that were not sampled has nothing to be found on
        out.append({"video": video, "label": int(tubes["tube_labels"][b, m, a]),
                    "boxes": [[int(tubes["frame_t"][b, m, f]), *_coordinates(tubes["tube_boxes"][b, m, a, f])]
                              for f in frames]})
  return out


def detected_tubes(detections, data: dict, tubes: dict) -> list[dict]:
  """trainers.star.predict_tubelets' detections [b][m] as scored tubes on source frames (packed frame f -> t =
  frame_t[f]; frames past the slot's own are dropped)."""
  out = []
  for b, row in enumerate(detections):
    for m, slot in enumerate(row):
      frame_t = tubes["frame_t"][b, m]
      for detection in slot:
        boxes = [[int(frame_t[f]), *_coordinates(coords)] for f, *coords in detection["boxes"] if frame_t[f] >= 0]
        if boxes:
          out.append({"video": data["example_ids"][b, m].decode(), "label": detection["label"],
                      "score": detection["score"], "boxes": boxes})
  return out


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([rows, np.zeros((size - len(rows), *rows.shape[1:]), rows.dtype)]) if len(rows) < size else rows


def _coordinates(box) -> list[float]:
  """Normalised coordinates as written: float32 values rounded to 6 decimals (0.0496, not 0.04960000142455101)."""
  return [round(float(v), 6) for v in box]


def _write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  os.replace(path + ".tmp", path)


def evaluate_localisation(shard_dir: str, checkpoint_dir: str, output_dir: str, split: str = "test",
                          score_threshold: float = SCORE_THRESHOLD, batch_size: int = 32, log=print) -> dict:
  """Writes output_dir/detections.jsonl, ground_truth.jsonl, metrics.json (frame_map@0.5, video_map@0.2,
  video_map@0.5, per_class) and lineage.json for the clips of `split`; returns metrics.json's content."""
  from trainers.star import predict_tubelets
  from trainers.train import load_trained_model
  info = info_lib.read_dataset_info(shard_dir)
  model, _ = load_trained_model(checkpoint_dir)
  data = load_split(shard_dir, split, info, fields=FIELDS)
  tubes = tubelet_arrays(data, info)
  forward = nnx.jit(lambda model, *fields: model(*fields))
  detections = []
  for start in range(0, len(data["segment_ids"]), batch_size):
    # The last batch is padded with empty sequences (no slot, no detection), so one program serves every batch.
    batch = [_padded(data[k][start:start + batch_size], batch_size) for k in MODEL_FIELDS]
    detections.extend(predict_tubelets(forward(model, *batch), score_threshold)[:len(data["segment_ids"]) - start])
  os.makedirs(output_dir, exist_ok=True)
  detections_path = os.path.join(output_dir, DETECTIONS_FILENAME)
  ground_truth_path = os.path.join(output_dir, GROUND_TRUTH_FILENAME)
  _write_jsonl(detections_path, detected_tubes(detections, data, tubes))
  _write_jsonl(ground_truth_path, ground_truth_tubes(data, tubes))
  metrics = localisation_metrics(detections_path, ground_truth_path, output_dir, log=log)
  write_lineage(output_dir, "evaluate_localisation", {"split": split, "score_threshold": score_threshold},
                {"shards": shard_dir, "checkpoint": checkpoint_dir})
  return metrics


# ------------------------------------------------------------------------------------------ report

def _read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def clip_frames(data: dict, b: int, m: int, patch_size: int) -> list[np.ndarray]:
  """The packed frames of slot m of sequence b, rebuilt from its patches (each put at its patch_yx) [H, W, 3];
  a dropped token stays black."""
  tokens = data["segment_ids"][b] == m + 1
  yx, t, patches = data["patch_yx"][b][tokens], data["patch_t"][b][tokens], data["patches"][b][tokens]
  rows, cols = yx[:, 0].max() + 1, yx[:, 1].max() + 1
  frames = np.zeros((t.max() + 1, rows * patch_size, cols * patch_size, 3), np.uint8)
  for (y, x), f, patch in zip(yx, t, patches):
    frames[f, y * patch_size:(y + 1) * patch_size, x * patch_size:(x + 1) * patch_size] = (
        patch.reshape(patch_size, patch_size, 3))
  return list(frames)


def _pictured_clips(shard_dir: str, info: dict, split: str, ground_truth: list[dict], detections: list[dict],
                    num_clips: int, num_frames: int) -> list[dict]:
  """The first clips of the split with true tubes: `num_frames` of their packed frames, evenly spread, with
  their true tubes and their N best detections (N the clip's true tubes)."""
  names = info.get("class_names") or [str(c) for c in range(info["num_classes"])]
  videos = list(dict.fromkeys(tube["video"] for tube in ground_truth))[:num_clips]
  data = load_split(shard_dir, split, info, fields=FIELDS)
  tubes = tubelet_arrays(data, info)
  clips = []
  for video in videos:
    b, m = (int(i[0]) for i in np.nonzero(data["example_ids"] == video.encode()))
    truth = [tube for tube in ground_truth if tube["video"] == video]
    detected = sorted((d for d in detections if d["video"] == video), key=lambda d: -d["score"])[:len(truth)]
    frames = clip_frames(data, b, m, info["patch_size"])
    picked = np.linspace(0, len(frames) - 1, min(num_frames, len(frames))).round().astype(int)
    clip = {"title": video, "frames": []}
    for f in picked:
      t = int(tubes["frame_t"][b, m, f])
      on_frame = lambda tube: next((box[1:] for box in tube["boxes"] if box[0] == t), None)
      clip["frames"].append({
          "image": frames[f], "t": t,
          "truth": [(names[tube["label"]], on_frame(tube)) for tube in truth if on_frame(tube)],
          "detected": [(names[d["label"]], d["score"], on_frame(d)) for d in detected if on_frame(d)]})
    clips.append(clip)
  return clips


def render_localisation_report(shard_dir: str, evaluation_dir: str, output_path: str, train_dir: str | None = None,
                               split: str = "test", num_clips: int = 2, num_frames: int = 4) -> dict:
  """Writes report.html (self-contained: figures embedded as PNG) from evaluate_localisation's output_dir (of
  `split`), the shards and, when given, the training run; returns the mAPs it states."""
  info = info_lib.read_dataset_info(shard_dir)
  metrics = _read_json(os.path.join(evaluation_dir, "metrics.json"))
  ground_truth = _read_jsonl(os.path.join(evaluation_dir, GROUND_TRUTH_FILENAME))
  detections = _read_jsonl(os.path.join(evaluation_dir, DETECTIONS_FILENAME))
  names = info.get("class_names") or [str(c) for c in range(info["num_classes"])]
  summary = {key: metrics[key] for key in ("frame_map@0.5", "video_map@0.2", "video_map@0.5")}
  number = lambda value: "n/a" if value is None else f"{value:.3f}"

  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>patchflow action localisation</title>"
           f"<style>{_STYLE}</style></head><body><h1>patchflow action localisation report</h1>"]
  parts.append(f"<p><b>{split}: frame-mAP@0.5 {number(summary['frame_map@0.5'])}, video-mAP@0.2 "
               f"{number(summary['video_map@0.2'])}, video-mAP@0.5 {number(summary['video_map@0.5'])}</b> "
               f"({len(ground_truth)} true tubes, {len(detections)} detected; definitions in "
               f"docs/localisation.md)</p>")

  parts.append("<h2>Per class</h2>")
  parts.append(_table(["class", "true tubes", "frame AP@0.5", "video AP@0.2", "video AP@0.5"], [
      [f"{label} {names[int(label)]}", row["num_ground_truth_tubes"], row["frame_ap@0.5"], row["video_ap@0.2"],
       row["video_ap@0.5"]] for label, row in metrics["per_class"].items()]))

  parts.append("<h2>Dataset and packing</h2>")
  parts.append(_table(["split", "clips", "sequences", "real tokens"], [
      [s, v["num_examples"], v["num_sequences"], v["num_tokens"]] for s, v in info["splits"].items()]))
  parts.append(_table(["seq_len", "patch_size", "clips / sequence", "frames", "actors / clip at most",
                       "packing efficiency", "errors", "schema fingerprint"], [[
      info["seq_len"], info["patch_size"], info["max_images"], info["max_frames"], info["max_actors"],
      info["packing_efficiency"], info["num_errors"], info["fingerprint"]]]))

  curve_path = os.path.join(train_dir, "metrics.jsonl") if train_dir else None
  if curve_path and os.path.exists(curve_path):
    parts.append("<h2>Training</h2>")
    final_path = os.path.join(train_dir, "final.json")
    if os.path.exists(final_path):
      final = _read_json(final_path)
      val = final.get("val") or {}
      parts.append(f"<p>{final['step']} steps, final train loss {final['loss']:.4f}"
                   + "".join(f", val {k.replace('_', ' ')} {v:.3f}" for k, v in val.items() if isinstance(v, float))
                   + f"; parameters sha256 <code>{final['params_sha256'][:16]}</code></p>")
    parts.append(_img(plots.loss_curves(_read_jsonl(curve_path), ("loss", "class_loss", "l1_loss", "giou_loss")),
                      "training curve"))

  parts.append(f"<h2>Tubes on {split} clips</h2><p>True tubes in green, the clip's best detections (as many as "
               f"its true tubes) in red with their label and score.</p>")
  clips = _pictured_clips(shard_dir, info, split, ground_truth, detections, num_clips, num_frames)
  if clips:
    parts.append(_img(plots.tubelet_frames(clips), "frames with true and detected tubes"))

  sources = [("shards", shard_dir), ("evaluation", evaluation_dir)] + ([("checkpoint", train_dir)] if train_dir else [])
  write_page(parts + lineage_parts(sources), output_path)
  return summary
