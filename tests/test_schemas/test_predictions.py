import numpy as np
import pyarrow as pa
import pytest

from schemas.errors import ContractError
from schemas.predictions import SCHEMA, predictions_table, validate_predictions


def test_table_has_contract_columns():
  t = predictions_table(["a", "b"], [0, 1], np.zeros((2, 3)), split=["val", "val"], shift=["none", "none"])
  assert t.schema == SCHEMA
  assert t.column("logits").to_pylist()[1] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("logits, labels, message", [
    ([[0.0, 1.0], [0.0]], [0, 0], "row 1: 'logits' has 1 classes"),
    ([[0.0, float("nan")]], [0], "row 0: 'logits' holds NaN"),
    ([[0.0, 1.0]], [2], r"row 0: label 2 is outside \[0, 2\)"),
])
def test_bad_rows_are_named(logits, labels, message):
  table = pa.table({"example_id": [str(i) for i in range(len(labels))], "label": pa.array(labels, pa.int32()),
                    "logits": pa.array(logits, pa.list_(pa.float32()))})
  with pytest.raises(ContractError, match=message):
    validate_predictions(table)
