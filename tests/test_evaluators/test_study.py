"""The calibration study's pieces in process: variants, training, evaluation by method, the report."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from evaluators import study
from evaluators.metrics import softmax
from schemas.errors import ContractError
from trainers.variants import train_variant, validate_variant

TINY = {"train.steps": 3, "train.batch_size": 4, "train.warmup_steps": 1, "train.checkpoint_every": 3,
        "train.log_every": 3}


def test_variants_are_validated_and_filled_in():
  v = validate_variant({"name": "S", "width": 32.0, "depth": 1, "method": "ensemble"})  # KFP sends floats
  assert v["width"] == 32 and v["seeds"] == [0, 1, 2] and v["mlp_dim"] == 64
  assert validate_variant({"name": "S", "width": 8, "depth": 1, "method": "mc_dropout"})["dropout"] == 0.2
  for bad, message in [({"name": "S", "width": 8, "depth": 1, "method": "bayes"}, "method must be one of"),
                       ({"name": "S", "depth": 1, "method": "ensemble"}, "missing key 'width'"),
                       ({"name": "S", "width": 8, "depth": 1, "method": "deterministic", "lr": 1}, "unknown key 'lr'"),
                       ({"name": "S", "width": 8, "depth": 1, "method": "ensemble", "seeds": [0]}, "at least 2 seeds")]:
    with pytest.raises(ContractError, match=message):
      validate_variant(bad)


@pytest.mark.slow
def test_each_method_is_trained_evaluated_and_reported(shard_dir, tmp_path):
  base = {"name": "T", "width": 16, "depth": 1, "heads": 2}
  variants = {"det": {**base, "method": "deterministic", "temperature_scaling": True},
              "mc": {**base, "method": "mc_dropout", "dropout": 0.5, "mc_samples": 4},
              "ens": {**base, "method": "ensemble", "seeds": [0, 1]}}
  evaluations = []
  for key, variant in variants.items():
    record = train_variant(str(shard_dir), str(tmp_path / key / "ckpt"), variant, TINY, log=lambda m: None)
    assert len(record["members"]) == len(validate_variant(variant)["seeds"])
    rows = study.evaluate_variant(str(shard_dir), str(tmp_path / key / "ckpt"), str(tmp_path / key / "eval"),
                                  log=lambda m: None)
    evaluations.append(str(tmp_path / key / "eval"))
    assert json.loads((tmp_path / key / "eval" / "summary.json").read_text()) == rows
    for row in rows:
      assert set(row["shifts"]) == {"noise2"} and row["ms_per_example"] > 0 and row["params"] > 0
  det = json.loads((tmp_path / "det" / "eval" / "summary.json").read_text())
  assert [r["method"] for r in det] == ["deterministic", "temperature_scaling"]
  plain = pq.read_table(tmp_path / "det" / "eval" / "deterministic" / "predictions.parquet")
  scaled = pq.read_table(tmp_path / "det" / "eval" / "temperature_scaling" / "predictions.parquet")
  t = json.loads((tmp_path / "det" / "eval" / "deterministic" / "calibration.json").read_text())["temperature"]
  np.testing.assert_allclose(np.stack(scaled.column("logits").to_numpy(zero_copy_only=False)),
                             np.stack(plain.column("logits").to_numpy(zero_copy_only=False)) / t, rtol=1e-5)
  # T minimises NLL on the val rows it was fitted on (test NLL on a dozen images can go either way).
  from evaluators.metrics import negative_log_likelihood
  split = np.array(plain.column("split").to_pylist())
  labels = np.array(plain.column("label").to_pylist())
  logits = np.stack(plain.column("logits").to_numpy(zero_copy_only=False)).astype(np.float64)
  val = split == "val"
  assert val.any()
  assert negative_log_likelihood(logits[val] / t, labels[val]) <= negative_log_likelihood(logits[val], labels[val]) + 1e-6
  # The ensemble's probabilities are the mean of its members' softmax.
  from evaluators.predict import PREDICT_FIELDS, slot_logits
  from schemas.dataset_info import read_dataset_info
  from schemas.shards import load_split
  from trainers.train import load_trained_model
  info = read_dataset_info(str(shard_dir))
  data = load_split(str(shard_dir), "val", info, fields=PREDICT_FIELDS)
  members = [load_trained_model(str(tmp_path / "ens" / "ckpt" / f"member-{s}"))[0] for s in (0, 1)]
  expected = np.mean([softmax(slot_logits(m, data).astype(np.float64)) for m in members], axis=0)
  ens = pq.read_table(tmp_path / "ens" / "eval" / "ensemble" / "predictions.parquet").to_pydict()
  val = [i for i, s in enumerate(ens["split"]) if s == "val"]
  np.testing.assert_allclose(np.array([ens["probs"][i] for i in val]), expected[data["labels"] >= 0], rtol=1e-4,
                             atol=1e-6)
  # MC dropout averages stochastic passes: not the deterministic softmax of the same member.
  mc = pq.read_table(tmp_path / "mc" / "eval" / "mc_dropout" / "predictions.parquet").to_pydict()
  member = load_trained_model(str(tmp_path / "mc" / "ckpt" / "member-0"))[0]
  deterministic = softmax(slot_logits(member, data).astype(np.float64))[data["labels"] >= 0]
  assert not np.allclose(np.array([mc["probs"][i] for i in val]), deterministic, atol=1e-6)
  rows = study.render_study_report(evaluations, str(tmp_path / "report.html"))
  html = (tmp_path / "report.html").read_text()
  assert len(rows) == 4 and html.count("data:image/png;base64,") == 1
  for method in ("deterministic", "temperature_scaling", "mc_dropout", "ensemble"):
    assert f"T / {method}" in html
  assert "shifted accuracy" in html and "ms per example" in html


def test_members_of_different_architectures_never_share_a_checkpoint():
  from trainers.variants import _member_name, member_overrides, model_variants
  plain, wide = model_variants({"name": "T", "width": 16, "depth": 1, "heads": 2, "methods": [
      {"method": "deterministic"}, {"method": "ensemble", "seeds": [0, 1], "heads": 4}]})
  assert _member_name(member_overrides(plain, 0)) != _member_name(member_overrides(wide, 0))
  assert _member_name(member_overrides(plain, 0)) == _member_name(member_overrides(dict(plain), 0))


@pytest.mark.slow
def test_a_model_trains_each_distinct_member_once_and_evaluates_every_method(shard_dir, tmp_path):
  from trainers.variants import model_variants, train_model
  model = {"name": "T", "width": 16, "depth": 1, "heads": 2, "methods": [
      {"method": "deterministic", "temperature_scaling": True}, {"method": "label_smoothing"},
      {"method": "ensemble", "seeds": [0, 1]}]}
  logs = []
  records = train_model(str(shard_dir), str(tmp_path / "ckpt"), model, TINY, log=logs.append)
  members = sorted(d.name for d in (tmp_path / "ckpt").iterdir() if d.name.startswith("member-"))
  # deterministic seed 0 = ensemble seed 0; label smoothing is another objective, so another model.
  assert members == ["member-seed0-dropout0-ls0-w16-d1-h2-mlp32", "member-seed0-dropout0-ls0.1-w16-d1-h2-mlp32",
                     "member-seed1-dropout0-ls0-w16-d1-h2-mlp32"]
  assert records[0]["members"][0]["dir"] == records[2]["members"][0]["dir"]
  assert any("already trained" in m for m in logs)
  rows = study.evaluate_model(str(shard_dir), str(tmp_path / "ckpt"), str(tmp_path / "eval"), log=lambda m: None)
  assert [r["method"] for r in rows] == ["deterministic", "temperature_scaling", "label_smoothing", "ensemble"]
  assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == rows
  by_method = {r["method"]: r for r in rows}
  assert by_method["ensemble"]["params"] == 2 * by_method["deterministic"]["params"]
  with pytest.raises(ContractError, match="a method appears twice"):
    model_variants({**model, "methods": [{"method": "ensemble"}, {"method": "ensemble"}]})
  with pytest.raises(ContractError, match="non-empty 'methods'"):
    model_variants({"name": "T", "width": 16, "depth": 1})
