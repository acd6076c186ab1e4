"""`patchflow run`: a pipeline on kfp.local's SubprocessRunner in this environment, under a run directory.

kfp.local has been seen to report SUCCEEDED when a step failed, so the outcome is decided here: every DAG
task must have finished with an executor output and must have written every artifact it declares.
The pipeline runs in a child process (the DAG process, leading its own process group with its steps) whose
output goes to `<run dir>/kfp.log`; the run's process follows that log to show progress and cut out the failing
step's log, records the outcome (SUCCEEDED, FAILED or INTERRUPTED, with the reason) and holds the run's lock
until then (runner/history.py). A DAG process whose run's process is gone stops itself and its steps.
"""

import datetime
import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from components.step_cache import CACHE_DIR_ENV
from pipelines import registry
from runner import history
from runner.preflight import check_parameters

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_PROGRESS_PREFIXES = ("build_shards:", "train:", "evaluate:", "calibrate:", "study:", "cache:")
_UNCHECKED_ARTIFACTS = {"system.Metrics", "system.ClassificationMetrics", "system.SlicedClassificationMetrics"}


def runs_home() -> str:
  return os.path.abspath(os.environ.get("PATCHFLOW_HOME", "runs"))


def new_run_id(pipeline: str) -> str:
  return f"{pipeline}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def dag_tasks(pipeline) -> dict[str, list[str]]:
  """Task -> names of the output artifacts it must write (metrics artifacts excepted). A task inside a
  dsl.ParallelFor is named by its directories' pattern, `<loop>-iteration-*/<task>`: kfp.local runs
  iteration i of loop task `for-loop-2` under `for-loop-2-iteration-<i>/`."""
  spec = pipeline.pipeline_spec
  out = {}

  def walk(dag, prefix):
    for name, task in dag.tasks.items():
      component = spec.components[task.component_ref.name]
      if component.WhichOneof("implementation") == "dag":
        walk(component.dag, f"{prefix}{name}-iteration-*/" if task.WhichOneof("iterator") else prefix)
        continue
      artifacts = component.output_definitions.artifacts
      out[prefix + name] = sorted(a for a, d in artifacts.items()
                                  if d.artifact_type.schema_title not in _UNCHECKED_ARTIFACTS)
  walk(spec.root.dag, "")
  return out


def report_source(pipeline) -> tuple[str, str]:
  """(task, artifact name) of the pipeline's output, the report."""
  outputs = pipeline.pipeline_spec.root.dag.outputs.artifacts
  selector = next(iter(outputs.values())).artifact_selectors[0]
  return selector.producer_subtask, selector.output_artifact_key


def _write_json(path: str, value) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def check_outputs(execution_root: str | None, tasks: dict[str, list[str]], statuses: dict[str, str]) -> dict:
  """Per task: SUCCEEDED only if kfp said so, its executor output exists and every artifact is non-empty
  (for a task in a ParallelFor: in every iteration's directory). `statuses` are keyed by the names kfp.local
  logs, the last part of a task's pattern."""
  verdicts = {}
  for task, artifacts in tasks.items():
    name = task.rsplit("/", 1)[-1]
    if name not in statuses:
      verdicts[task] = ("NOT_RUN", "never started")
      continue
    if statuses[name] != "SUCCESS":
      verdicts[task] = ("FAILED", f"kfp.local status {statuses[name]}")
      continue
    pattern = os.path.join(execution_root or "", task)
    task_dirs = sorted(glob.glob(pattern)) if "*" in task else [pattern]
    verdicts[task] = ("FAILED", "no iteration directory") if not task_dirs else ("SUCCEEDED", "")
    for task_dir in task_dirs:
      missing = [a for a in artifacts if not _non_empty(os.path.join(task_dir, a))]
      if not os.path.exists(os.path.join(task_dir, "executor_output.json")):
        verdicts[task] = ("FAILED", "no executor_output.json although kfp.local reported SUCCESS")
      elif missing:
        verdicts[task] = ("FAILED", f"output artifact {missing[0]!r} missing or empty although kfp.local "
                                    "reported SUCCESS")
      else:
        continue
      break
  return verdicts


def _non_empty(path: str) -> bool:
  if os.path.isdir(path):
    return any(os.scandir(path))
  return os.path.isfile(path) and os.path.getsize(path) > 0


def step_log(log_path: str, task: str) -> list[str]:
  """The lines kfp.local streamed for one task."""
  lines, inside = [], False
  with open(log_path, encoding="utf-8", errors="replace") as f:
    for raw in f:
      line = _ANSI.sub("", raw.rstrip("\n"))
      if (m := _EXECUTING.search(line)):
        inside = m.group(1) == task
      elif (m := _FINISHED.search(line)) and m.group(1) == task:
        lines.append(line)
        inside = False
      if inside:
        lines.append(line)
  return lines


_EXCEPTION = re.compile(r"^\s*([\w.]+(Error|Exception|Interrupt)): (.+)$")


def last_error_line(log_path: str, task: str) -> str | None:
  """The last `SomeError: message` line a task logged: usually the one-line reason it failed."""
  found = None
  for line in step_log(log_path, task):
    if (m := _EXCEPTION.match(line)):
      found = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(3)}"
  return found


def create_run(name: str, params: dict, home: str | None = None, parent: str | None = None,
               run_id: str | None = None) -> tuple[dict, int]:
  """Checks the parameters, then makes the run directory, takes the run's lock and records the run RUNNING:
  (record, the lock's file descriptor; whoever holds it is the run's process, see runner/history.py)."""
  pipeline = registry.get_pipeline(name)
  check_parameters(pipeline, params)
  defaults = {k: d for k, (_, d) in registry.signature(pipeline).items()}
  home = home or runs_home()
  run_id = run_id or new_run_id(name)
  run_dir = os.path.join(home, run_id)
  os.makedirs(run_dir)
  lock = history.hold_run_lock(run_dir)
  record = {"id": run_id, "pipeline": name, "params": {**defaults, **params}, "status": "RUNNING",
            "run_dir": run_dir, "pipeline_root": os.path.join(run_dir, "root"), "started": time.time(),
            "steps": {}, "target": "local", "parent": parent, "pid": os.getpid()}
  _write_json(os.path.join(run_dir, "run.json"), record)
  history.save_run(home, record)
  return record, lock


def run_pipeline(name: str, params: dict, home: str | None = None, echo: Callable[[str], None] = print,
                 parent: str | None = None, run_id: str | None = None, use_cache: bool = True) -> dict:
  """Runs one pipeline locally in this process; returns the run record (status, steps, report path, reason),
  also kept in history."""
  record, lock = create_run(name, params, home, parent, run_id)
  return supervise(record, lock, echo, use_cache)


def start_run_process(name: str, params: dict, home: str, parent: str | None = None,
                      use_cache: bool = True) -> tuple[dict, subprocess.Popen]:
  """Creates the run here (listed RUNNING on return) and hands it, with its lock, to a process of its own that
  runs it: the UI's reruns, whose lives then do not depend on the UI's threads or on the UI itself."""
  record, lock = create_run(name, params, home, parent)
  try:
    process = subprocess.Popen([sys.executable, "-m", "runner.local_run", "supervise", record["run_dir"], str(lock),
                                "cache" if use_cache else "no-cache"], pass_fds=(lock,))
  finally:
    os.close(lock)  # the run's process holds its copy
  record["pid"] = process.pid
  history.set_pid(home, record["id"], process.pid)
  return record, process


# Signals that stop a run: it ends INTERRUPTED with its DAG process and steps stopped, not RUNNING forever.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_GRACE_SECONDS = 10  # after SIGTERM, the DAG's processes get this long before SIGKILL


def _signal_group(child: subprocess.Popen, signum: int) -> None:
  try:
    os.killpg(child.pid, signum)  # the DAG process leads its own process group, its steps in it
  except ProcessLookupError:
    pass


def supervise(record: dict, lock: int, echo: Callable[[str], None] = print, use_cache: bool = True) -> dict:
  """Runs a created run's DAG in a child process, follows its log, decides the outcome and records it; then
  releases the run's lock. SIGTERM, SIGINT or SIGHUP stop the DAG and record INTERRUPTED."""
  stop = {}

  def on_signal(signum, _frame):  # only notes it: the loop below stops the DAG (_stop_dag)
    stop.setdefault("signal", signum)
    stop.setdefault("at", time.time())
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = {s: signal.signal(s, on_signal) for s in _STOP_SIGNALS} if in_main_thread else {}
  try:
    pipeline = registry.get_pipeline(record["pipeline"])
    run_dir, run_id = record["run_dir"], record["id"]
    home = os.path.dirname(run_dir)
    record["pid"] = os.getpid()
    history.save_run(home, record)
    log_path = os.path.join(run_dir, "kfp.log")
    echo(f"run {run_id}: pipeline {record['pipeline']}, log {log_path}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           CACHE_DIR_ENV: os.path.join(home, ".cache") if use_cache else ""}
    start, step_start, statuses, child = time.time(), {}, {}, None
    with open(log_path, "w", encoding="utf-8") as log:
      if not stop:
        child = subprocess.Popen([sys.executable, "-m", "runner.local_run", "dag", run_dir, str(os.getpid())],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    if child:
      _follow(log_path, child, record, home, echo, start, step_start, statuses, stop)
      if stop:
        _signal_group(child, signal.SIGKILL)  # whatever of the DAG outlived its leader
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  executions = sorted(d for d in os.listdir(os.path.join(run_dir, "root")) if not d.startswith(".")) \
      if os.path.isdir(os.path.join(run_dir, "root")) else []
  execution_root = os.path.join(run_dir, "root", executions[-1]) if executions else None
  verdicts = check_outputs(execution_root, dag_tasks(pipeline), statuses)
  for task, (verdict, why) in verdicts.items():
    step = record["steps"].setdefault(task.rsplit("/", 1)[-1], {})
    step["verdict"] = "INTERRUPTED" if stop and step.get("status") == "RUNNING" else verdict
    if why:
      step["why"] = why
  failed = [t.rsplit("/", 1)[-1] for t, (v, _) in verdicts.items() if v == "FAILED"]
  not_run = [t.rsplit("/", 1)[-1] for t, (v, _) in verdicts.items() if v == "NOT_RUN"]
  record["duration_seconds"] = round(time.time() - start, 2)
  record["finished"] = time.time()
  record["execution_root"] = execution_root
  if stop:
    record["status"], record["signal"] = "INTERRUPTED", stop["signal"]
    record["reason"] = f"stopped by {signal.Signals(stop['signal']).name}"
  elif failed or not_run or child.returncode != 0:
    step = failed[0] if failed else (not_run[0] if not_run else None)
    record["status"], record["failed_step"] = "FAILED", step
    if step:
      why = last_error_line(log_path, step) or record["steps"].get(step, {}).get("why", "see its log")
      record["reason"] = f"step {step!r} FAILED: {why}"
    else:
      record["reason"] = f"the pipeline process exited with status {child.returncode} (see {log_path})"
  else:
    report_src = os.path.join(execution_root, *report_source(pipeline))
    record["report"] = os.path.join(run_dir, "report.html")
    shutil.copyfile(report_src, record["report"])
    record["status"] = "SUCCEEDED"
  _write_json(os.path.join(run_dir, "run.json"), record)
  history.save_run(home, record)
  os.close(lock)  # only now: a run seen with a free lock has recorded its outcome or died
  return record


def _follow(log_path, child, record, home, echo, start, step_start, statuses, stop) -> None:
  """Follows the DAG process's log until it exits: step states into the record, progress lines to `echo`."""
  with open(log_path, encoding="utf-8", errors="replace") as follow:
    while True:
      _stop_dag(child, stop)
      line = follow.readline()
      if not line:
        if child.poll() is not None:
          rest = follow.read()
          if not rest:
            break
          line = rest
        else:
          time.sleep(0.2)
          continue
      for text in line.splitlines():
        text = _ANSI.sub("", text)
        if (m := _EXECUTING.search(text)):
          step_start[m.group(1)] = time.time()
          record["steps"][m.group(1)] = {"status": "RUNNING"}
          history.save_run(home, record)
          echo(f"  [{time.time() - start:6.1f}s] {m.group(1)}: running")
        elif (m := _FINISHED.search(text)):
          task, status = m.group(1), m.group(2)
          if statuses.get(task, "SUCCESS") == "SUCCESS":  # a task run once per loop iteration: failures stick
            statuses[task] = status
          seconds = time.time() - step_start.get(task, start)
          previous = record["steps"].get(task, {})  # loop tasks run once per iteration
          record["steps"][task] = {"status": statuses[task], "seconds": round(previous.get("seconds", 0) + seconds, 2),
                                   "runs": previous.get("runs", 0) + 1}
          history.save_run(home, record)
          echo(f"  [{time.time() - start:6.1f}s] {task}: {status} in {seconds:.1f}s")
        elif text.strip().startswith(_PROGRESS_PREFIXES):
          echo(f"      {text.strip()}")


def _stop_dag(child: subprocess.Popen, stop: dict) -> None:
  """Once a stop signal came: SIGTERM to the DAG's process group, SIGKILL after the grace period."""
  if stop and "terminated" not in stop:
    stop["terminated"] = True
    _signal_group(child, signal.SIGTERM)
  elif stop and time.time() - stop["at"] > _GRACE_SECONDS:
    _signal_group(child, signal.SIGKILL)


def _die_with(supervisor: int) -> None:
  """Stops this DAG process and its steps (its process group) once the run's process is gone, e.g. killed by
  SIGKILL: nothing would record what they do."""
  while os.getppid() == supervisor:
    time.sleep(1)
  os.killpg(0, signal.SIGKILL)


def _child(run_dir: str, supervisor: int) -> int:
  """Runs inside the DAG process: kfp.local executes the DAG, writing under <run dir>/root."""
  import warnings

  from kfp import local
  threading.Thread(target=_die_with, args=(supervisor,), daemon=True).start()
  with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
    record = json.load(f)
  # The project image's name has no "python" in it, which kfp.local warns about; here it is the current env.
  warnings.filterwarnings("ignore", message=".*non-Python base image.*")
  local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=os.path.join(run_dir, "root"),
             workspace_root=os.path.join(run_dir, "workspace"), raise_on_error=False)
  registry.get_pipeline(record["pipeline"])(**record["params"])
  return 0


def _supervise_created(run_dir: str, lock: int, cache: str) -> int:
  """Runs inside a run's own process (start_run_process): the run was created by its starter."""
  with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
    record = json.load(f)
  supervise(record, lock, echo=lambda line: print(line, flush=True), use_cache=cache == "cache")
  return 0


if __name__ == "__main__":
  if sys.argv[1] == "dag":
    sys.exit(_child(sys.argv[2], int(sys.argv[3])))
  sys.exit(_supervise_created(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
