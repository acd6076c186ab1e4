"""The calibration_study DAG through the real `patchflow` command: kfp.local really runs its dsl.ParallelFor
and dsl.Collected (tiny settings, one model with two methods that share a member)."""

import json
import os
import re
import subprocess
import sys

import pytest

MODELS = [{"name": "T", "width": 16, "depth": 1, "heads": 2, "methods": [
    {"method": "deterministic", "temperature_scaling": True}, {"method": "ensemble", "seeds": [0, 1]}]}]
TINY = ["--set", "num_train=40", "--set", "num_val=20", "--set", "num_test=20", "--set", "steps=4",
        "--set", "batch_size=4", "--set", f"models={json.dumps(MODELS)}"]


@pytest.mark.slow
def test_study_runs_every_model_and_reports(tmp_path):
  exe = os.path.join(os.path.dirname(sys.executable), "patchflow")
  result = subprocess.run([exe, "run", "calibration_study", *TINY, "--home", str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  match = re.fullmatch(r"run (calibration_study-\S+) SUCCEEDED report=(/\S+/report\.html)",
                       result.stdout.strip().splitlines()[-1])
  assert match, result.stdout[-2000:]
  record = json.load(open(tmp_path / match.group(1) / "run.json"))
  assert {s["verdict"] for s in record["steps"].values()} == {"SUCCEEDED"}
  root = record["execution_root"]
  iterations = sorted(d for d in os.listdir(root) if "-iteration-" in d)
  assert len(iterations) == 1  # one per model, with its own train and evaluate directories
  for d in iterations:
    assert os.path.exists(os.path.join(root, d, "evaluate-model", "evaluation", "summary.json"))
    members = [m for m in os.listdir(os.path.join(root, d, "train-model", "checkpoints")) if m.startswith("member-")]
    assert len(members) == 2  # seeds 0 and 1: the deterministic model is the ensemble's seed-0 member
  html = open(match.group(2), encoding="utf-8").read()
  for row in ("T / deterministic", "T / temperature_scaling", "T / ensemble"):
    assert row in html
  assert "ECE vs accuracy" in html and "data:image/png;base64," in html
  # Every step goes through the one step cache: the same run again reuses all of them.
  again = subprocess.run([exe, "rerun", match.group(1), "--home", str(tmp_path)], capture_output=True, text=True,
                         timeout=900)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  for step in ("make_synthetic_data", "build_shards", "train_model", "evaluate_model", "study_report"):
    assert f"cache: {step} hit" in again.stdout, again.stdout[-3000:]
