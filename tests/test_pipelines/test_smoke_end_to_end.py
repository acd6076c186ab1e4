"""The smoke DAG through the real `patchflow` command: kfp.local, in-process Beam, JAX on CPU."""

import json
import os
import re
import subprocess
import sys

SMALL = ["--set", "num_train=60", "--set", "num_val=30", "--set", "num_test=30", "--set", "steps=12",
         "--set", "width=32", "--set", "depth=1"]


def _patchflow(*args, home):
  exe = os.path.join(os.path.dirname(sys.executable), "patchflow")
  return subprocess.run([exe, *args, "--home", str(home)], capture_output=True, text=True, timeout=600)


def test_smoke_run_succeeds_and_writes_the_report(tmp_path):
  result = _patchflow("run", "smoke", *SMALL, home=tmp_path)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  last = result.stdout.strip().splitlines()[-1]
  match = re.fullmatch(r"run (smoke-\S+) SUCCEEDED report=(/\S+/report\.html)", last)
  assert match, last
  run_id, report = match.groups()
  assert os.path.isabs(report) and os.path.exists(report)
  html = open(report, encoding="utf-8").read()
  assert "Validation accuracy" in html and "data:image/png;base64," in html
  assert "<h2>Calibration</h2>" in html and "ECE (100 equal-mass bins)" in html and 'alt="selective prediction"' in html
  record = json.load(open(tmp_path / run_id / "run.json"))
  assert record["status"] == "SUCCEEDED" and record["params"]["steps"] == 12
  assert {s["verdict"] for s in record["steps"].values()} == {"SUCCEEDED"}
  assert len(record["steps"]) == 6
  for step in ("build-shards", "train", "evaluate", "calibrate", "report"):
    assert f"{step}: SUCCESS" in result.stdout  # progress is shown as steps finish


def test_a_failing_step_fails_the_run_loudly_with_its_name_and_error(tmp_path):
  result = _patchflow("run", "smoke", *SMALL, "--set", "max_patches_per_image=999", home=tmp_path)
  assert result.returncode == 1
  last = result.stdout.strip().splitlines()[-1]
  assert re.fullmatch(r"run smoke-\S+ FAILED step=build-shards log=\S+kfp\.log", last), last
  assert "step 'build-shards' FAILED: ContractError: shard options: 'max_patches_per_image' (999)" in result.stderr
  run_dir = tmp_path / last.split()[1]
  record = json.load(open(run_dir / "run.json"))
  assert record["status"] == "FAILED" and record["failed_step"] == "build-shards"
  assert record["steps"]["train"]["verdict"] == "NOT_RUN"
