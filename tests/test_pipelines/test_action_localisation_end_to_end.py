"""The action_localisation DAG through the real `patchflow` command at tiny size: synthetic clips (mp4), video
shards with tubelets, STAR trained a few steps, detections scored by frame- and video-mAP, the report."""

import json
import os
import re
import subprocess
import sys

import pytest

# 4 steps on 8 clips: the model is at chance (val actor_accuracy 0.000 of 1/8), which this test of the wiring
# accepts; the pipeline's defaults train a usable one.
TINY = ["--set", "num_train=8", "--set", "num_val=4", "--set", "num_test=4", "--set", "steps=4",
        "--set", "batch_size=2", "--set", "train.allow_useless_model=True"]


@pytest.mark.slow
def test_action_localisation_runs_end_to_end_and_reports(tmp_path):
  exe = os.path.join(os.path.dirname(sys.executable), "patchflow")
  result = subprocess.run([exe, "run", "action_localisation", *TINY, "--home", str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  match = re.fullmatch(r"run (action_localisation-\S+) SUCCEEDED report=(/\S+/report\.html)",
                       result.stdout.strip().splitlines()[-1])
  assert match, result.stdout[-2000:]
  record = json.load(open(tmp_path / match.group(1) / "run.json"))
  assert set(record["steps"]) == {"make-action-clips", "build-shards", "train", "evaluate-localisation",
                                  "localisation-report"}
  assert {s["verdict"] for s in record["steps"].values()} == {"SUCCEEDED"}
  evaluation = os.path.join(record["execution_root"], "evaluate-localisation", "evaluation")
  metrics = json.load(open(os.path.join(evaluation, "metrics.json")))
  assert {"frame_map@0.5", "video_map@0.2", "video_map@0.5", "per_class"} <= set(metrics)
  with open(os.path.join(evaluation, "ground_truth.jsonl"), encoding="utf-8") as f:
    truth = [json.loads(line) for line in f]
  assert truth and all(set(t) == {"video", "label", "boxes"} for t in truth)
  html = open(match.group(2), encoding="utf-8").read()
  assert "frame-mAP@0.5" in html and "Tubes on test clips" in html and "data:image/png;base64," in html
