"""Run records survive their process: a run whose process died is listed FAILED or INTERRUPTED with the reason,
never RUNNING forever; the process that runs a DAG holds its run's lock (runner/history.py) until it is done."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from runner import history

SMALL = ["--set", "num_train=60", "--set", "num_val=30", "--set", "num_test=30", "--set", "steps=12",
         "--set", "width=32", "--set", "depth=1"]
_HOLDER = ("import sys, time; from runner import history; history.hold_run_lock(sys.argv[1]); "
           "print('held', flush=True); time.sleep(600)")


def _running(home, run_dir, run_id="smoke-1"):
  record = {"id": run_id, "pipeline": "smoke", "status": "RUNNING", "params": {}, "run_dir": str(run_dir),
            "target": "local", "started": time.time(), "pid": 4242, "steps": {"train": {"status": "RUNNING"}}}
  if run_dir.is_dir():
    (run_dir / "run.json").write_text(json.dumps(record))
  history.save_run(str(home), record)


def _hold_lock(run_dir):
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  return holder


def test_a_run_whose_process_was_killed_is_listed_failed_with_the_reason(tmp_path):
  run_dir = tmp_path / "smoke-1"
  run_dir.mkdir()
  holder = _hold_lock(run_dir)
  try:
    _running(tmp_path, run_dir)
    assert history.list_runs(str(tmp_path))[0]["status"] == "RUNNING"  # its process holds the lock: alive
    holder.kill()
    holder.wait()
    [record] = history.list_runs(str(tmp_path))
  finally:
    holder.kill()
  assert record["status"] == "FAILED"
  assert record["reason"] == ("its process (pid 4242) ended without recording an outcome: killed (SIGKILL, out "
                              "of memory) or crashed")
  assert record["steps"]["train"]["verdict"] == "FAILED"
  assert history.get_run(str(tmp_path), "smoke-1")["status"] == "FAILED"
  assert json.loads((run_dir / "run.json").read_text())["status"] == "FAILED"  # the run directory says so too


def test_a_run_that_finished_meanwhile_keeps_its_outcome(tmp_path):
  """The lister judges a run dead only while it is still RUNNING in the database: a run that recorded its
  outcome between the lister's read and its lock test keeps that outcome."""
  run_dir = tmp_path / "smoke-1"
  run_dir.mkdir()
  holder = _hold_lock(run_dir)
  try:
    _running(tmp_path, run_dir)
    stale = history.get_run(str(tmp_path), "smoke-1")  # read while it runs
    history.save_run(str(tmp_path), {**stale, "status": "SUCCEEDED"})  # then it recorded its outcome, and ended
  finally:
    holder.kill()
    holder.wait()
  assert stale["status"] == "RUNNING"
  assert history.settle(str(tmp_path), stale)["status"] == "SUCCEEDED"
  assert history.get_run(str(tmp_path), "smoke-1")["status"] == "SUCCEEDED"


def test_a_history_from_before_the_new_columns_still_opens(tmp_path):
  db = sqlite3.connect(tmp_path / history.DB_NAME)
  db.execute("CREATE TABLE runs (id PRIMARY KEY, pipeline, params, status, started, finished, duration_seconds, "
             "run_dir, pipeline_root, report, steps, target, console_url, parent, failed_step)")
  db.execute("INSERT INTO runs (id, pipeline, params, status, steps, target) VALUES "
             "('smoke-0', 'smoke', '{}', 'SUCCEEDED', '{}', 'local')")
  db.commit()
  db.close()
  _running(tmp_path, tmp_path / "gone")  # its run directory was deleted
  runs = {r["id"]: r for r in history.list_runs(str(tmp_path))}
  assert runs["smoke-0"]["status"] == "SUCCEEDED" and runs["smoke-0"]["reason"] is None
  assert runs["smoke-1"]["status"] == "FAILED" and "ended without recording an outcome" in runs["smoke-1"]["reason"]


def _patchflow(*args):
  return [os.path.join(os.path.dirname(sys.executable), "patchflow"), *args]


def _start_smoke(home):
  """`patchflow run smoke`, once its train step runs: (process, run id)."""
  process = subprocess.Popen(_patchflow("run", "smoke", *SMALL, "--no-cache", "--home", str(home)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in process.stdout:
    if line.startswith("run "):
      run_id = line.split()[1].rstrip(":")
    if "train: running" in line:
      return process, run_id
  raise AssertionError(f"the run ended before training: {process.wait()}")


def _processes_of(run_dir):
  """Pids of the processes whose command line names the run directory (the DAG process and its steps)."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if str(run_dir).encode() in f.read():
          found.append(int(pid))
    except OSError:
      pass
  return found


def _wait_gone(run_dir, seconds=20):
  deadline = time.time() + seconds
  while _processes_of(run_dir) and time.time() < deadline:
    time.sleep(0.2)
  return _processes_of(run_dir)


@pytest.mark.slow
def test_sigterm_interrupts_the_run_and_records_it(tmp_path):
  process, run_id = _start_smoke(tmp_path)
  process.send_signal(signal.SIGTERM)
  rest = process.communicate(timeout=60)[0]
  assert process.returncode == 128 + signal.SIGTERM, rest
  assert rest.strip().splitlines()[-1] == f"run {run_id} INTERRUPTED: stopped by SIGTERM"
  record = json.loads(subprocess.run(_patchflow("runs", "--json", "--home", str(tmp_path)), capture_output=True,
                                     text=True, check=True).stdout)[0]
  assert (record["id"], record["status"], record["reason"]) == (run_id, "INTERRUPTED", "stopped by SIGTERM")
  assert record["steps"]["train"]["verdict"] == "INTERRUPTED"
  assert _wait_gone(tmp_path / run_id) == []  # the DAG process and its steps stopped with it


@pytest.mark.slow
def test_a_killed_run_is_failed_in_the_list_and_the_ui_and_its_steps_stop(tmp_path):
  process, run_id = _start_smoke(tmp_path)
  process.kill()
  process.wait()
  assert _wait_gone(tmp_path / run_id) == []  # the DAG process notices its supervisor is gone
  table = subprocess.run(_patchflow("runs", "--home", str(tmp_path)), capture_output=True, text=True, check=True)
  row = next(line for line in table.stdout.splitlines() if line.startswith(run_id))
  assert " FAILED " in row and f"its process (pid {process.pid}) ended without recording an outcome" in row
  port = _free_port()
  ui = subprocess.Popen(_patchflow("ui", "--home", str(tmp_path), "--port", str(port)), stdout=subprocess.DEVNULL)
  try:
    page = _get(f"http://127.0.0.1:{port}/runs/{run_id}")
    assert "id='status'>FAILED<" in page and "ended without recording an outcome" in page
  finally:
    ui.terminate()
    ui.wait(10)


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url):
  for _ in range(100):
    try:
      return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
      time.sleep(0.1)
  raise AssertionError(f"{url} did not answer")
