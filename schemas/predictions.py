"""The predictions table (Parquet): what evaluators write and calibration analysers read."""

import numpy as np
import pyarrow as pa

from schemas.errors import ContractError

SCHEMA = pa.schema([
    pa.field("example_id", pa.string(), nullable=False),
    pa.field("label", pa.int32(), nullable=False),
    pa.field("logits", pa.list_(pa.float32()), nullable=False),
    pa.field("split", pa.string()),
    pa.field("shift", pa.string()),
    pa.field("resolution", pa.int32()),
])


def predictions_table(example_ids, labels, logits, split=None, shift=None, resolution=None,
                      score_column: str = "logits") -> pa.Table:
  """`logits` are written to `score_column`: "logits", or "probs" for probabilities (e.g. averaged over
  MC-dropout samples or ensemble members, which have no single logit vector)."""
  logits = np.asarray(logits, dtype=np.float32)
  n = len(example_ids)
  columns = {
      "example_id": pa.array(list(example_ids), pa.string()),
      "label": pa.array(np.asarray(labels, dtype=np.int32)),
      score_column: pa.array(list(logits), pa.list_(pa.float32())),
      "split": pa.array(list(split) if split is not None else [None] * n, pa.string()),
      "shift": pa.array(list(shift) if shift is not None else [None] * n, pa.string()),
      "resolution": pa.array(np.asarray(resolution, np.int32) if resolution is not None else [None] * n,
                             pa.int32()),
  }
  schema = SCHEMA if score_column == "logits" else SCHEMA.set(2, pa.field(score_column, pa.list_(pa.float32()),
                                                                                nullable=False))
  table = pa.table(columns, schema=schema)
  validate_predictions(table)
  return table


def validate_predictions(table: pa.Table, where: str = "predictions") -> None:
  for name in ("example_id", "label"):
    if name not in table.column_names:
      raise ContractError(f"{where}: missing column {name!r}")
  score = "logits" if "logits" in table.column_names else "probs"
  if score not in table.column_names:
    raise ContractError(f"{where}: needs a 'logits' or 'probs' column")
  scores = table.column(score).to_pylist()
  labels = table.column("label").to_pylist()
  if not scores:
    return
  k = len(scores[0])
  for row, (s, y) in enumerate(zip(scores, labels)):
    if len(s) != k:
      raise ContractError(f"{where}: row {row}: {score!r} has {len(s)} classes, row 0 has {k}")
    if not np.all(np.isfinite(s)):
      raise ContractError(f"{where}: row {row}: {score!r} holds NaN or Inf")
    if not 0 <= y < k:
      raise ContractError(f"{where}: row {row}: label {y} is outside [0, {k})")
