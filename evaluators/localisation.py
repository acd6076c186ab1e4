"""`patchflow localisation-metrics`: frame-mAP and video-mAP of spatio-temporal action tubes (STAR).

  patchflow localisation-metrics --detections D.jsonl --ground-truth G.jsonl --output DIR   # DIR/metrics.json

Inputs, one JSON object per line: a ground-truth tube `{"video": str, "label": int, "boxes": [[t, ymin, xmin,
ymax, xmax], ...]}`; a detected tube the same plus `"score": float`. t is a frame index (a non-negative
integer), the coordinates are normalised to [0, 1]. docs/localisation.md says the same for a user.

Definitions:
  box IoU  = area(A n B) / area(A u B) on the continuous coordinates (no +1); 0 when the union has no area,
             so a box of zero area has IoU 0 with every box.
  AP       = Pascal VOC all-point average precision of a class's detections ranked by score (ties by input
             order): precision made monotone from the right (the best precision at this or any higher
             recall), summed over the recall steps. Recall rises by 1/G at each true positive (G ground
             truths of the class), so AP = (1/G) sum over true positives of that monotone precision. A class
             with ground truth and no detections has AP 0.
  frame_map@0.5: every (tube, frame) is a box, a detected box scored by its tube. Per class, ranked detected
             boxes are matched greedily, within their video and frame, to the unmatched ground-truth box of
             the class with the highest IoU (the first in input order on ties) if that IoU >= 0.5, else they
             are false positives. G = the class's ground-truth boxes.
  tube IoU = temporal IoU x mean box IoU over the frames in both tubes, the temporal IoU being |A n B| / |A u B|
             of the two frame-index sets (frames 1-10 against 6-15: 5/15). Since the mean is over the
             |A n B| common frames, tube IoU = (sum of the box IoUs of the common frames) / |A u B|.
  video_map@d: per class, ranked detected tubes are matched greedily, within their video, to the unmatched
             ground-truth tube of the class with the highest tube IoU (first in input order on ties) if that
             IoU >= d, else they are false positives. G = the class's ground-truth tubes.
  Each mAP is the mean AP over the classes that have ground truth; classes present only in the detections
  are not scored. With no ground truth at all every mAP is null and per_class is empty.
"""

import itertools
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from schemas.errors import ContractError

FRAME_IOU_THRESHOLD = 0.5
VIDEO_IOU_THRESHOLDS = (0.2, 0.5)
METRICS_FILENAME = "metrics.json"
_NUMBER_TYPES = {int, float}  # exact types: a JSON true/false (bool) is not a number here
_MAX_FRAME = 2 ** 53           # larger frame indices lose integrality as float64
_MAX_LABEL = 2 ** 63           # labels are int64
CHUNK_BOXES = 1 << 16          # boxes held as Python lists, at most, before they become a float64 array


@dataclass(frozen=True)
class Tubes:
  """The tubes of one file in file order, and all their boxes flattened in file order."""
  video: list[str]           # [T]
  label: np.ndarray          # int64 [T]
  score: np.ndarray | None   # float64 [T]; None for ground truth
  box_tube: np.ndarray       # int64 [B]: the tube of each box
  box_frame: np.ndarray      # int64 [B]: t
  box_yxyx: np.ndarray       # float64 [B, 4]: ymin, xmin, ymax, xmax


# ------------------------------------------------------------------------------------------------ reading

def read_tubes(path: str, scored: bool) -> Tubes:
  """Parses and validates a tubes JSONL file (blank lines are skipped); raises ContractError naming the file,
  line and field of the first bad line. Fields are checked line by line; the box values (range, order,
  integral frames, a frame twice in a tube) on all boxes at once, reporting the first bad box."""
  fields = {"video", "label", "boxes"} | ({"score"} if scored else set())
  videos, labels, scores, lines, num_boxes = [], [], [], [], []
  chunks, pending = [], []  # boxes as float64 arrays, and those still Python lists
  try:
    f = open(path, "rb")
  except OSError as e:
    raise ContractError(f"{path}: cannot read ({e.strerror})") from None
  with f:
    for line, text in enumerate(f, 1):
      if not text.strip():
        continue
      video, label, score, boxes = _parse_tube(text, f"{path}:{line}", fields)
      videos.append(video)
      labels.append(label)
      scores.append(score)
      lines.append(line)
      num_boxes.append(len(boxes))
      pending.extend(boxes)
      if len(pending) >= CHUNK_BOXES:
        chunks.append(_box_array(pending, path, lines, num_boxes))
        pending = []
  chunks.append(_box_array(pending, path, lines, num_boxes))
  values = np.concatenate(chunks)
  box_tube = np.repeat(np.arange(len(lines), dtype=np.int64), num_boxes)
  _check_box_values(path, values, box_tube, lines, num_boxes)
  return Tubes(video=videos, label=np.array(labels, dtype=np.int64),
               score=np.array(scores, dtype=np.float64) if scored else None, box_tube=box_tube,
               box_frame=values[:, 0].astype(np.int64), box_yxyx=values[:, 1:])


def _box_array(boxes: list, path: str, lines: list[int], num_boxes: list[int]) -> np.ndarray:
  """float64 [len(boxes), 5] of the last len(boxes) boxes read."""
  try:
    return np.array(boxes, dtype=np.float64).reshape(-1, 5)
  except OverflowError:  # a JSON integer beyond float64
    k = next(k for k, box in enumerate(boxes) if any(map(_too_large, box)))
    raise ContractError(_box_where(path, lines, num_boxes, sum(num_boxes) - len(boxes) + k)
                        + "a number is too large") from None


def _parse_tube(text: bytes, where: str, fields: set[str]):
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ContractError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
  except UnicodeDecodeError:
    raise ContractError(f"{where}: not valid JSON (not UTF-8 text)") from None
  if not isinstance(obj, dict):
    raise ContractError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  unknown = sorted(set(obj) - fields)
  if unknown:
    raise ContractError(f"{where}: unknown field {unknown[0]!r} (known: {sorted(fields)})")
  missing = sorted(fields - set(obj))
  if missing:
    raise ContractError(f"{where}: missing field {missing[0]!r}")
  video, label, boxes = obj["video"], obj["label"], obj["boxes"]
  if type(video) is not str or not video:
    raise ContractError(f"{where}: field 'video' must be a non-empty string, got {video!r}")
  if type(label) is not int or not 0 <= label < _MAX_LABEL:
    raise ContractError(f"{where}: field 'label' must be a non-negative int, got {label!r}")
  score = obj.get("score")
  if "score" in fields:
    if type(score) not in _NUMBER_TYPES:
      raise ContractError(f"{where}: field 'score' must be a number, got {score!r}")
    if _too_large(score) or not math.isfinite(score):
      raise ContractError(f"{where}: field 'score' must be finite, got {score!r}")
  if type(boxes) is not list or not boxes:
    raise ContractError(f"{where}: field 'boxes' must be a non-empty list of [t, ymin, xmin, ymax, xmax]")
  # Three passes over the types at C speed; the slow search for the culprit only when one fails.
  if not (set(map(type, boxes)) == {list} and set(map(len, boxes)) == {5}
          and set(map(type, itertools.chain.from_iterable(boxes))) <= _NUMBER_TYPES):
    k = next(k for k, box in enumerate(boxes)
             if not (type(box) is list and len(box) == 5 and all(type(v) in _NUMBER_TYPES for v in box)))
    raise ContractError(f"{where}: field 'boxes': box {k} is not 5 numbers [t, ymin, xmin, ymax, xmax], "
                        f"got {boxes[k]!r}")
  return video, label, score, boxes


def _too_large(number) -> bool:
  """A JSON integer beyond float64."""
  try:
    float(number)
    return False
  except OverflowError:
    return True


def _box_where(path: str, lines: list[int], num_boxes: list[int], k: int) -> str:
  """Where the k-th box of the file is: `path:line: field 'boxes': box j: `."""
  ends = np.cumsum(num_boxes)
  tube = int(np.searchsorted(ends, k, side="right"))
  return f"{path}:{lines[tube]}: field 'boxes': box {k - int(ends[tube] - num_boxes[tube])}: "


def _check_box_values(path: str, values: np.ndarray, box_tube: np.ndarray, lines: list[int],
                      num_boxes: list[int]) -> None:
  """Raises ContractError for the first box (in file order) that breaks a value rule."""
  t, ymin, xmin, ymax, xmax = values.T
  rules = [  # (bad boxes, what is wrong with box k): a bad box is named by the first rule it breaks
      (~np.isfinite(values).all(axis=1), lambda k: "holds NaN or Infinity"),
      ((t < 0) | (t > _MAX_FRAME) | (t != np.floor(t)),
       lambda k: f"frame t = {float(values[k, 0])!r} is not a non-negative integer"),
      (((values[:, 1:] < 0) | (values[:, 1:] > 1)).any(axis=1),
       lambda k: f"coordinates {values[k, 1:].tolist()} not all in [0, 1]"),
      (ymin > ymax, lambda k: f"ymin {float(ymin[k])!r} > ymax {float(ymax[k])!r}"),
      (xmin > xmax, lambda k: f"xmin {float(xmin[k])!r} > xmax {float(xmax[k])!r}"),
  ]
  # A frame twice in one tube: after a stable sort by (tube, t) the later box of each equal pair is flagged.
  order = np.lexsort((t, box_tube))
  repeated = np.zeros(len(t), dtype=bool)
  repeated[order[1:]] = (box_tube[order[1:]] == box_tube[order[:-1]]) & (t[order[1:]] == t[order[:-1]])
  rules.append((repeated, lambda k: f"frame {int(t[k])} appears twice in the tube"))
  bad = [np.flatnonzero(mask) for mask, _ in rules]
  first = min((int(b[0]) for b in bad if b.size), default=None)
  if first is not None:
    message = next(describe for (mask, describe) in rules if mask[first])
    raise ContractError(_box_where(path, lines, num_boxes, first) + message(first))


# ------------------------------------------------------------------------------------------------ metrics

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Elementwise IoU of boxes [..., 4] (ymin, xmin, ymax, xmax); 0 where the union has no area."""
  height = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  width = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  intersection = height * width
  union = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
           - intersection)
  return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def average_precision(true_positive: np.ndarray, num_truths: int) -> float:
  """Pascal VOC all-point AP of detections in rank order (true_positive: bool [N]) against num_truths > 0."""
  hits = np.cumsum(true_positive)
  precision = hits / np.arange(1, len(true_positive) + 1)
  # The best precision at this or any lower rank, i.e. at this or any higher recall.
  monotone = np.maximum.accumulate(precision[::-1])[::-1]
  # Recall steps up by 1/num_truths at each true positive and nowhere else.
  return float(monotone[true_positive].sum() / num_truths)


def greedy_match(num_detections: int, num_truths: int, pair_detection: np.ndarray, pair_truth: np.ndarray,
                 pair_iou: np.ndarray) -> np.ndarray:
  """Which detections (numbered in rank order, 0 first) match a ground truth: bool [num_detections].

  The pairs are the candidates: (detection, ground truth, IoU) of one group (video and class, plus frame for
  boxes) at or above the IoU threshold. In rank order, each detection takes the candidate not yet taken with
  the highest IoU (the lowest-numbered on ties); a detection left with none is a false positive.

  The same result, computed in rounds instead of one detection at a time: a detection's outcome depends only on
  the higher-ranked detections that share a candidate with it, so every detection that ranks first among the
  remaining claimants of each of its candidates is settled in the same round (no two of them share a
  candidate). Taken ground truths and settled detections then leave the pairs. The top remaining detection is
  always settled, and in practice a handful of rounds settles everything.
  """
  order = np.lexsort((pair_truth, -pair_iou, pair_detection))
  detection, truth = pair_detection[order], pair_truth[order]
  matched = np.zeros(num_detections, dtype=bool)
  taken = np.zeros(num_truths, dtype=bool)
  while detection.size:
    first_claimant = np.full(num_truths, num_detections)
    np.minimum.at(first_claimant, truth, detection)
    waiting = np.zeros(num_detections, dtype=bool)
    waiting[detection[first_claimant[truth] != detection]] = True
    settled = ~waiting[detection]
    # Pairs are sorted by detection, then best first, and hold no taken ground truth: a detection's first
    # remaining pair is its choice.
    choice = settled & np.r_[True, detection[1:] != detection[:-1]]
    taken[truth[choice]] = True
    matched[detection[choice]] = True
    keep = ~settled & ~taken[truth]
    detection, truth = detection[keep], truth[keep]
  return matched


def _group_ids(*columns: np.ndarray) -> np.ndarray:
  """Dense ids 0, 1, ... of the distinct rows of equal-length integer columns."""
  order = np.lexsort(columns[::-1])
  changes = np.zeros(len(order), dtype=bool)
  changes[:1] = True
  for column in columns:
    changes[1:] |= column[order[1:]] != column[order[:-1]]
  ids = np.empty(len(order), dtype=np.int64)
  ids[order] = np.cumsum(changes) - 1
  return ids


def _equal_key_pairs(left_key: np.ndarray, right_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Every (i, j) with left_key[i] == right_key[j], by i, then j ascending."""
  right_order = np.argsort(right_key, kind="stable")
  sorted_keys = right_key[right_order]
  start = np.searchsorted(sorted_keys, left_key, side="left")
  count = np.searchsorted(sorted_keys, left_key, side="right") - start
  left = np.repeat(np.arange(len(left_key)), count)
  offset = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
  return left, right_order[np.repeat(start, count) + offset]


def _ranked(detections: Tubes) -> Tubes:
  """Tubes renumbered by score, highest first (input order on ties), and boxes sorted by their tube's rank."""
  rank_order = np.argsort(-detections.score, kind="stable")
  rank_of_tube = np.empty_like(rank_order)
  rank_of_tube[rank_order] = np.arange(len(rank_order))
  box_tube = rank_of_tube[detections.box_tube]
  box_order = np.argsort(box_tube, kind="stable")
  return Tubes(video=[detections.video[i] for i in rank_order], label=detections.label[rank_order],
               score=detections.score[rank_order], box_tube=box_tube[box_order],
               box_frame=detections.box_frame[box_order], box_yxyx=detections.box_yxyx[box_order])


def _average_precision_per_class(classes: np.ndarray, detection_label: np.ndarray, true_positive: np.ndarray,
                                 truth_label: np.ndarray) -> list[float]:
  """AP of each class in `classes`; detections in rank order, so each class's slice stays in rank order."""
  by_class = np.argsort(detection_label, kind="stable")
  sorted_labels = detection_label[by_class]
  truths = np.bincount(np.searchsorted(classes, truth_label), minlength=len(classes))
  out = []
  for c, num_truths in zip(classes, truths):
    rows = by_class[np.searchsorted(sorted_labels, c, "left"):np.searchsorted(sorted_labels, c, "right")]
    out.append(average_precision(true_positive[rows], int(num_truths)))
  return out


def evaluate(detections: Tubes, ground_truth: Tubes) -> dict:
  """metrics.json of detected against ground-truth tubes (definitions in the module docstring)."""
  detections = _ranked(detections)
  classes = np.unique(ground_truth.label)
  codes = {name: i for i, name in enumerate(dict.fromkeys(ground_truth.video + detections.video))}
  tube_video = np.array([codes[v] for v in detections.video + ground_truth.video], dtype=np.int64)
  tube_label = np.concatenate([detections.label, ground_truth.label])
  num_detection_tubes, num_truth_tubes = len(detections.label), len(ground_truth.label)
  num_detection_boxes = len(detections.box_tube)

  # Every (detected box, ground-truth box) pair of one video, class and frame, with its box IoU.
  box_tube = np.concatenate([detections.box_tube, ground_truth.box_tube + num_detection_tubes])
  box_frame = np.concatenate([detections.box_frame, ground_truth.box_frame])
  group = _group_ids(tube_video[box_tube], tube_label[box_tube], box_frame)
  pair_box, pair_truth_box = _equal_key_pairs(group[:num_detection_boxes], group[num_detection_boxes:])
  pair_iou = box_iou(detections.box_yxyx[pair_box], ground_truth.box_yxyx[pair_truth_box])

  # Frame level: boxes are numbered in rank order (_ranked sorted them by their tube's rank).
  candidate = pair_iou >= FRAME_IOU_THRESHOLD
  frame_hit = greedy_match(num_detection_boxes, len(ground_truth.box_tube), pair_box[candidate],
                           pair_truth_box[candidate], pair_iou[candidate])
  frame_ap = _average_precision_per_class(classes, detections.label[detections.box_tube], frame_hit,
                                          ground_truth.label[ground_truth.box_tube])

  # Video level: a tube pair's IoU is the sum of its common frames' box IoUs over the union of its frames.
  tube_pair, inverse = np.unique(detections.box_tube[pair_box] * num_truth_tubes
                                 + ground_truth.box_tube[pair_truth_box], return_inverse=True)
  pair_tube, pair_truth_tube = np.divmod(tube_pair, max(num_truth_tubes, 1))  # no pairs without ground truth
  common_frames = np.bincount(inverse, minlength=len(tube_pair))
  union_frames = (np.bincount(detections.box_tube, minlength=num_detection_tubes)[pair_tube]
                  + np.bincount(ground_truth.box_tube, minlength=num_truth_tubes)[pair_truth_tube] - common_frames)
  tube_iou = np.bincount(inverse, weights=pair_iou, minlength=len(tube_pair)) / union_frames
  video_ap = {}
  for threshold in VIDEO_IOU_THRESHOLDS:
    candidate = tube_iou >= threshold
    video_hit = greedy_match(num_detection_tubes, num_truth_tubes, pair_tube[candidate],
                             pair_truth_tube[candidate], tube_iou[candidate])
    video_ap[threshold] = _average_precision_per_class(classes, detections.label, video_hit, ground_truth.label)

  mean = lambda values: float(np.mean(values)) if len(values) else None
  truth_tubes = np.bincount(np.searchsorted(classes, ground_truth.label), minlength=len(classes))
  return {
      f"frame_map@{FRAME_IOU_THRESHOLD}": mean(frame_ap),
      **{f"video_map@{d}": mean(video_ap[d]) for d in VIDEO_IOU_THRESHOLDS},
      "per_class": {str(c): {f"frame_ap@{FRAME_IOU_THRESHOLD}": frame_ap[i],
                             **{f"video_ap@{d}": video_ap[d][i] for d in VIDEO_IOU_THRESHOLDS},
                             "num_ground_truth_tubes": int(truth_tubes[i])}
                    for i, c in enumerate(classes.tolist())},
  }


def localisation_metrics(detections_path: str, ground_truth_path: str, output_dir: str, log=print) -> dict:
  """Reads both files, writes output_dir/metrics.json (to a temporary name, then renamed) and lineage.json
  beside it; returns metrics.json's content."""
  from schemas.lineage import write_lineage
  ground_truth = read_tubes(ground_truth_path, scored=False)
  detections = read_tubes(detections_path, scored=True)
  metrics = evaluate(detections, ground_truth)
  if not len(ground_truth.label):
    log(f"localisation-metrics: {ground_truth_path} holds no ground-truth tubes: every mAP is null")
  unscored = sorted(set(detections.label.tolist()) - set(ground_truth.label.tolist()))
  if unscored:
    log(f"localisation-metrics: {len(unscored)} detected classes have no ground truth and are not scored: "
        f"{unscored[:10]}{' ...' if len(unscored) > 10 else ''}")
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, METRICS_FILENAME)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1, allow_nan=False)
  os.replace(path + ".tmp", path)
  write_lineage(output_dir, "localisation_metrics",
                {"frame_iou_threshold": FRAME_IOU_THRESHOLD, "video_iou_thresholds": list(VIDEO_IOU_THRESHOLDS)},
                {"detections": detections_path, "ground_truth": ground_truth_path})
  number = lambda value: "null" if value is None else f"{value:.4f}"
  log("localisation-metrics: " + " ".join(f"{key} {number(metrics[key])}" for key in metrics if key != "per_class")
      + f" ({len(metrics['per_class'])} classes, {len(ground_truth.label)} ground-truth and "
      f"{len(detections.label)} detected tubes)")
  return metrics
