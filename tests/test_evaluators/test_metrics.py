import numpy as np
import pytest

from evaluators import metrics


def test_ece_hand_computed():
  probs = np.array([[0.2, 0.8], [0.7, 0.3]])
  labels = np.array([1, 1])
  # Example 1: confidence .8, correct; example 2: confidence .7, wrong. 0.5*|1-.8| + 0.5*|0-.7| = 0.45.
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.45)


def test_ece_bins_are_half_open_and_one_goes_to_the_last_bin():
  probs = np.array([[1.0, 0.0], [2 / 15, 13 / 15]])
  bins = metrics.reliability_bins(probs, np.array([0, 0]))
  assert bins["count"][14] == 1 and bins["count"][13] == 1  # 13/15 opens bin 13 ([13/15, 14/15))
  assert metrics.expected_calibration_error(probs, np.array([0, 0])) == pytest.approx(0.5 * 13 / 15)


def test_perfectly_calibrated_bins_give_zero_ece():
  probs = np.array([[0.5, 0.5]] * 4)
  labels = np.array([0, 1, 0, 1])  # argmax picks 0: accuracy 0.5 at confidence 0.5
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.0)


def test_nll_and_brier_hand_computed():
  logits = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
  labels = np.array([1, 0])
  m = metrics.classification_metrics(logits, labels)
  assert m["nll"] == pytest.approx(-(np.log(0.75) + np.log(0.5)) / 2)
  assert m["brier"] == pytest.approx(((0.25**2 + 0.25**2) + (0.5**2 + 0.5**2)) / 2)
  assert m["accuracy"] == pytest.approx(1.0)  # a tie goes to the first class, here the label


def test_softmax_is_stable_for_large_logits():
  p = metrics.softmax(np.array([[1000.0, 0.0], [-1000.0, -1000.0]]))
  np.testing.assert_allclose(p, [[1.0, 0.0], [0.5, 0.5]])


def test_ece_matches_a_loop_implementation():
  rng = np.random.default_rng(0)
  probs = metrics.softmax(rng.normal(0, 3, size=(500, 7)))
  labels = rng.integers(0, 7, 500)
  conf, pred = probs.max(1), probs.argmax(1)
  ece = 0.0
  for b in range(15):
    lo, hi = b / 15, (b + 1) / 15
    in_bin = (conf >= lo) & ((conf < hi) if b < 14 else (conf <= hi))
    if in_bin.any():
      ece += in_bin.mean() * abs((pred[in_bin] == labels[in_bin]).mean() - conf[in_bin].mean())
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(ece)
