"""Run history: every local run (and every submitted remote run) indexed in SQLite under $PATCHFLOW_HOME.

A local run's process holds an exclusive lock on `<run dir>/run.lock` from before its record says RUNNING until
after its outcome is recorded (hold_run_lock). The kernel drops the lock when that process ends, however it
ends (SIGKILL, out of memory), so a RUNNING record whose lock is free belongs to a dead process: reading the
history settles it as FAILED with the reason. A lock, unlike a recorded pid, cannot be confused with another
process that got the same pid later.
"""

import fcntl
import json
import os
import sqlite3
from typing import Any

from schemas.errors import ContractError

DB_NAME = "runs.sqlite"
LOCK_NAME = "run.lock"
_COLUMNS = ("id", "pipeline", "params", "status", "started", "finished", "duration_seconds", "run_dir",
            "pipeline_root", "report", "steps", "target", "console_url", "parent", "failed_step", "pid", "reason")
_JSON_COLUMNS = {"params", "steps"}
_GONE = "its process (pid {pid}) ended without recording an outcome: killed (SIGKILL, out of memory) or crashed"


def _connect(home: str) -> sqlite3.Connection:
  os.makedirs(home, exist_ok=True)
  db = sqlite3.connect(os.path.join(home, DB_NAME), timeout=30)
  db.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(c + (' PRIMARY KEY' if c == 'id' else '') for c in _COLUMNS)})")
  present = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
  for column in _COLUMNS:
    if column not in present:  # a history written before the column existed
      db.execute(f"ALTER TABLE runs ADD COLUMN {column}")
  return db


def save_run(home: str, record: dict[str, Any]) -> None:
  """Inserts or replaces one run; unknown keys of the record are ignored."""
  values = [json.dumps(record.get(c)) if c in _JSON_COLUMNS else record.get(c) for c in _COLUMNS]
  with _connect(home) as db:
    db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
               values)


def set_pid(home: str, run_id: str, pid: int) -> None:
  """Names the process that now runs a run (it was handed the run and its lock)."""
  with _connect(home) as db:
    db.execute("UPDATE runs SET pid = ? WHERE id = ?", (pid, run_id))


def hold_run_lock(run_dir: str) -> int:
  """Takes the run's lock for this process (and any process it passes the descriptor to); returns the file
  descriptor, which holds the lock until every copy of it is closed."""
  fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    raise ContractError(f"run directory {run_dir} is in use by another run") from None
  return fd


def _is_held(run_dir: str) -> bool:
  try:
    fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR)
  except OSError:
    return False  # no lock file (or no run directory): nobody holds it
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return False
  except OSError:
    return True
  finally:
    os.close(fd)  # releases the lock if it was taken here


def settle(home: str, record: dict[str, Any]) -> dict[str, Any]:
  """The record as it stands: a local RUNNING run whose process is gone becomes FAILED with the reason (in the
  history and in its run.json). Only a run still RUNNING in the history changes: one that recorded its outcome
  meanwhile keeps it."""
  if record["status"] != "RUNNING" or record.get("target") != "local" or _is_held(record.get("run_dir") or ""):
    return record
  steps = {name: {**step, "verdict": "FAILED"} if step.get("status") == "RUNNING" else step
           for name, step in record["steps"].items()}
  reason = _GONE.format(pid=record.get("pid"))
  with _connect(home) as db:
    db.execute("UPDATE runs SET status = 'FAILED', reason = ?, steps = ? WHERE id = ? AND status = 'RUNNING'",
               (reason, json.dumps(steps), record["id"]))
    row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE id = ?", (record["id"],)).fetchone()
  settled = _row_to_record(row)
  run_json = os.path.join(record.get("run_dir") or "", "run.json")
  if settled["status"] == "FAILED" and settled["reason"] == reason and os.path.isfile(run_json):
    with open(run_json, encoding="utf-8") as f:
      saved = json.load(f)
    if saved.get("status") == "RUNNING":
      with open(run_json + ".tmp", "w", encoding="utf-8") as f:
        json.dump({**saved, "status": "FAILED", "reason": reason, "steps": steps}, f, indent=1, sort_keys=True)
      os.replace(run_json + ".tmp", run_json)
  return settled


def _row_to_record(row) -> dict[str, Any]:
  record = dict(zip(_COLUMNS, row))
  for c in _JSON_COLUMNS:
    record[c] = json.loads(record[c]) if record[c] else {}
  return record


def list_runs(home: str) -> list[dict[str, Any]]:
  """Newest first."""
  with _connect(home) as db:
    rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY started DESC, id DESC").fetchall()
  return [settle(home, _row_to_record(r)) for r in rows]


def get_run(home: str, run_id: str) -> dict[str, Any]:
  with _connect(home) as db:
    row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE id = ?", (run_id,)).fetchone()
  if row is None:
    raise ContractError(f"unknown run id {run_id!r} (see `patchflow runs`)")
  return settle(home, _row_to_record(row))
