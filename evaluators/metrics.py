"""Classification and calibration metrics over predicted logits (Guo et al. 2017 definitions).

ECE here is top-label, 15 equal-width bins [lo, hi) with a confidence of exactly 1.0 in the last bin, L1,
empty bins weighing nothing: ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|.
"""

import numpy as np

NUM_ECE_BINS = 15


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


def reliability_bins(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_ECE_BINS) -> dict:
  """Per equal-width bin of top-label confidence: count, mean confidence, accuracy (NaN when empty)."""
  confidence = probs.max(axis=-1)
  correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
  # floor(c * B) puts c in [lo, hi); clipping sends exactly 1.0 to the last bin.
  index = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)
  count = np.bincount(index, minlength=num_bins).astype(np.int64)
  conf_sum = np.bincount(index, weights=confidence, minlength=num_bins)
  correct_sum = np.bincount(index, weights=correct, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    return {"edges": np.linspace(0, 1, num_bins + 1).tolist(), "count": count.tolist(),
            "confidence": np.where(count > 0, conf_sum / count, np.nan).tolist(),
            "accuracy": np.where(count > 0, correct_sum / count, np.nan).tolist()}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_ECE_BINS) -> float:
  bins = reliability_bins(probs, labels, num_bins)
  count = np.asarray(bins["count"], dtype=np.float64)
  gap = np.abs(np.nan_to_num(np.asarray(bins["accuracy"])) - np.nan_to_num(np.asarray(bins["confidence"])))
  return float((count / count.sum() * gap).sum())


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
  logits = np.asarray(logits, dtype=np.float64)
  labels = np.asarray(labels, dtype=np.int64)
  probs = softmax(logits)
  return {"num_examples": int(len(labels)), "accuracy": float((probs.argmax(-1) == labels).mean()),
          "nll": negative_log_likelihood(logits, labels), "brier": brier_score(probs, labels),
          "ece": expected_calibration_error(probs, labels), "reliability": reliability_bins(probs, labels)}
