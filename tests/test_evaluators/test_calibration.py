"""evaluators/calibration.py against hand-computed cases and independent loop implementations written here."""

import errno
import json
import math
import os
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluators import calibration, prediction_stream
from runner.cli import main
from schemas.errors import ContractError


def write(path, labels, scores, column="logits", fixed=False, row_group_size=None, **extra):
  scores = [np.asarray(s, np.float32) for s in scores]
  kind = pa.list_(pa.float32(), len(scores[0])) if fixed else pa.list_(pa.float32())
  columns = {"example_id": [f"ex-{i}" for i in range(len(labels))], "label": pa.array(labels, pa.int32()),
             column: pa.array([s.tolist() for s in scores], kind)}
  columns.update({k: pa.array(v) for k, v in extra.items()})
  pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
  return str(path)


def random_case(n=600, k=5, seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  logits = rng.normal(0, scale, (n, k)).astype(np.float32)
  logits[np.arange(n), labels] += 1.0
  return labels, logits


# ------------------------------------------------------------ independent reference implementations (loops)

def ref_softmax(logits):
  out = []
  for row in np.asarray(logits, np.float64).tolist():
    top = max(row)
    e = [math.exp(v - top) for v in row]
    total = sum(e)
    out.append([v / total for v in e])
  return np.array(out)


def ref_top_label(probs, labels):
  conf, correct = [], []
  for p, y in zip(probs, labels):
    best = max(range(len(p)), key=lambda j: (p[j], -j))  # first index of the maximum
    conf.append(p[best])
    correct.append(1.0 if best == y else 0.0)
  return conf, correct


def ref_binned_error(conf, correct, bin_of, num_bins, power=1):
  members = {}
  for i, c in enumerate(conf):
    members.setdefault(bin_of(c), []).append(i)
  total = 0.0
  for b, rows in members.items():
    assert 0 <= b < num_bins
    acc = sum(correct[i] for i in rows) / len(rows)
    mean_conf = sum(conf[i] for i in rows) / len(rows)
    total += len(rows) / len(conf) * abs(acc - mean_conf) ** power
  return total ** (1 / power)


def equal_width(c, num_bins=15):
  for b in range(num_bins):
    if b / num_bins <= c < (b + 1) / num_bins:
      return b
  assert c == 1.0
  return num_bins - 1


def ref_ece(probs, labels, power=1):
  conf, correct = ref_top_label(probs, labels)
  return ref_binned_error(conf, correct, equal_width, 15, power)


def ref_equal_mass_ece(probs, labels, num_bins=100):
  conf, correct = ref_top_label(probs, labels)
  ordered, n = sorted(conf), len(conf)
  uppers = [ordered[min(round(Fraction(i * n, num_bins)), n - 1)] for i in range(1, num_bins)]

  def bin_of(c):  # [lo, hi): the number of upper edges at or below c
    return min(sum(1 for u in uppers if u <= c), num_bins - 1)
  return ref_binned_error(conf, correct, bin_of, num_bins)


def ref_classwise_ece(probs, labels):
  k = probs.shape[1]
  per_class = [ref_binned_error(list(probs[:, j]), [1.0 if y == j else 0.0 for y in labels], equal_width, 15)
               for j in range(k)]
  return sum(per_class) / k


def ref_nll(logits, labels, temperature=1.0):
  probs = ref_softmax(np.asarray(logits, np.float64) / temperature)
  return -sum(math.log(p[y]) for p, y in zip(probs, labels)) / len(labels)


# ------------------------------------------------------------ the metrics

def test_hand_computed_ece_from_probs(tmp_path):
  # Row 1: confidence .8, correct; row 2: confidence .7, wrong. 0.5 * |1 - .8| + 0.5 * |0 - .7| = 0.45.
  r = calibration.analyse(write(tmp_path / "p.parquet", [1, 1], [[.2, .8], [.7, .3]], column="probs"))
  assert r["ece"] == pytest.approx(0.45, abs=1e-7)
  assert r["accuracy"] == 0.5 and r["score_column"] == "probs"
  assert r["nll"] == pytest.approx(-(math.log(.8) + math.log(.3)) / 2, rel=1e-6)
  assert r["brier"] == pytest.approx(((.2 ** 2 + .2 ** 2) + (.7 ** 2 + .7 ** 2)) / 2, rel=1e-6)


def test_every_binned_metric_matches_a_loop_implementation(tmp_path):
  labels, logits = random_case()
  r = calibration.analyse(write(tmp_path / "p.parquet", labels, logits))
  probs = ref_softmax(logits)
  conf, correct = ref_top_label(probs, labels)
  assert r["accuracy"] == pytest.approx(np.mean(correct))
  assert r["ece"] == pytest.approx(ref_ece(probs, labels), abs=1e-6)
  assert r["rms_ce"] == pytest.approx(ref_ece(probs, labels, power=2), abs=1e-6)
  assert r["ece_equal_mass"] == pytest.approx(ref_equal_mass_ece(probs, labels), abs=1e-6)
  assert r["classwise_ece"] == pytest.approx(ref_classwise_ece(probs, labels), abs=1e-6)
  assert r["nll"] == pytest.approx(ref_nll(logits, labels), rel=1e-6)
  onehot = np.eye(5)[labels]
  assert r["brier"] == pytest.approx(((probs - onehot) ** 2).sum(1).mean(), rel=1e-6)


def test_equal_mass_edges_never_split_ties_and_round_half_to_even(tmp_path):
  # 150 rows, 3 distinct confidences: edges fall inside runs of equal values, which stay in one bin.
  probs = [[.9, .1]] * 50 + [[.6, .4]] * 70 + [[.55, .45]] * 30
  labels = [0] * 40 + [1] * 10 + [0] * 35 + [1] * 35 + [0] * 20 + [1] * 10
  r = calibration.analyse(write(tmp_path / "p.parquet", labels, probs, column="probs"))
  assert r["ece_equal_mass"] == pytest.approx(ref_equal_mass_ece(np.array(probs), labels), abs=1e-7)
  # Each run is one bin, so equal-mass ECE equals the 3-group ECE.
  groups = (50 / 150 * abs(.8 - .9) + 70 / 150 * abs(.5 - .6) + 30 / 150 * abs(20 / 30 - .55))
  assert r["ece_equal_mass"] == pytest.approx(groups, abs=1e-6)
  from evaluators.metrics import equal_mass_edge_ranks
  assert equal_mass_edge_ranks(150, 100)[:4].tolist() == [2, 3, 4, 6]  # 1.5 -> 2, 3.0, 4.5 -> 4, 6.0


def test_confidence_one_goes_to_the_last_bin_everywhere(tmp_path):
  r = calibration.analyse(write(tmp_path / "p.parquet", [0, 1, 0], [[1, 0], [1, 0], [.5, .5]], column="probs"))
  assert r["reliability"]["count"][14] == 2
  assert r["ece"] == pytest.approx(ref_ece(np.array([[1, 0], [1, 0], [.5, .5]]), [0, 1, 0]))
  assert r["ece_equal_mass"] == pytest.approx(ref_equal_mass_ece(np.array([[1, 0], [1, 0], [.5, .5]]), [0, 1, 0]))


def test_temperature_minimises_held_out_free_nll_and_scaling_is_applied(tmp_path):
  labels, logits = random_case(n=500, k=4, seed=1, scale=4.0)  # overconfident: T > 1
  split = ["val"] * 150 + ["test"] * 350
  r = calibration.analyse(write(tmp_path / "p.parquet", labels, logits, split=split))
  t = r["temperature"]
  assert t > 1.2
  fit_logits, fit_labels = logits[:150], labels[:150]
  best = ref_nll(fit_logits, fit_labels, t)
  for neighbour in (t * 0.99, t * 1.01, t * 0.999, t * 1.001):
    assert best <= ref_nll(fit_logits, fit_labels, neighbour) + 1e-12
  assert r["temperature_fit"]["fit_rows"] == "split == 'val'" and r["temperature_fit"]["num_held_out"] == 350
  held = ref_softmax(logits[150:] / t)
  assert r["ece_temperature_scaled"] == pytest.approx(ref_ece(held, labels[150:]), abs=1e-6)
  assert r["temperature_fit"]["held_out_after"]["nll"] == pytest.approx(ref_nll(logits[150:], labels[150:], t),
                                                                        rel=1e-6)
  assert r["ece_temperature_scaled"] < r["temperature_fit"]["held_out_before"]["ece"]


def test_without_a_val_split_a_seeded_fifth_of_rows_is_fitted(tmp_path):
  labels, logits = random_case(n=101, k=3, seed=2)
  path = write(tmp_path / "p.parquet", labels, logits)
  a, b = calibration.analyse(path), calibration.analyse(path)
  assert a["temperature_fit"]["num_fit"] == 20 and a["temperature_fit"]["num_held_out"] == 81
  assert a["temperature"] == b["temperature"] and a["bootstrap"] == b["bootstrap"]
  mask, _ = calibration.fit_rows(prediction_stream.open_predictions(path))
  t = a["temperature"]
  assert ref_nll(logits[mask], labels[mask], t) <= min(ref_nll(logits[mask], labels[mask], t * f)
                                                       for f in (0.995, 1.005))


@pytest.mark.parametrize("direct_io", [True, False])
def test_spilled_rows_and_a_second_read_give_the_same_results(tmp_path, monkeypatch, direct_io):
  from evaluators import rowstore
  labels, logits = random_case(n=400, k=6, seed=3)
  path = write(tmp_path / "p.parquet", labels, logits, row_group_size=50)
  monkeypatch.setattr(prediction_stream, "CHUNK_FLOATS", 6 * 64)
  in_memory = calibration.analyse(path)
  monkeypatch.setattr("schemas.direct_io.use_direct_io", direct_io)
  if direct_io and rowstore.DirectSpill.create(6) is None:
    pytest.skip("no O_DIRECT in the temporary directory")
  logs = []
  # Fit rows (80) beyond 50 go to a temporary file (O_DIRECT, else through the page cache); held-out rows
  # (320) beyond 50 go to an O_DIRECT file, else are read from the Parquet file again.
  spilled = calibration.analyse(path, store_budget_bytes=6 * 4 * 50, log=logs.append)
  expected = ("direct spill", "kept (direct spill)") if direct_io else ("buffered spill", "decoded again")
  assert expected[0] in logs[1] and expected[1] in logs[2], logs
  assert spilled["temperature"] == pytest.approx(in_memory["temperature"], rel=1e-9)
  assert spilled["ece_temperature_scaled"] == pytest.approx(in_memory["ece_temperature_scaled"], rel=1e-9)
  assert spilled["temperature_fit"]["held_out_after"]["nll"] == pytest.approx(
      in_memory["temperature_fit"]["held_out_after"]["nll"], rel=1e-9)


def test_a_held_out_spill_failing_on_its_last_block_falls_back_to_decoding_again(tmp_path, monkeypatch):
  from evaluators import rowstore
  if rowstore.DirectSpill.create(6) is None:
    pytest.skip("no O_DIRECT in the temporary directory")
  labels, logits = random_case(n=400, k=6, seed=3)
  path = write(tmp_path / "p.parquet", labels, logits, row_group_size=50)
  monkeypatch.setattr(prediction_stream, "CHUNK_FLOATS", 6 * 64)
  in_memory = calibration.analyse(path)
  real_pwrite = os.pwrite

  def disk_full_for_partial_blocks(fd, data, offset):
    # The held-out spill's rows fit in one partial block, written only when the store is finished.
    if len(data) == 8192:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_pwrite(fd, data, offset)
  monkeypatch.setattr(rowstore.os, "pwrite", disk_full_for_partial_blocks)
  logs = []
  result = calibration.analyse(path, store_budget_bytes=6 * 4 * 50, log=logs.append)
  assert "decoded again" in logs[2], logs
  assert result["ece_temperature_scaled"] == pytest.approx(in_memory["ece_temperature_scaled"], rel=1e-9)


def test_classwise_ece_at_bin_edges_and_one(tmp_path):
  # Probabilities at the float32 values nearest b/15 (below, nearest, above) and at 0 and 1: the class-wise
  # bins (above 1/15 binned one by one, bin 0 from the column totals) agree with the loop implementation.
  near = [np.nextafter(np.float32(b / 15), np.float32(t)) for b in range(1, 15) for t in (0, b / 15, 1)]
  rows = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]] + [[v, 1 - v, 0.0] for v in near] + \
         [[v, 0.0, 1 - v] for v in near[::-1]] + [[(1 - v) / 2, v, (1 - v) / 2] for v in near]
  probs = np.asarray(rows, np.float32)
  labels = np.random.default_rng(12).integers(0, 3, len(probs))
  r = calibration.analyse(write(tmp_path / "p.parquet", labels, probs, column="probs"))
  as_read = probs.astype(np.float64)
  expected = ref_classwise_ece(as_read, labels)
  assert r["classwise_ece"] == pytest.approx(expected, abs=1e-7)  # bin 0 from float32 column sums
  assert r["ece"] == pytest.approx(ref_ece(as_read, labels), abs=1e-12)
  # The cases straddle every edge: the float32 neighbours of b/15 fall on both sides of it.
  sides = [(equal_width(float(below)), equal_width(float(above))) for below, above in zip(near[0::3], near[2::3])]
  assert sides == [(b - 1, b) for b in range(1, 15)]
  # From logits (softmax in float32, so no exact edges): rows with probability 1.0 and exact ties.
  logits = np.array([[0, -200, -200], [-200, 0, -200], [0, 0, 0], [3, 3, 0], [1, 1, 1], [0, 0, -1e4]] * 5,
                    np.float32)
  labels = np.random.default_rng(13).integers(0, 3, len(logits))
  r = calibration.analyse(write(tmp_path / "l.parquet", labels, logits))
  assert r["reliability"]["count"][14] == 10  # the rows of probability 1.0
  assert r["classwise_ece"] == pytest.approx(ref_classwise_ece(ref_softmax(logits), labels), abs=1e-6)


def test_rank_metrics_hand_computed():
  # OOD scores 1 - conf = [.1, .5, .5, .8]; OOD rows score .5 and .8, in-distribution rows .1 and .5.
  ood = calibration.ood_metrics(np.array([.9, .5, .5, .2]), np.array([False, True, False, True]))
  assert ood["auroc"] == pytest.approx(3.5 / 4)          # the tie counts one half
  assert ood["auprc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
  assert ood["fpr_at_95_tpr"] == pytest.approx(0.5)
  perfect = calibration.ood_metrics(np.array([.9, .8, .6, .4]), np.array([0, 0, 1, 1], bool))
  assert (perfect["auroc"], perfect["auprc"], perfect["fpr_at_95_tpr"]) == (1.0, 1.0, 0.0)
  assert calibration.auroc(np.array([.9, .8, .7, .6]), np.array([1, 0, 1, 0], bool)) == pytest.approx(0.75)
  assert calibration.ood_metrics(np.array([.9]), np.array([False]))["auroc"] is None


def test_selective_prediction_is_independent_of_row_order_within_ties():
  conf = np.array([.9, .7, .7, .7, .5])
  correct = np.array([1, 1, 0, 0, 1], bool)
  sp = calibration.selective_prediction(conf, correct)
  # k = 1: 1/1; k = 2..4 take the tie group pro rata (1/3 correct each); k = 5: 3/5.
  expected = [1.0, (1 + 1 / 3) / 2, (1 + 2 / 3) / 3, 2 / 4, 3 / 5]
  assert sp["area_under_curve"] == pytest.approx(np.mean(expected))
  assert dict(zip(sp["coverage"], sp["accuracy"]))[1.0] == pytest.approx(0.6)
  shuffled = calibration.selective_prediction(conf[[0, 3, 2, 1, 4]], correct[[0, 3, 2, 1, 4]])
  assert shuffled == sp


def test_bootstrap_agrees_with_resampling_rows():
  rng = np.random.default_rng(4)
  conf = rng.uniform(0.3, 1.0, 3000)
  correct = rng.random(3000) < conf - 0.05
  ours = calibration.bootstrap_intervals(conf, correct, replicates=2000)
  ece_samples, acc_samples = [], []
  for _ in range(2000):
    pick = rng.integers(0, 3000, 3000)
    c, a = conf[pick], correct[pick]
    index = np.minimum((c * 15).astype(int), 14)
    ece_samples.append(sum(abs(a[index == b].sum() - c[index == b].sum()) for b in range(15)) / 3000)
    acc_samples.append(a.mean())
  for key, samples in (("ece", ece_samples), ("accuracy", acc_samples)):
    for ours_q, theirs_q in zip(ours[key], np.quantile(samples, [0.025, 0.975])):
      assert ours_q == pytest.approx(theirs_q, abs=0.004)


# ------------------------------------------------------------ breakdowns, streaming, formats

def test_per_split_per_shift_and_ood_breakdowns(tmp_path):
  labels, logits = random_case(n=300, k=4, seed=5)
  split = ["val"] * 100 + ["test"] * 100 + ["test-noise1"] * 100
  shift = ["none"] * 200 + ["noise1"] * 100
  ood = [False] * 250 + [True] * 50
  r = calibration.analyse(write(tmp_path / "p.parquet", labels, logits, split=split, shift=shift, ood=ood))
  assert set(r["splits"]) == {"val", "test", "test-noise1"} and set(r["shifts"]) == {"none", "noise1"}
  probs = ref_softmax(logits)
  m = r["splits"]["test"]
  assert m["num_examples"] == 100
  assert m["ece"] == pytest.approx(ref_ece(probs[100:200], labels[100:200]), abs=1e-6)
  assert m["classwise_ece"] == pytest.approx(ref_classwise_ece(probs[100:200], labels[100:200]), abs=1e-6)
  assert m["ece_equal_mass"] == pytest.approx(ref_equal_mass_ece(probs[100:200], labels[100:200]), abs=1e-6)
  assert r["shifts"]["none"]["nll"] == pytest.approx(ref_nll(logits[:200], labels[:200]), rel=1e-6)
  conf = probs.max(1)
  assert r["ood"]["auroc"] == pytest.approx(calibration.auroc(1 - conf, np.array(ood)))
  assert r["ood"]["num_ood"] == 50


def test_streaming_many_row_groups_and_chunks_equals_one(tmp_path, monkeypatch):
  labels, logits = random_case(n=700, k=9, seed=6)
  split = ["val"] * 200 + ["test"] * 500
  one = calibration.analyse(write(tmp_path / "one.parquet", labels, logits, split=split))
  monkeypatch.setattr(prediction_stream, "CHUNK_FLOATS", 9 * 64)  # 64-row chunks
  many = calibration.analyse(write(tmp_path / "many.parquet", labels, logits, split=split, row_group_size=37))
  assert calibration.json_safe(one).keys() == calibration.json_safe(many).keys()
  for key in ("accuracy", "nll", "brier", "ece", "ece_equal_mass", "rms_ce", "classwise_ece", "temperature",
              "ece_temperature_scaled", "calibration_auc"):
    assert many[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
  assert many["bootstrap"] == one["bootstrap"] and many["splits"]["test"]["ece"] == pytest.approx(
      one["splits"]["test"]["ece"])


def test_fixed_size_lists_and_probs_give_the_same_metrics(tmp_path):
  labels, logits = random_case(n=200, k=3, seed=7)
  base = calibration.analyse(write(tmp_path / "a.parquet", labels, logits))
  fixed = calibration.analyse(write(tmp_path / "b.parquet", labels, logits, fixed=True))
  probs = calibration.analyse(write(tmp_path / "c.parquet", labels, ref_softmax(logits), column="probs"))
  for key in ("accuracy", "nll", "brier", "ece", "classwise_ece", "temperature"):
    assert fixed[key] == base[key]
    assert probs[key] == pytest.approx(base[key], rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------ edge cases

def test_all_equal_confidences(tmp_path):
  r = calibration.analyse(write(tmp_path / "p.parquet", [0, 1, 2, 3, 0, 0], [[0.0] * 4] * 6))
  assert r["accuracy"] == pytest.approx(0.5)  # ties go to class 0
  assert r["ece"] == pytest.approx(0.25) and r["ece_equal_mass"] == pytest.approx(0.25)
  assert r["temperature"] == 1.0 and r["calibration_auc"] is not None


def test_a_single_example(tmp_path):
  r = calibration.analyse(write(tmp_path / "p.parquet", [1], [[0.0, 2.0, 1.0]]))
  assert r["accuracy"] == 1.0 and r["ece"] == pytest.approx(1 - ref_softmax([[0.0, 2.0, 1.0]])[0, 1])
  assert r["ece_temperature_scaled"] is None and r["temperature_fit"]["num_held_out"] == 0
  assert r["bootstrap"]["ece"][0] == r["bootstrap"]["ece"][1] == pytest.approx(r["ece"])
  assert r["calibration_auc"] is None
  json.dumps(calibration.json_safe(r), allow_nan=False)


def test_binary_and_ten_thousand_classes(tmp_path):
  labels, logits = random_case(n=300, k=2, seed=8)
  r = calibration.analyse(write(tmp_path / "b.parquet", labels, logits))
  assert r["ece"] == pytest.approx(ref_ece(ref_softmax(logits), labels), abs=1e-6)
  labels, logits = random_case(n=40, k=10_000, seed=9, scale=1.0)
  logits[np.arange(40), labels] += 12.0
  r = calibration.analyse(write(tmp_path / "k.parquet", labels, logits))
  probs = ref_softmax(logits)
  assert r["num_classes"] == 10_000
  assert r["ece"] == pytest.approx(ref_ece(probs, labels), abs=1e-6)
  assert r["classwise_ece"] == pytest.approx(ref_classwise_ece(probs, labels), abs=1e-6)


@pytest.mark.parametrize("scores, labels, message", [
    ([[0.0, 1.0], [0.0, float("nan")]], [0, 0], "row 1 (example_id 'ex-1'): 'logits' holds NaN or Inf"),
    ([[0.0, float("inf")], [0.0, 1.0]], [0, 0], "row 0 (example_id 'ex-0'): 'logits' holds NaN or Inf"),
    ([[0.0, 1.0], [0.0, 1.0], [float("-inf"), 1.0]], [0, 0, 0], "row 2 (example_id 'ex-2'): 'logits' holds NaN"),
    ([[0.0, 1.0], [0.0, 1.0]], [0, 2], r"row 1 \(example_id 'ex-1'\): label 2 is outside \[0, 2\)"),
    ([[0.0, 1.0]], [-1], r"row 0 \(example_id 'ex-0'\): label -1 is outside \[0, 2\)"),
    ([[0.0, 1.0], [0.0, 1.0, 2.0]], [0, 0], "row 1 (example_id 'ex-1'): 'logits' has 3 classes, row 0 has 2"),
])
def test_bad_rows_are_named(tmp_path, scores, labels, message):
  path = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"example_id": [f"ex-{i}" for i in range(len(labels))],
                           "label": pa.array(labels, pa.int32()),
                           "logits": pa.array(scores, pa.list_(pa.float32()))}), str(path), row_group_size=1)
  with pytest.raises(ContractError, match=message.replace("(", r"\(").replace(")", r"\)")
                     if "\\" not in message else message):
    calibration.analyse(str(path))


def test_bad_probs_and_files_are_named(tmp_path):
  with pytest.raises(ContractError, match=r"row 1 \(example_id 'ex-1'\): 'probs' sums to 1.3, not 1"):
    calibration.analyse(write(tmp_path / "p.parquet", [0, 0], [[.5, .5], [.6, .7]], column="probs"))
  pq.write_table(pa.table({"example_id": ["a"], "label": [0]}), str(tmp_path / "n.parquet"))
  with pytest.raises(ContractError, match="needs a 'logits' or 'probs' column"):
    calibration.analyse(str(tmp_path / "n.parquet"))
  (tmp_path / "x.parquet").write_text("not parquet")
  with pytest.raises(ContractError, match="not a Parquet file"):
    calibration.analyse(str(tmp_path / "x.parquet"))


# ------------------------------------------------------------ the command and its artifacts

def test_cli_writes_json_figures_and_fragment(tmp_path, capsys):
  labels, logits = random_case(n=200, k=4, seed=10)
  path = write(tmp_path / "p.parquet", labels, logits, split=["val"] * 50 + ["test"] * 150,
               shift=["none"] * 200)
  assert main(["calibrate", "--predictions", path, "--output", str(tmp_path / "out")]) == 0
  out = tmp_path / "out"
  result = json.loads((out / "calibration.json").read_text())
  for key in ("accuracy", "nll", "brier", "ece", "ece_equal_mass", "rms_ce", "classwise_ece", "temperature",
              "ece_temperature_scaled", "bootstrap", "splits", "shifts", "selective_prediction", "calibration_auc"):
    assert key in result, key
  for name in ("reliability.png", "reliability_temperature_scaled.png", "selective_prediction.png", "lineage.json"):
    assert (out / name).stat().st_size > 0
  html = (out / "calibration.html").read_text()
  assert html.count("data:image/png;base64,") == 3 and "ECE (100 equal-mass bins)" in html
  assert "wrote" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
  path = write(tmp_path / "p.parquet", [0, 5], [[0.0, 1.0], [1.0, 0.0]])
  assert main(["calibrate", "--predictions", path, "--output", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("patchflow: error: ") and "row 1 (example_id 'ex-1'): label 5 is outside [0, 2)" in err[-1]
  assert main(["calibrate", "--predictions", str(tmp_path / "missing.parquet"), "--output", "o"]) == 2
  assert capsys.readouterr().err.strip() == f"patchflow: error: {tmp_path}/missing.parquet: no such file"


@pytest.mark.parametrize("output", ["a_file", "a_file/sub"])
def test_an_output_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys, output):
  path = write(tmp_path / "p.parquet", *random_case(n=50, k=3, seed=12))
  (tmp_path / "a_file").write_text("keep me")
  assert main(["calibrate", "--predictions", path, "--output", str(tmp_path / output)]) == 2
  out, err = capsys.readouterr()
  assert err.strip() == f"patchflow: error: --output {str(tmp_path / output)!r}: {tmp_path / 'a_file'} is a file, " \
                        "not a directory"
  assert "calibrate:" not in out + err  # refused before reading the predictions
  assert (tmp_path / "a_file").read_text() == "keep me"


def _outputs(directory):
  return {p.name: p.read_bytes() for p in directory.rglob("*") if p.is_file()} if directory.exists() else {}


@pytest.mark.parametrize("earlier_run", [False, True], ids=["new directory", "over an earlier run"])
def test_a_full_disk_leaves_all_of_the_outputs_or_none_and_is_one_line(tmp_path, capsys, monkeypatch, earlier_run):
  out = tmp_path / "out"
  path = write(tmp_path / "p.parquet", *random_case(n=100, k=3, seed=13))
  if earlier_run:
    assert main(["calibrate", "--predictions", write(tmp_path / "q.parquet", *random_case(n=80, k=3, seed=14)),
                 "--output", str(out)]) == 0
  before = _outputs(out)
  real_write, calls = os.write, []

  def full_after_two_files(fd, data):
    calls.append(len(data))
    if len(calls) > 2:  # the first files are staged, then the disk is full
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(fd, data)

  monkeypatch.setattr(calibration.os, "write", full_after_two_files)
  capsys.readouterr()
  assert main(["calibrate", "--predictions", path, "--output", str(out)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("patchflow: error: [Errno 28] No space left on device") and len(calls) == 3
  assert _outputs(out) == before  # an earlier run's outputs stay whole; a new directory stays empty
  assert sorted(os.listdir(tmp_path)) == sorted(["p.parquet"] + (["q.parquet", "out"] if earlier_run else []))


def test_uri_paths_read_and_write_through_pyarrow_filesystems(tmp_path):
  labels, logits = random_case(n=50, k=3, seed=11)
  write(tmp_path / "p.parquet", labels, logits)
  result = calibration.calibrate(f"file://{tmp_path}/p.parquet", f"file://{tmp_path}/remote", log=lambda m: None)
  assert json.loads((tmp_path / "remote" / "calibration.json").read_text())["ece"] == result["ece"]


def test_gs_predictions_and_output_match_a_local_run(gcs_emulator, tmp_path, monkeypatch, capsys):
  labels, logits = random_case(n=3000, k=40, seed=14)
  path = write(tmp_path / "p.parquet", labels, logits, row_group_size=400,
               split=["val"] * 500 + ["test"] * 2500)
  gcs_emulator.bucket("patchflow-test").blob("preds/p.parquet").upload_from_filename(path)
  # Small chunks and range requests: the file streams from the emulator in many reads.
  monkeypatch.setattr(prediction_stream, "CHUNK_FLOATS", 40 * 256)
  monkeypatch.setattr(prediction_stream, "GCS_READ_BYTES", 256 * 1024)
  requests = []
  from google.cloud.storage import Blob
  download = Blob.download_as_bytes
  monkeypatch.setattr(Blob, "download_as_bytes", lambda self, *a, **kw: requests.append(kw) or download(self, *a, **kw))
  assert main(["calibrate", "--predictions", path, "--output", str(tmp_path / "local")]) == 0
  assert main(["calibrate", "--predictions", "gs://patchflow-test/preds/p.parquet",
               "--output", "gs://patchflow-test/out/cal"]) == 0
  bucket = gcs_emulator.bucket("patchflow-test")
  names = {b.name for b in bucket.list_blobs(prefix="out/cal/")}
  assert {f"out/cal/{n}" for n in ("calibration.json", "calibration.html", "reliability.png", "lineage.json",
                                   "selective_prediction.png", "reliability_temperature_scaled.png")} <= names
  remote = json.loads(bucket.blob("out/cal/calibration.json").download_as_bytes())
  local = json.loads((tmp_path / "local" / "calibration.json").read_text())
  assert remote == local
  ranged = [r for r in requests if r.get("start") is not None]  # never the whole file (500 KB) at once
  assert len(ranged) >= 3 and max(r["end"] - r["start"] for r in ranged) <= 256 * 1024 < os.path.getsize(path)
  lineage = json.loads(bucket.blob("out/cal/lineage.json").download_as_bytes())
  assert lineage["inputs"]["predictions"]["path"] == "gs://patchflow-test/preds/p.parquet"
  assert lineage["inputs"]["predictions"]["fingerprint"]  # from the object's GCS checksum
  assert main(["calibrate", "--predictions", "gs://patchflow-test/preds/missing.parquet", "--output", "o"]) == 2
  assert capsys.readouterr().err.strip().endswith("gs://patchflow-test/preds/missing.parquet: no such file")
