import json

import pyarrow.parquet as pq
import pytest

from evaluators.calibration import calibrate
from evaluators.predict import predict_and_evaluate, shift_of
from evaluators.report import render_report
from schemas.predictions import SCHEMA
from trainers.configs import apply_overrides, load_config
from trainers.train import train


@pytest.mark.slow
def test_predictions_metrics_and_report(shard_dir, tmp_path):
  config = apply_overrides(load_config("smoke"), {"train.steps": 4, "train.checkpoint_every": 4,
                                                   "train.log_every": 2, "model.width": 32, "model.depth": 1})
  train(str(shard_dir), str(tmp_path / "w"), config, log=lambda m: None)
  metrics = predict_and_evaluate(str(shard_dir), str(tmp_path / "w"), str(tmp_path / "e"), log=lambda m: None)
  table = pq.read_table(tmp_path / "e" / "predictions.parquet")
  assert table.schema.equals(SCHEMA, check_metadata=False)
  assert set(table.column("split").to_pylist()) == {"val", "test", "test-noise2"}
  assert table.num_rows == 24 + 12 + 12
  assert sorted(metrics["splits"]) == ["test", "test-noise2", "val"]
  assert metrics["splits"]["test-noise2"]["shift"] == "noise2"
  json.loads((tmp_path / "e" / "metrics.json").read_text())  # strict JSON: NaN written as null
  summary = render_report(str(shard_dir), str(tmp_path / "w"), str(tmp_path / "e"), str(tmp_path / "r.html"))
  html = (tmp_path / "r.html").read_text()
  assert f"Validation accuracy {summary['val_accuracy']:.3f}" in html
  assert html.count("data:image/png;base64,") >= 4 and "git_revision" in html
  assert "<h2>Calibration</h2>" not in html  # only with a calibration directory
  result = calibrate(str(tmp_path / "e" / "predictions.parquet"), str(tmp_path / "c"), log=lambda m: None)
  assert set(result["splits"]) == {"val", "test", "test-noise2"} and set(result["shifts"]) == {"none", "noise2"}
  assert result["temperature_fit"]["fit_rows"] == "split == 'val'"
  render_report(str(shard_dir), str(tmp_path / "w"), str(tmp_path / "e"), str(tmp_path / "r2.html"),
                str(tmp_path / "c"))
  html = (tmp_path / "r2.html").read_text()
  assert "<h2>Calibration</h2>" in html and html.count("&quot;step&quot;: &quot;calibrate&quot;") == 1


def test_shift_names():
  assert shift_of("test-noise3") == "noise3" and shift_of("val") == "none"
