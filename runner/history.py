"""Run history: every local run (and every submitted remote run) indexed in SQLite under $PATCHFLOW_HOME."""

import json
import os
import sqlite3
from typing import Any

from schemas.errors import ContractError

DB_NAME = "runs.sqlite"
_COLUMNS = ("id", "pipeline", "params", "status", "started", "finished", "duration_seconds", "run_dir",
            "pipeline_root", "report", "steps", "target", "console_url", "parent", "failed_step")
_JSON_COLUMNS = {"params", "steps"}


def _connect(home: str) -> sqlite3.Connection:
  os.makedirs(home, exist_ok=True)
  db = sqlite3.connect(os.path.join(home, DB_NAME), timeout=30)
  db.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(c + (' PRIMARY KEY' if c == 'id' else '') for c in _COLUMNS)})")
  return db


def save_run(home: str, record: dict[str, Any]) -> None:
  """Inserts or replaces one run; unknown keys of the record are ignored."""
  values = [json.dumps(record.get(c)) if c in _JSON_COLUMNS else record.get(c) for c in _COLUMNS]
  with _connect(home) as db:
    db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
               values)


def _row_to_record(row) -> dict[str, Any]:
  record = dict(zip(_COLUMNS, row))
  for c in _JSON_COLUMNS:
    record[c] = json.loads(record[c]) if record[c] else ({} if c == "steps" else {})
  return record


def list_runs(home: str) -> list[dict[str, Any]]:
  """Newest first."""
  with _connect(home) as db:
    rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY started DESC, id DESC").fetchall()
  return [_row_to_record(r) for r in rows]


def get_run(home: str, run_id: str) -> dict[str, Any]:
  with _connect(home) as db:
    row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE id = ?", (run_id,)).fetchone()
  if row is None:
    raise ContractError(f"unknown run id {run_id!r} (see `patchflow runs`)")
  return _row_to_record(row)

