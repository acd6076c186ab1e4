"""evaluators/localisation.py against hand-worked cases and a plain loop implementation written here."""

import json

import numpy as np
import pytest

from evaluators import localisation
from runner.cli import main
from schemas.errors import ContractError

FULL_HEIGHT = (0.0, 1.0)  # boxes spanning the full height: their IoU is the IoU of their x intervals
METRIC_KEYS = {"frame_map@0.5", "video_map@0.2", "video_map@0.5", "per_class"}
CLASS_KEYS = {"frame_ap@0.5", "video_ap@0.2", "video_ap@0.5", "num_ground_truth_tubes"}


def tube(video, label, frames, box, score=None):
  """A tube holding the same box (ymin, xmin, ymax, xmax) on each of `frames`."""
  out = {"video": video, "label": label, "boxes": [[t, *box] for t in frames]}
  if score is not None:
    out["score"] = score
  return out


def x_box(xmin, xmax):
  return (FULL_HEIGHT[0], xmin, FULL_HEIGHT[1], xmax)


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def metrics_of(tmp_path, detections, ground_truth):
  return localisation.evaluate(
      localisation.read_tubes(write_jsonl(tmp_path / "det.jsonl", detections), scored=True),
      localisation.read_tubes(write_jsonl(tmp_path / "gt.jsonl", ground_truth), scored=False))


# -------------------------------------------------------------------------------------- hand-worked cases

def test_box_iou_on_continuous_coordinates():
  a = np.array([0.0, 0.0, 0.5, 0.5])
  boxes = np.array([[0.0, 0.0, 0.5, 0.5],     # itself: 1
                    [0.0, 0.25, 0.5, 0.75],   # half overlap: 0.125 / (0.25 + 0.25 - 0.125) = 1/3
                    [0.5, 0.5, 1.0, 1.0],     # touching at a corner: 0
                    [0.0, 0.0, 0.5, 1.0]])    # contains a: 0.25 / 0.5
  assert localisation.box_iou(a, boxes).tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.5], abs=1e-15)


def test_zero_area_boxes_have_iou_zero_even_with_themselves(tmp_path):
  point = (0.5, 0.5, 0.5, 0.5)
  line = (0.2, 0.1, 0.2, 0.9)  # no height
  assert localisation.box_iou(np.array([point, line]), np.array([point, line])).tolist() == [0.0, 0.0]
  # The only detections sit exactly on the zero-area ground truth: IoU 0, both false positives, AP 0.
  m = metrics_of(tmp_path, [tube("v", 0, [0], point, 0.9), tube("v", 0, [1], line, 0.8)],
                 [tube("v", 0, [0], point), tube("v", 0, [1], line)])
  assert (m["frame_map@0.5"], m["video_map@0.2"], m["video_map@0.5"]) == (0.0, 0.0, 0.0)


def test_the_five_in_fifteen_temporal_iou_example(tmp_path):
  # Ground truth frames 1-10, detection frames 6-15, same box: tube IoU = (5 common / 15 in either) x 1 = 1/3.
  # video: 1/3 >= 0.2 is a hit (AP 1), 1/3 < 0.5 a miss (AP 0).
  # frame: the 10 detected boxes (one score, so in box order 6..15) are TP x5 (frames 6-10), then FP x5;
  #        precision is 1 at each TP, 10 ground-truth boxes: AP = 5 x 1 / 10 = 0.5.
  box = (0.1, 0.1, 0.6, 0.6)
  m = metrics_of(tmp_path, [tube("v", 3, range(6, 16), box, 0.7)], [tube("v", 3, range(1, 11), box)])
  assert m["per_class"] == {"3": {"frame_ap@0.5": 0.5, "video_ap@0.2": 1.0, "video_ap@0.5": 0.0,
                                  "num_ground_truth_tubes": 1}}
  assert (m["frame_map@0.5"], m["video_map@0.2"], m["video_map@0.5"]) == (0.5, 1.0, 0.0)


def test_a_detected_tube_longer_than_its_ground_truth(tmp_path):
  # Ground truth x [0, 0.5] on frames 1-4; the detection x [0, 1] (box IoU 0.5 / 1 = 0.5) on frames 1-8.
  # tube IoU = temporal 4/8 x mean box IoU 0.5 = 0.25: a hit at 0.2 (AP 1), a miss at 0.5 (AP 0).
  # frame: frames 1-4 are hits (IoU 0.5 >= 0.5) before the 4 misses: precision 1 at each, AP = 4 x 1 / 4 = 1.
  m = metrics_of(tmp_path, [tube("v", 0, range(1, 9), x_box(0.0, 1.0), 0.9)],
                 [tube("v", 0, range(1, 5), x_box(0.0, 0.5))])
  assert (m["frame_map@0.5"], m["video_map@0.2"], m["video_map@0.5"]) == (1.0, 1.0, 0.0)


def test_temporal_iou_is_over_frame_index_sets_not_spans(tmp_path):
  # Frames {1, 2, 3, 4} against {1, 3, 5}, same box: 2 common of 5 in either, tube IoU 0.4: hit at 0.2, miss at 0.5.
  box = (0.2, 0.2, 0.4, 0.4)
  m = metrics_of(tmp_path, [tube("v", 0, [1, 3, 5], box, 0.5)], [tube("v", 0, [1, 2, 3, 4], box)])
  assert (m["video_map@0.2"], m["video_map@0.5"]) == (1.0, 0.0)


@pytest.mark.parametrize("first, expected_ap", [
    # Scores: C 0.9 (another video: FP), A 0.8 (a hit), B 0.8 (a miss); ties go by input order.
    ("A", 0.5),    # C, A, B: TP at rank 2 with precision 1/2, monotone 1/2 -> AP = 1/2 / 1
    ("B", 1 / 3),  # C, B, A: TP at rank 3 with precision 1/3 -> AP = 1/3
])
def test_ties_in_score_are_broken_by_input_order(tmp_path, first, expected_ap):
  box = (0.1, 0.1, 0.5, 0.5)
  detections = {"A": tube("v", 0, [0], box, 0.8), "B": tube("v", 0, [0], (0.6, 0.6, 0.9, 0.9), 0.8)}
  order = [first, "B" if first == "A" else "A"]
  m = metrics_of(tmp_path, [tube("w", 0, [0], box, 0.9)] + [detections[name] for name in order],
                 [tube("v", 0, [0], box)])
  assert m["frame_map@0.5"] == pytest.approx(expected_ap, abs=1e-15)
  assert m["video_map@0.5"] == pytest.approx(expected_ap, abs=1e-15)


def test_a_detection_that_could_match_two_ground_truths_takes_the_higher_iou(tmp_path):
  # One frame, full-height boxes. G1 x [0, 0.4], G2 x [0.1, 0.5].
  # D1 (0.9) x [0.1, 0.5]: IoU G1 = 0.3 / 0.5 = 0.6, G2 = 1: takes G2, though G1 comes first and would do.
  # D2 (0.8) x [0.2, 0.6]: IoU G2 = 0.3 / 0.5 = 0.6 (taken), G1 = 0.2 / 0.6 = 1/3 < 0.5: a false positive.
  # At 0.5: TP, FP with 2 ground truths: AP = 1 x 1 / 2 = 0.5.
  # video@0.2 (single-frame tubes: tube IoU = box IoU): D2 now takes G1 (1/3 >= 0.2): TP, TP, AP = 1.
  ground_truth = [tube("v", 0, [0], x_box(0.0, 0.4)), tube("v", 0, [0], x_box(0.1, 0.5))]
  m = metrics_of(tmp_path, [tube("v", 0, [0], x_box(0.1, 0.5), 0.9), tube("v", 0, [0], x_box(0.2, 0.6), 0.8)],
                 ground_truth)
  assert (m["frame_map@0.5"], m["video_map@0.2"], m["video_map@0.5"]) == pytest.approx((0.5, 1.0, 0.5), abs=1e-15)


def test_a_detection_whose_best_ground_truth_is_taken_takes_the_next_unmatched(tmp_path):
  # G1 x [0, 0.4], G2 x [0.1, 0.5]; D1 (0.9) x [0.1, 0.5] takes G2 (IoU 1).
  # D2 (0.8) x [0.05, 0.5]: IoU G2 = 0.4 / 0.45 (taken), G1 = 0.35 / 0.5 = 0.7 >= 0.5: takes G1.
  # TP, TP: AP = 1 (matching D2 only to its best ground truth would make it a false positive: AP 0.5).
  ground_truth = [tube("v", 0, [0], x_box(0.0, 0.4)), tube("v", 0, [0], x_box(0.1, 0.5))]
  m = metrics_of(tmp_path, [tube("v", 0, [0], x_box(0.1, 0.5), 0.9), tube("v", 0, [0], x_box(0.05, 0.5), 0.8)],
                 ground_truth)
  assert (m["frame_map@0.5"], m["video_map@0.5"]) == (1.0, 1.0)


def test_a_class_without_detections_scores_zero_and_detection_only_classes_do_not_count(tmp_path):
  # Class 0 detected exactly (AP 1), class 1 never detected (AP 0), class 7 only detected (not scored):
  # every mAP = (1 + 0) / 2 = 0.5.
  box = (0.1, 0.1, 0.5, 0.5)
  m = metrics_of(tmp_path, [tube("v", 0, [0, 1], box, 0.9), tube("v", 7, [0, 1], box, 0.99)],
                 [tube("v", 0, [0, 1], box), tube("v", 1, [0, 1], box), tube("w", 1, [4], box)])
  assert m["per_class"]["1"] == {"frame_ap@0.5": 0.0, "video_ap@0.2": 0.0, "video_ap@0.5": 0.0,
                                 "num_ground_truth_tubes": 2}
  assert m["per_class"]["0"]["frame_ap@0.5"] == 1.0 and set(m["per_class"]) == {"0", "1"}
  assert (m["frame_map@0.5"], m["video_map@0.2"], m["video_map@0.5"]) == (0.5, 0.5, 0.5)


def test_frames_and_videos_do_not_match_across(tmp_path):
  # The same box one frame later, or in another video, is a false positive: AP 0 everywhere.
  box = (0.1, 0.1, 0.5, 0.5)
  m = metrics_of(tmp_path, [tube("v", 0, [1], box, 0.9), tube("w", 0, [0], box, 0.8)], [tube("v", 0, [0], box)])
  assert (m["frame_map@0.5"], m["video_map@0.2"]) == (0.0, 0.0)


def test_empty_inputs(tmp_path):
  box = (0.1, 0.1, 0.5, 0.5)
  # No ground truth: nothing to average over: every mAP null, per_class empty (detections or not).
  for detections in ([], [tube("v", 0, [0], box, 0.9)]):
    assert metrics_of(tmp_path, detections, []) == {"frame_map@0.5": None, "video_map@0.2": None,
                                                    "video_map@0.5": None, "per_class": {}}
  # Ground truth and no detections: every AP 0.
  m = metrics_of(tmp_path, [], [tube("v", 2, [0], box)])
  assert (m["frame_map@0.5"], m["video_map@0.2"], m["video_map@0.5"]) == (0.0, 0.0, 0.0)
  # Blank lines are skipped: a file of blank lines is empty.
  (tmp_path / "blank.jsonl").write_text("\n  \n")
  assert localisation.read_tubes(str(tmp_path / "blank.jsonl"), scored=False).label.tolist() == []


def test_average_precision_is_voc_all_point():
  # Ranks: TP, FP, TP, FP, TP against 4 ground truths; precision 1, 1/2, 2/3, 1/2, 3/5, made monotone from the
  # right: 1, 2/3, 2/3, 3/5, 3/5; summed at the recall steps (the TPs): (1 + 2/3 + 3/5) / 4 = 34/60.
  hits = np.array([True, False, True, False, True])
  assert localisation.average_precision(hits, 4) == pytest.approx(34 / 60, abs=1e-15)
  assert localisation.average_precision(np.zeros(0, bool), 3) == 0.0


# ------------------------------------------------------------------- independent loop implementation

def ref_iou(a, b):
  inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def ref_ap(hits, num_truths):
  """The Pascal VOC devkit's form: recall and precision padded, precision made monotone, summed over steps."""
  tp = fp = 0
  recall, precision = [], []
  for hit in hits:
    tp, fp = tp + hit, fp + (not hit)
    recall.append(tp / num_truths)
    precision.append(tp / (tp + fp))
  mrec, mpre = [0.0] + recall + [1.0], [0.0] + precision + [0.0]
  for i in range(len(mpre) - 2, -1, -1):
    mpre[i] = max(mpre[i], mpre[i + 1])
  return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


def ref_greedy(ranked, truths, iou_of, threshold):
  """ranked detections each take the unmatched truth of highest IoU (first on ties) if >= threshold."""
  used = [False] * len(truths)
  hits = []
  for det in ranked:
    best, best_iou = None, -1.0
    for j, truth in enumerate(truths):
      if not used[j]:
        iou = iou_of(det, truth)
        if iou > best_iou:
          best, best_iou = j, iou
    hit = best is not None and best_iou >= threshold
    if hit:
      used[best] = True
    hits.append(hit)
  return hits


def ref_tube_iou(det, truth):
  if det["video"] != truth["video"]:
    return 0.0
  a, b = {box[0]: box[1:] for box in det["boxes"]}, {box[0]: box[1:] for box in truth["boxes"]}
  common = set(a) & set(b)
  if not common:
    return 0.0
  temporal = len(common) / len(set(a) | set(b))
  return temporal * sum(ref_iou(a[t], b[t]) for t in common) / len(common)


def ref_metrics(detections, ground_truth):
  classes = sorted({g["label"] for g in ground_truth})
  ranked = sorted(range(len(detections)), key=lambda i: -detections[i]["score"])  # stable: input order on ties
  per_class = {}
  for c in classes:
    truths = [g for g in ground_truth if g["label"] == c]
    dets = [detections[i] for i in ranked if detections[i]["label"] == c]
    truth_boxes = [(g["video"], box) for g in truths for box in g["boxes"]]
    det_boxes = [(d["video"], box) for d in dets for box in d["boxes"]]
    same_frame_iou = lambda d, g: ref_iou(d[1][1:], g[1][1:]) if (d[0], d[1][0]) == (g[0], g[1][0]) else 0.0
    per_class[str(c)] = {
        "frame_ap@0.5": ref_ap(ref_greedy(det_boxes, truth_boxes, same_frame_iou, 0.5), len(truth_boxes)),
        **{f"video_ap@{d}": ref_ap(ref_greedy(dets, truths, ref_tube_iou, d), len(truths)) for d in (0.2, 0.5)},
        "num_ground_truth_tubes": len(truths)}
  mean = lambda key: sum(m[key] for m in per_class.values()) / len(per_class) if per_class else None
  return {"frame_map@0.5": mean("frame_ap@0.5"), "video_map@0.2": mean("video_ap@0.2"),
          "video_map@0.5": mean("video_ap@0.5"), "per_class": per_class}


def random_case(seed, num_videos=3, num_classes=4, num_truths=30):
  """Ground-truth tubes with random spans and crowded boxes; detections are jittered, shifted or cut copies of them
  plus random tubes, with scores on a coarse grid so that ties occur."""
  rng = np.random.default_rng(seed)

  def random_box():  # crowded: boxes overlap each other, so a detection often has several candidates
    y0, x0 = rng.uniform(0, 0.3, 2)
    h, w = rng.uniform(0.3, 0.7, 2) * (rng.random() > 0.03)  # now and then a zero-area box
    return [float(y0), float(x0), float(y0 + h), float(x0 + w)]

  def jitter(box):
    moved = np.clip(np.array(box) + rng.normal(0, 0.02, 4), 0, 1)
    return [float(moved[0]), float(moved[1]), float(max(moved[0], moved[2])), float(max(moved[1], moved[3]))]

  ground_truth, detections = [], []
  for _ in range(num_truths):
    start = int(rng.integers(0, 10))
    frames = range(start, start + int(rng.integers(1, 9)))
    ground_truth.append({"video": f"v{rng.integers(num_videos)}", "label": int(rng.integers(num_classes)),
                         "boxes": [[t, *random_box()] for t in frames]})
  for truth in ground_truth:
    for _ in range(int(rng.integers(0, 3))):
      shift = int(rng.integers(-3, 4)) if rng.random() < 0.4 else 0
      kept = [box for box in truth["boxes"] if rng.random() > 0.2 and box[0] + shift >= 0]
      if not kept:
        continue
      label = truth["label"] if rng.random() > 0.1 else int(rng.integers(num_classes + 1))
      detections.append({"video": truth["video"], "label": label, "score": float(rng.integers(0, 10)) / 10,
                         "boxes": [[box[0] + shift, *jitter(box[1:])] for box in kept]})
  for _ in range(8):
    start = int(rng.integers(0, 10))
    detections.append({"video": f"v{rng.integers(num_videos)}", "label": int(rng.integers(num_classes)),
                       "score": float(rng.integers(0, 10)) / 10,
                       "boxes": [[t, *random_box()] for t in range(start, start + int(rng.integers(1, 6)))]})
  rng.shuffle(detections)
  return detections, ground_truth


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_the_loop_implementation_on_random_inputs(tmp_path, seed):
  detections, ground_truth = random_case(seed)
  assert sum(len(t["boxes"]) for t in detections + ground_truth) > 200
  got = metrics_of(tmp_path, detections, ground_truth)
  want = ref_metrics(detections, ground_truth)
  assert got["per_class"].keys() == want["per_class"].keys()
  for key in METRIC_KEYS - {"per_class"}:
    assert got[key] == pytest.approx(want[key], abs=1e-12), key
  for c, values in want["per_class"].items():
    assert got["per_class"][c] == pytest.approx(values, abs=1e-12), c


def test_greedy_match_settles_chains_of_shared_candidates():
  # D0 takes T0 (IoU 0.9 over T1's 0.8), so D1 must wait for D0 before it takes T1, and D2 for D1: T2.
  # D3 only wants T0, which D0 took: a false positive.
  pairs = np.array([[0, 0, 0.9], [0, 1, 0.8], [1, 0, 0.9], [1, 1, 0.7], [1, 2, 0.6], [2, 1, 0.9], [2, 2, 0.8],
                    [3, 0, 0.99]])
  hits = localisation.greedy_match(4, 3, pairs[:, 0].astype(int), pairs[:, 1].astype(int), pairs[:, 2])
  assert hits.tolist() == [True, True, True, False]


# ------------------------------------------------------------------------------------------- bad files

@pytest.mark.parametrize("line, message", [
    ("{", "not valid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"video": "v", "boxes": [[0, 0, 0, 1, 1]], "score": 1}', "missing field 'label'"),
    ('{"video": "v", "label": "run", "boxes": [[0, 0, 0, 1, 1]], "score": 1}', "field 'label' must be"),
    ('{"video": "v", "label": true, "boxes": [[0, 0, 0, 1, 1]], "score": 1}', "field 'label' must be"),
    ('{"video": "", "label": 0, "boxes": [[0, 0, 0, 1, 1]], "score": 1}', "field 'video' must be"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0, 1, 1]], "score": NaN}', "field 'score' must be finite"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0, 1, 1]], "score": "high"}', "field 'score' must be a number"),
    ('{"video": "v", "label": 0, "boxes": [], "score": 1}', "field 'boxes' must be a non-empty list"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0, 1, 1], [1, 0, 0, 1]], "score": 1}',
     "field 'boxes': box 1 is not 5 numbers"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0, 1, true]], "score": 1}', "field 'boxes': box 0 is not 5"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0, 1, "1"]], "score": 1}', "field 'boxes': box 0 is not 5"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0, 1, 1.5]], "score": 1}',
     "field 'boxes': box 0: coordinates [0.0, 0.0, 1.0, 1.5] not all in [0, 1]"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0, 1, 1], [1, 0.7, 0, 0.3, 1]], "score": 1}',
     "field 'boxes': box 1: ymin 0.7 > ymax 0.3"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0.6, 1, 0.2]], "score": 1}', "box 0: xmin 0.6 > xmax 0.2"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0, 1, NaN]], "score": 1}', "box 0: holds NaN or Infinity"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0, 1, 1], [1, 0, 0, 1, 1%s]], "score": 1}' % ("0" * 400),
     "field 'boxes': box 1: a number is too large"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0, 1, 1]], "score": 1%s}' % ("0" * 400), "field 'score' must be finite"),
    ('{"video": "v", "label": 0, "boxes": [[1.5, 0, 0, 1, 1]], "score": 1}', "box 0: frame t = 1.5 is not a"),
    ('{"video": "v", "label": 0, "boxes": [[-1, 0, 0, 1, 1]], "score": 1}', "box 0: frame t = -1.0 is not a"),
    ('{"video": "v", "label": 0, "boxes": [[3, 0, 0, 1, 1], [4, 0, 0, 1, 1], [3.0, 0, 0, 1, 1]], "score": 1}',
     "field 'boxes': box 2: frame 3 appears twice in the tube"),
    ('{"video": "v", "label": 0, "boxes": [[0, 0, 0, 1, 1]], "score": 1, "lable": 2}', "unknown field 'lable'"),
])
def test_a_bad_detections_line_names_the_file_line_and_field(tmp_path, line, message):
  path = tmp_path / "det.jsonl"
  path.write_text(json.dumps(tube("v", 0, [0], (0, 0, 1, 1), 0.5)) + "\n" + line + "\n")
  with pytest.raises(ContractError) as caught:
    localisation.read_tubes(str(path), scored=True)
  assert str(caught.value).startswith(f"{path}:2: ") and message in str(caught.value)


def test_ground_truth_takes_no_score_and_integral_float_frames_are_frames(tmp_path):
  path = write_jsonl(tmp_path / "gt.jsonl", [tube("v", 0, [0], (0, 0, 1, 1), 0.5)])
  with pytest.raises(ContractError, match=r"gt.jsonl:1: unknown field 'score'"):
    localisation.read_tubes(path, scored=False)
  path = write_jsonl(tmp_path / "gt.jsonl", [tube("v", 0, [2.0, 3.0], (0, 0, 1, 1))])
  assert localisation.read_tubes(path, scored=False).box_frame.tolist() == [2, 3]


# ------------------------------------------------------------------------------------------------ the CLI

def test_cli_writes_metrics_json_and_lineage(tmp_path, capsys):
  box = (0.1, 0.1, 0.6, 0.6)
  detections = write_jsonl(tmp_path / "det.jsonl", [tube("v", 3, range(6, 16), box, 0.7)])
  ground_truth = write_jsonl(tmp_path / "gt.jsonl", [tube("v", 3, range(1, 11), box)])
  out = tmp_path / "out"
  assert main(["localisation-metrics", "--detections", detections, "--ground-truth", ground_truth,
               "--output", str(out)]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert set(metrics) == METRIC_KEYS and set(metrics["per_class"]["3"]) == CLASS_KEYS
  assert (metrics["frame_map@0.5"], metrics["video_map@0.2"], metrics["video_map@0.5"]) == (0.5, 1.0, 0.0)
  lineage = json.loads((out / "lineage.json").read_text())
  assert lineage["step"] == "localisation_metrics" and set(lineage["inputs"]) == {"detections", "ground_truth"}
  assert sorted(p.name for p in out.iterdir()) == ["lineage.json", "metrics.json"]
  assert f"wrote {out}/metrics.json" in capsys.readouterr().out


def test_cli_empty_ground_truth_is_null_with_a_message(tmp_path, capsys):
  detections = write_jsonl(tmp_path / "det.jsonl", [tube("v", 0, [0], (0, 0, 1, 1), 0.5)])
  ground_truth = write_jsonl(tmp_path / "gt.jsonl", [])
  assert main(["localisation-metrics", "--detections", detections, "--ground-truth", ground_truth,
               "--output", str(tmp_path / "out")]) == 0
  assert json.loads((tmp_path / "out" / "metrics.json").read_text())["video_map@0.5"] is None
  assert f"{ground_truth} holds no ground-truth tubes: every mAP is null" in capsys.readouterr().err


def test_cli_bad_line_is_one_error_line_and_exit_2(tmp_path, capsys):
  ground_truth = tmp_path / "gt.jsonl"
  ground_truth.write_text(json.dumps(tube("v", 0, [0], (0, 0, 1, 1))) + "\n"
                          + '{"video": "v", "label": 0, "boxes": [[0, 0.2, 0, 0.1, 1]]}\n')
  detections = write_jsonl(tmp_path / "det.jsonl", [])
  assert main(["localisation-metrics", "--detections", detections, "--ground-truth", str(ground_truth),
               "--output", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"patchflow: error: {ground_truth}:2: field 'boxes': box 0: ymin 0.2 > ymax 0.1"
  assert not (tmp_path / "out").exists()
  assert main(["localisation-metrics", "--detections", str(tmp_path / "missing.jsonl"), "--ground-truth",
               detections, "--output", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err.startswith(f"patchflow: error: {tmp_path / 'missing.jsonl'}: cannot read")
