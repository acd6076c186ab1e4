"""Classification and calibration metrics over predicted probabilities (Guo et al. 2017; Kull et al. 2019;
Minderer et al. 2021). The single implementation of each metric: the streaming analyser in
evaluators/calibration.py accumulates the same per-bin sums and finishes them with the same functions.

Binned calibration errors are computed from per-bin sufficient statistics (count n_b, sum of confidences,
number correct), empty bins weighing nothing:

  CE_L1 = sum_b (n_b / N) |acc_b - conf_b|,  CE_L2 = sqrt(sum_b (n_b / N) (acc_b - conf_b)^2),
  acc_b = correct_b / n_b, conf_b = confidence_sum_b / n_b.

- `ece` (Guo et al.): top-label (confidence = max_k p_k, correct = [argmax_k p_k == y], first index on ties),
  15 equal-width bins [b/15, (b+1)/15), bin(c) = min(floor(15 c), 14) so that c = 1.0 is in the last bin; L1.
- `rms_ce`: the same bins and statistics with the L2 norm.
- `ece_equal_mass` (Minderer et al.): top-label, 100 equal-mass bins, L1. With c_(0) <= ... <= c_(N-1) the
  sorted confidences, the upper edge of bin i (i = 0..98) is c_(r_i), r_i = min(round((i + 1) N / 100), N - 1),
  round half to even, computed exactly in integers; the last bin is closed at 1.0. Bins are [lo, hi): a
  confidence equal to an edge goes to the bin above, so equal confidences are never split; with ties or
  N < 100 some bins are empty and weigh nothing.
- `classwise_ece` (Kull et al.): for every class k all N examples are binned by p_k into the 15 equal-width
  bins; correct means y == k; classwise_ece = (1/K) sum_k CE_L1(class k).
"""

import numpy as np

NUM_ECE_BINS = 15
NUM_EQUAL_MASS_BINS = 100


def softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
  z = logits - logits.max(axis=-1, keepdims=True)
  log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
  return float(-log_probs[np.arange(len(labels)), labels].mean())


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
  """Sum over classes of the squared error against the one-hot label, mean over examples."""
  onehot = np.zeros_like(probs)
  onehot[np.arange(len(labels)), labels] = 1.0
  return float(((probs - onehot) ** 2).sum(axis=-1).mean())


def equal_width_bin_index(confidence: np.ndarray, num_bins: int = NUM_ECE_BINS) -> np.ndarray:
  # floor(c * B) puts c in [lo, hi); clipping sends exactly 1.0 to the last bin.
  return np.minimum((np.asarray(confidence, np.float64) * num_bins).astype(np.int64), num_bins - 1)


def equal_mass_edge_ranks(n: int, num_bins: int = NUM_EQUAL_MASS_BINS) -> np.ndarray:
  """Ranks r_i = min(round((i + 1) n / B), n - 1), i = 0..B-2, of the sorted confidences that are the upper
  edges; round half to even, in exact integer arithmetic."""
  i = np.arange(1, num_bins, dtype=np.int64)
  floor, rem = np.divmod(i * n, num_bins)
  up = (2 * rem > num_bins) | ((2 * rem == num_bins) & (floor % 2 == 1))
  return np.minimum(floor + up, max(n - 1, 0))


def equal_mass_bin_index(confidence: np.ndarray, num_bins: int = NUM_EQUAL_MASS_BINS) -> np.ndarray:
  confidence = np.asarray(confidence, np.float64)
  if confidence.size == 0:
    return np.zeros(0, np.int64)
  upper = np.sort(confidence)[equal_mass_edge_ranks(confidence.size, num_bins)]
  # side="right": c equal to an edge counts that edge, i.e. goes to the bin above ([lo, hi)).
  return np.minimum(np.searchsorted(upper, confidence, side="right"), num_bins - 1)


def bin_sums(index: np.ndarray, confidence: np.ndarray, correct: np.ndarray, num_bins: int) -> tuple:
  """Per bin: count, sum of confidences, number correct."""
  return (np.bincount(index, minlength=num_bins).astype(np.float64),
          np.bincount(index, weights=np.asarray(confidence, np.float64), minlength=num_bins),
          np.bincount(index, weights=np.asarray(correct, np.float64), minlength=num_bins))


def calibration_error(count, confidence_sum, correct_sum, norm: str = "l1") -> np.ndarray:
  """CE over the last axis (the bins) from per-bin sums; leading axes (e.g. classes) are kept."""
  count, confidence_sum, correct_sum = (np.asarray(a, np.float64) for a in (count, confidence_sum, correct_sum))
  total = count.sum(axis=-1)
  filled = count > 0
  safe = np.where(filled, count, 1.0)
  gap = np.where(filled, np.abs(correct_sum - confidence_sum) / safe, 0.0)
  weight = count / np.where(total > 0, total, 1.0)[..., None]
  if norm == "l1":
    return (weight * gap).sum(axis=-1)
  if norm == "l2":
    return np.sqrt((weight * gap ** 2).sum(axis=-1))
  raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")


def reliability_from_sums(count, confidence_sum, correct_sum, edges) -> dict:
  """The reliability-diagram record: edges, count, mean confidence and accuracy per bin (NaN when empty)."""
  count = np.asarray(count, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return {"edges": list(map(float, edges)), "count": count.astype(np.int64).tolist(),
            "confidence": np.where(count > 0, np.asarray(confidence_sum) / count, np.nan).tolist(),
            "accuracy": np.where(count > 0, np.asarray(correct_sum) / count, np.nan).tolist()}


def _top_label(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return probs.max(axis=-1), (probs.argmax(axis=-1) == labels).astype(np.float64)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_ECE_BINS) -> dict:
  """Per equal-width bin of top-label confidence: count, mean confidence, accuracy (NaN when empty)."""
  confidence, correct = _top_label(probs, labels)
  sums = bin_sums(equal_width_bin_index(confidence, num_bins), confidence, correct, num_bins)
  return reliability_from_sums(*sums, np.linspace(0, 1, num_bins + 1))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_ECE_BINS) -> float:
  confidence, correct = _top_label(probs, labels)
  return float(calibration_error(*bin_sums(equal_width_bin_index(confidence, num_bins), confidence, correct,
                                           num_bins)))


def equal_mass_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                                 num_bins: int = NUM_EQUAL_MASS_BINS) -> float:
  """ECE with equal-mass bins from top-label confidences and correctness (both length N)."""
  return float(calibration_error(*bin_sums(equal_mass_bin_index(confidence, num_bins), confidence, correct,
                                           num_bins)))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
  logits = np.asarray(logits, dtype=np.float64)
  labels = np.asarray(labels, dtype=np.int64)
  probs = softmax(logits)
  return {"num_examples": int(len(labels)), "accuracy": float((probs.argmax(-1) == labels).mean()),
          "nll": negative_log_likelihood(logits, labels), "brier": brier_score(probs, labels),
          "ece": expected_calibration_error(probs, labels), "reliability": reliability_bins(probs, labels)}
