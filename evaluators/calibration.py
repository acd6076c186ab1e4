"""`patchflow calibrate`: calibration and uncertainty metrics of a predictions table, streamed by row group.

  patchflow calibrate --predictions PATH.parquet --output DIR    # DIR/calibration.json, *.png, calibration.html

Notation: N rows, K classes, p_i the probabilities of row i (softmax of `logits`, or `probs` as given),
y_i its label, yhat_i = argmax_k p_ik (first index on ties), c_i = max_k p_ik its confidence,
a_i = [yhat_i == y_i]. The binned metrics (`ece`, `rms_ce`, `ece_equal_mass`, `classwise_ece`) are defined
in evaluators/metrics.py, which also finishes them from the per-bin sums accumulated here.

  accuracy = (1/N) sum_i a_i
  nll      = (1/N) sum_i -log p_i,y_i   (from logits: logsumexp(z_i) - z_i,y_i; from probs: p clipped below at
                                          the smallest normal float32, so at most 87.3 per row)
  brier    = (1/N) sum_i sum_k (p_ik - [k == y_i])^2
  temperature T = argmin_T NLL(softmax(z / T)) over the fit rows (z = logits, or log probs), T in [0.01, 100].
    Fit rows: split == "val" when that split exists, else numpy default_rng(0).choice(N, round(N/5)) (at least
    1 and, when N > 1, at most N-1 rows); every other row is held out. NLL is convex in beta = 1/T; it is
    minimised by safeguarded Newton steps on dNLL/dbeta = mean_i(E_p[z_i] - z_i,y_i), first on a subsample of
    the fit rows, then on all of them until a step is below 1e-4 beta (the error after that step is about
    its square).
  ece_temperature_scaled = `ece` of softmax(z / T) over the held-out rows (null when none are held out).
  bootstrap: 95% percentile intervals of `ece` and `accuracy` over 1000 resamples of the N rows with
    replacement (seed 0). A resample is drawn cell by cell, which has the same distribution: the counts of
    the 30 (ECE bin, correct) cells are Multinomial(N, n_cell / N); the resampled confidences of a cell are
    drawn from its rows exactly when the cell gets at most 50 draws, and from their normal limit
    N(m mean, m variance) beyond (the confidences of a cell lie within one 1/15-wide bin). The accuracy
    interval is therefore an exact bootstrap; the ECE interval is exact for small cells.
  splits / shifts: every metric above except temperature and bootstrap, per value of the `split` / `shift`
    column (when the column exists).
  ood (when an `ood` column exists): OOD rows are the positives, the score is 1 - c_i; auroc (ties count 1/2),
    auprc (average precision, sum over distinct thresholds of recall step x precision) and fpr_at_95_tpr
    (smallest fraction of in-distribution rows scoring >= t over thresholds t that flag >= 95% of OOD rows).
  selective_prediction: rows by confidence, most confident first; accuracy@k = accuracy of the k most
    confident rows, rows tied in confidence entering together pro rata (so row order never matters);
    reported at 20 coverages k/N (k = max(1, round(j N / 20))), and area = (1/N) sum_{k=1..N} accuracy@k.
  calibration_auc: AUROC of the confidence c_i for telling correct (positive) from wrong predictions
    (Uncertainty Baselines' calibration AUC; null when all predictions are right or all wrong).

Memory: the single-pass metrics hold one chunk (about 32 MB of scores, read by evaluators/prediction_stream.py)
plus per-group sums (G x K x 15); O(N) scalars per row are kept for equal-mass ECE, bootstrap, OOD and
selective prediction. The file is decoded once: the shifted scores of the fit rows (for the Newton passes of
the temperature fit) and of the held-out rows (to apply the fitted temperature) are kept, in memory up to a
budget and beyond it in temporary files (evaluators/temperature_rows.py); held-out rows that cannot be kept
are decoded from the file again.
"""

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from evaluators import metrics, prediction_stream
from evaluators.prediction_stream import Source, open_predictions, row_error
from evaluators.temperature_rows import STORE_BUDGET_BYTES, TemperatureRows
from schemas import storage
from schemas.errors import ContractError

NUM_BINS = metrics.NUM_ECE_BINS
NUM_EQUAL_MASS_BINS = metrics.NUM_EQUAL_MASS_BINS
BOOTSTRAP_REPLICATES = 1000
BOOTSTRAP_EXACT_MAX_DRAWS = 50
FIT_FRACTION = 0.2
SEED = 0
TEMPERATURE_RANGE = (0.01, 100.0)
NEWTON_TOLERANCE = 1e-4
SELECTIVE_POINTS = 20
_TINY = float(np.finfo(np.float32).tiny)


# ---------------------------------------------------------------- one chunk

@dataclass
class ChunkStats:
  """Per-row quantities of one chunk; `e / norm` are the probabilities (e = exp(z - max z) for logits)."""
  e: np.ndarray            # float32 [n, K]
  norm: np.ndarray         # float64 [n]
  top: np.ndarray          # float32 [n]: max logit (or max prob)
  pred: np.ndarray         # int64 [n]
  confidence: np.ndarray   # float64 [n]
  correct: np.ndarray      # bool [n]
  nll: np.ndarray          # float64 [n]
  brier: np.ndarray        # float64 [n]
  gap_label: np.ndarray    # float64 [n]: max z - z_y (z = log probs for probs), for the temperature


def top_label(source: Source, x: np.ndarray, row0: int, scratch: np.ndarray, flags: np.ndarray):
  """(d, top, pred): d = shifted_log_scores(x) in `scratch`, the max score and the first index of the
  maximum per row, after checking the rows: NaN or Inf (and, for probs, values outside [0, 1] or rows not
  summing to 1) are errors naming the row. `scratch` (float32) and `flags` (bool) hold at least x's shape."""
  n = len(x)
  top, low = x.max(axis=1), x.min(axis=1)  # max and min propagate NaN
  bad = np.flatnonzero(~(np.isfinite(top) & np.isfinite(low)))
  if bad.size:
    raise row_error(source, row0 + int(bad[0]), f"{source.score!r} holds NaN or Inf")
  if source.score == "probs":
    _check_probs(source, x, low, top, row0)
    # numpy's argmax copies a read-only array (as Arrow's are) first: comparing with the maximum is cheaper.
    pred = np.equal(x, top[:, None], out=flags[:n]).argmax(axis=1)
    return shifted_log_scores(source, x, top, scratch), top, pred
  d = shifted_log_scores(source, x, top, scratch)
  # x_k - max x is exactly 0 for the maxima and below 0 for every other entry (no rounding to 0), so the
  # first maximum of d is the first maximum of x; d is writeable, so argmax does not copy it.
  return d, top, d.argmax(axis=1)


def chunk_stats(source: Source, x: np.ndarray, d: np.ndarray, labels: np.ndarray, top: np.ndarray,
                pred: np.ndarray) -> ChunkStats:
  """`d` = shifted_log_scores(x); for logits it is overwritten with e = exp(d)."""
  n = len(x)
  rows = np.arange(n)
  x_label = x[rows, labels].astype(np.float64)
  if source.score == "logits":
    e = np.exp(d, out=d)
    norm = e.sum(axis=1).astype(np.float64)
    confidence = 1.0 / norm
    gap_label = top - x_label
    nll = np.log(norm) + gap_label
  else:
    e, norm = x, np.ones(n)
    confidence = top.astype(np.float64)
    nll = -np.log(np.maximum(x_label, _TINY))
    gap_label = np.log(np.maximum(top.astype(np.float64), _TINY)) - np.log(np.maximum(x_label, _TINY))
  p_label = e[rows, labels] / norm
  # sum_k (p_k - [k = y])^2 = sum_k p_k^2 - 2 p_y + 1
  brier = np.einsum("ij,ij->i", e, e).astype(np.float64) / norm ** 2 - 2 * p_label + 1.0
  return ChunkStats(e, norm, top, pred, confidence, pred == labels, nll, brier, gap_label)


def _check_probs(source: Source, x: np.ndarray, low: np.ndarray, top: np.ndarray, row0: int) -> None:
  bad = np.flatnonzero((low < 0) | (top > 1 + 1e-6))
  if bad.size:
    raise row_error(source, row0 + int(bad[0]), "'probs' holds a value outside [0, 1]")
  total = x.sum(axis=1, dtype=np.float64)
  bad = np.flatnonzero(np.abs(total - 1) > 1e-3)
  if bad.size:
    raise row_error(source, row0 + int(bad[0]), f"'probs' sums to {total[bad[0]]:.6g}, not 1")


def shifted_log_scores(source: Source, x: np.ndarray, top: np.ndarray, out: np.ndarray) -> np.ndarray:
  """d = z - max z (<= 0), z = logits or log probs: the input of temperature scaling."""
  if source.score == "logits":
    return np.subtract(x, top[:, None], out=out[:len(x)])
  d = np.maximum(x, _TINY, out=out[:len(x)])
  np.log(d, out=d)
  d -= np.log(np.maximum(top, _TINY))[:, None]
  return d


# ---------------------------------------------------------------- accumulation over groups

class Accumulator:
  """Per-group sums of the single-pass metrics. Group 0 is every row; the others come from per-row codes
  (one code array per kind; -1 = not in any group of that kind). Class-wise bins are kept for the groups
  below `classwise_groups` (the held-out group reports no class-wise ECE)."""

  def __init__(self, num_groups: int, num_classes: int, classwise_groups: int | None = None):
    g, k, b = num_groups, num_classes, NUM_BINS
    self.k = k
    self.cg = g if classwise_groups is None else classwise_groups
    self.count = np.zeros(g)
    self.correct = np.zeros(g)
    self.nll = np.zeros(g)
    self.brier = np.zeros(g)
    self.bins = np.zeros((3, g, b))                    # count, confidence sum, correct sum
    self.class_prob_sum = np.zeros((self.cg, k))        # sum_i p_ik
    self.class_label_count = np.zeros((self.cg, k))     # #{i: y_i = k}
    self.class_high = np.zeros((3, self.cg, k, b))      # the class-wise bins >= 1 (bin 0 = totals - these)

  def add(self, stats: ChunkStats, labels: np.ndarray, kinds: list[np.ndarray], flags: np.ndarray) -> None:
    """`flags`: a bool buffer of at least the scores' shape."""
    g, cg, k, b = len(self.count), self.cg, self.k, NUM_BINS
    n = len(labels)
    index = metrics.equal_width_bin_index(stats.confidence, b)
    # Class-wise: p_ik >= 1/15 for at most 15 classes per row, so only those entries are binned one by
    # one; bin 0 of each class is what remains of its totals (column sums by one matrix product).
    e, norm = stats.e, stats.norm
    threshold = (norm / b * (1 - 1e-6)).astype(np.float32)[:, None]
    candidates = np.flatnonzero(np.greater_equal(e, threshold, out=flags[:n]))
    rows, classes = np.divmod(candidates, k)
    p = e.ravel()[candidates] / norm[rows]
    cbin = metrics.equal_width_bin_index(p, b)
    keep = cbin >= 1
    rows, classes, p, cbin = rows[keep], classes[keep], p[keep], cbin[keep]
    hit = (labels[rows] == classes).astype(np.float64)
    inverse = (1.0 / norm).astype(np.float32)
    weights = np.zeros((n, cg), np.float32) if cg > 1 else None
    for codes in kinds:
      member = codes >= 0
      c = codes[member]
      self.count += np.bincount(c, minlength=g)
      self.correct += np.bincount(c, weights=stats.correct[member], minlength=g)
      self.nll += np.bincount(c, weights=stats.nll[member], minlength=g)
      self.brier += np.bincount(c, weights=stats.brier[member], minlength=g)
      cell = c * b + index[member]
      for j, w in enumerate((None, stats.confidence[member], stats.correct[member])):
        self.bins[j] += np.bincount(cell, weights=w, minlength=g * b).reshape(g, b)
      member &= codes < cg
      if not member.any():
        continue
      c = codes[member]
      if weights is not None:
        weights[np.flatnonzero(member), c] = inverse[member]
      self.class_label_count += np.bincount(c * k + labels[member], minlength=cg * k).reshape(cg, k)
      hc = codes[rows]
      sel = (hc >= 0) & (hc < cg)
      cell = (hc[sel] * k + classes[sel]) * b + cbin[sel]
      for j, w in enumerate((None, p[sel], hit[sel])):
        self.class_high[j] += np.bincount(cell, weights=w, minlength=cg * k * b).reshape(cg, k, b)
    # einsum, not BLAS: OpenBLAS's threads fight the reader thread on 2 cores (10-100x slower here).
    if weights is None:  # group 0 (all rows) only
      self.class_prob_sum[0] += np.einsum("ij,i->j", e, inverse).astype(np.float64)
    else:
      self.class_prob_sum += np.einsum("ij,ig->gj", e, weights).astype(np.float64)

  def group_metrics(self, group: int) -> dict:
    n = self.count[group]
    if n == 0:
      return {"num_examples": 0}
    bins = self.bins[:, group]
    result = {"num_examples": int(n), "accuracy": self.correct[group] / n, "nll": self.nll[group] / n,
              "brier": self.brier[group] / n, "ece": float(metrics.calibration_error(*bins)),
              "rms_ce": float(metrics.calibration_error(*bins, norm="l2"))}
    if group < self.cg:
      high = self.class_high[:, group]
      first = np.stack([np.full(self.k, n), self.class_prob_sum[group], self.class_label_count[group]])
      classwise = np.concatenate([(first - high.sum(axis=-1))[..., None], high], axis=-1)  # [3, K, B]
      classwise[1, :, 0] = np.maximum(classwise[1, :, 0], 0.0)  # rounding of the column sums
      result["classwise_ece"] = float(metrics.calibration_error(*classwise).mean())
    result["reliability"] = metrics.reliability_from_sums(*bins, np.linspace(0, 1, NUM_BINS + 1))
    return result


# ---------------------------------------------------------------- temperature

def _nll_derivatives(chunks, gap_label: np.ndarray, beta: float) -> tuple[float, float, float]:
  """Mean over rows of NLL(beta), dNLL/dbeta and d2NLL/dbeta2 for shifted scores d (rows of `chunks`):
  NLL_i = log sum_k exp(beta d_ik) + beta gap_i, d/dbeta = E_p[d] + gap_i, d2/dbeta2 = Var_p[d]."""
  value = first = second = 0.0
  row = 0
  scratch = np.empty(0, np.float32)
  for d in chunks:
    if scratch.size < d.size:
      scratch = np.empty(d.size, np.float32)
    e = np.multiply(d, np.float32(beta), out=scratch[:d.size].reshape(d.shape))
    np.exp(e, out=e)
    s = e.sum(axis=1).astype(np.float64)
    np.multiply(e, d, out=e)
    mean_d = e.sum(axis=1).astype(np.float64) / s
    mean_d2 = np.einsum("ij,ij->i", e, d).astype(np.float64) / s
    gap = gap_label[row:row + len(d)]
    row += len(d)
    value += float((np.log(s) + beta * gap).sum())
    first += float((mean_d + gap).sum())
    second += float(np.maximum(mean_d2 - mean_d ** 2, 0.0).sum())
  return value / row, first / row, second / row


def fit_temperature(chunks_fn, gap_label: np.ndarray, start_beta: float = 1.0) -> float:
  """argmin over T in TEMPERATURE_RANGE of the NLL of softmax(z / T); `chunks_fn()` iterates the shifted
  scores d of the fit rows. Safeguarded Newton on dNLL/dbeta (non-decreasing in beta: the NLL is convex in
  beta), until a step is below NEWTON_TOLERANCE beta; quadratic convergence leaves an error of about its
  square."""
  lo, hi = 1.0 / TEMPERATURE_RANGE[1], 1.0 / TEMPERATURE_RANGE[0]
  beta = min(max(start_beta, lo), hi)
  for _ in range(100):
    _, grad, curvature = _nll_derivatives(chunks_fn(), gap_label, beta)
    if grad == 0:
      break
    if grad > 0:
      hi = beta
    else:
      lo = beta
    step = beta - grad / curvature if curvature > 0 else np.nan
    newton = lo < step < hi
    new = step if newton else (lo * hi) ** 0.5
    converged = (newton and abs(new - beta) <= NEWTON_TOLERANCE * beta) or hi - lo <= 1e-12 * hi
    beta = new
    if converged:
      break
  return 1.0 / beta


# ---------------------------------------------------------------- rank-based metrics

def _threshold_curve(scores: np.ndarray, positive: np.ndarray, order: np.ndarray | None = None):
  """Cumulative positives and negatives scoring >= each distinct score, highest score first. `order`: the
  rows by descending score, when the caller has it (the order within ties does not matter)."""
  order = np.argsort(-scores, kind="stable") if order is None else order
  s, pos = scores[order], positive[order].astype(np.float64)
  last = np.r_[s[1:] != s[:-1], True]  # the last row of each tie group
  tp = np.cumsum(pos)[last]
  fp = np.cumsum(1.0 - pos)[last]
  return tp, fp


def auroc(scores: np.ndarray, positive: np.ndarray, order: np.ndarray | None = None) -> float | None:
  """P(score of a positive > score of a negative) + P(equal) / 2; None without both classes."""
  tp, fp = _threshold_curve(np.asarray(scores, np.float64), np.asarray(positive, bool), order)
  if tp[-1] == 0 or fp[-1] == 0:
    return None
  tpr, fpr = np.r_[0.0, tp / tp[-1]], np.r_[0.0, fp / fp[-1]]
  return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))


def ood_metrics(confidence: np.ndarray, ood: np.ndarray) -> dict:
  """OOD detection by 1 - max probability, OOD rows positive."""
  score, ood = 1.0 - np.asarray(confidence, np.float64), np.asarray(ood, bool)
  result = {"score": "1 - max probability", "positive": "ood", "num_ood": int(ood.sum()),
            "num_in_distribution": int((~ood).sum())}
  if not ood.any() or ood.all():
    return {**result, "auroc": None, "auprc": None, "fpr_at_95_tpr": None}
  tp, fp = _threshold_curve(score, ood)
  recall, precision = tp / tp[-1], tp / (tp + fp)
  auprc = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
  fpr = fp / fp[-1]
  return {**result, "auroc": auroc(score, ood), "auprc": auprc, "fpr_at_95_tpr": float(fpr[recall >= 0.95].min())}


def selective_prediction(confidence: np.ndarray, correct: np.ndarray, order: np.ndarray | None = None) -> dict:
  """Accuracy of the k most confident rows for every k, ties entering pro rata; the area is its mean.
  `order`: the rows by descending confidence, when the caller has it."""
  n = len(confidence)
  order = np.argsort(-np.asarray(confidence, np.float64), kind="stable") if order is None else order
  c, a = np.asarray(confidence, np.float64)[order], np.asarray(correct, np.float64)[order]
  start = np.r_[True, c[1:] != c[:-1]]
  group = np.cumsum(start) - 1
  starts = np.flatnonzero(start)
  sizes = np.diff(np.r_[starts, n])
  group_correct = np.add.reduceat(a, starts)
  before = np.r_[0.0, np.cumsum(group_correct)[:-1]]
  k = np.arange(1, n + 1)
  cum_correct = before[group] + (k - starts[group]) * (group_correct / sizes)[group]
  accuracy_at = cum_correct / k
  points = np.unique(np.maximum(1, np.round(np.arange(1, SELECTIVE_POINTS + 1) * n / SELECTIVE_POINTS)).astype(int))
  return {"coverage": (points / n).tolist(), "accuracy": accuracy_at[points - 1].tolist(),
          "area_under_curve": float(accuracy_at.mean())}


# ---------------------------------------------------------------- bootstrap

def bootstrap_intervals(confidence: np.ndarray, correct: np.ndarray, replicates: int = BOOTSTRAP_REPLICATES,
                        seed: int = SEED) -> dict:
  """95% percentile intervals of ECE and accuracy over row resamples, drawn cell by cell (module doc)."""
  n = len(confidence)
  confidence = np.asarray(confidence, np.float64)
  cell = metrics.equal_width_bin_index(confidence, NUM_BINS) * 2 + np.asarray(correct, np.int64)
  cells = 2 * NUM_BINS
  size = np.bincount(cell, minlength=cells)
  mean = np.bincount(cell, weights=confidence, minlength=cells) / np.maximum(size, 1)
  var = np.maximum(np.bincount(cell, weights=confidence ** 2, minlength=cells) / np.maximum(size, 1) - mean ** 2, 0)
  rng = np.random.default_rng(seed)
  counts = rng.multinomial(n, size / n, size=replicates)                 # [R, cells]
  sums = counts * mean + rng.standard_normal(counts.shape) * np.sqrt(counts * var)
  order = np.argsort(cell, kind="stable")
  members = np.split(confidence[order], np.cumsum(size)[:-1])
  for g in np.flatnonzero(size):
    small = np.flatnonzero((counts[:, g] > 0) & (counts[:, g] <= BOOTSTRAP_EXACT_MAX_DRAWS))
    if small.size:  # replicates drawing 0 rows from the cell already have a sum of 0
      draws = counts[small, g]
      picked = members[g][rng.integers(0, size[g], draws.sum())]
      sums[small, g] = np.add.reduceat(picked, np.r_[0, np.cumsum(draws)[:-1]])
  correct_per_bin = counts[:, 1::2]
  conf_per_bin = sums[:, 0::2] + sums[:, 1::2]
  ece = np.abs(correct_per_bin - conf_per_bin).sum(axis=1) / n
  accuracy = correct_per_bin.sum(axis=1) / n
  interval = lambda v: [float(q) for q in np.quantile(v, [0.025, 0.975])]
  return {"replicates": replicates, "seed": seed, "ece": interval(ece), "accuracy": interval(accuracy)}


# ---------------------------------------------------------------- the analysis

def fit_rows(source: Source) -> tuple[np.ndarray, str]:
  """Boolean mask of the rows the temperature is fitted on, and how they were chosen."""
  n = source.num_rows
  if "split" in source.groups:
    codes, names = source.groups["split"]
    if "val" in names:
      return codes == names.index("val"), "split == 'val'"
  count = max(1, int(round(n * FIT_FRACTION)))
  count = min(count, n - 1) if n > 1 else 1
  mask = np.zeros(n, bool)
  mask[np.random.default_rng(SEED).choice(n, count, replace=False)] = True
  return mask, f"seeded {FIT_FRACTION:.0%} of rows (numpy default_rng({SEED}).choice)"


def analyse(path: str, store_budget_bytes: int = STORE_BUDGET_BYTES, log=lambda message: None) -> dict:
  """Every metric of calibration.json for a predictions file (one streaming pass, sometimes two; see the
  module doc)."""
  source = open_predictions(path)
  n, k = source.num_rows, source.num_classes
  clock = time.perf_counter()
  fit, fit_how = fit_rows(source)
  held = ~fit
  # Groups: 0 = all rows, then one per split value, one per shift value, and the held-out rows.
  names, kinds = ["all"], [np.zeros(n, np.int32)]
  for kind, (codes, values) in source.groups.items():
    kinds.append(codes + len(names))
    names += [f"{kind}:{v}" for v in values]
  held_group = len(names)
  names.append("held_out")
  kinds.append(np.where(fit, -1, held_group).astype(np.int32))
  acc = Accumulator(len(names), k, classwise_groups=held_group)
  confidence, correct = np.empty(n), np.empty(n, bool)
  top, gap_label = np.empty(n, np.float32), np.empty(n)
  # The shifted scores of the fit rows (for the Newton passes) and of the held-out rows (to apply the fitted
  # temperature), kept from this pass; held-out rows that cannot be kept are decoded again.
  kept = TemperatureRows(source, fit, store_budget_bytes)
  scratch = np.empty((source.rows_per_chunk, k), np.float32)
  flags = np.empty(scratch.shape, bool)
  try:
    for row0, batch in prediction_stream.chunks(source, ["label", source.score]):
      x = prediction_stream.score_matrix(source, batch.column(1), row0)
      labels = prediction_stream.label_vector(source, batch.column(0), row0)
      rows = slice(row0, row0 + len(x))
      d, chunk_top, pred = top_label(source, x, row0, scratch, flags)
      kept.append(d, row0)  # before chunk_stats, which turns d into exp(d) for logits
      stats = chunk_stats(source, x, d, labels, chunk_top, pred)
      acc.add(stats, labels, [codes[rows] for codes in kinds], flags)
      confidence[rows], correct[rows], top[rows], gap_label[rows] = (stats.confidence, stats.correct, stats.top,
                                                                   stats.gap_label)
    kept.finish()
    log(f"calibrate: pass 1 (decode, single-pass metrics, rows kept for the temperature): "
        f"{time.perf_counter() - clock:.1f} s for {n} rows x {k} classes")
    clock = time.perf_counter()
    result = {"num_examples": n, "num_classes": k, "score_column": source.score}
    overall = acc.group_metrics(0)
    result.update({key: overall[key] for key in ("accuracy", "nll", "brier", "ece")})
    result["ece_equal_mass"] = metrics.equal_mass_calibration_error(confidence, correct)
    result.update({key: overall[key] for key in ("rms_ce", "classwise_ece")})
    temperature = _fit(kept, gap_label[fit], source.rows_per_chunk)
    log(f"calibrate: temperature {temperature:.4g} fitted on {int(fit.sum())} rows "
        f"({kept.fit.spilled} spill): {time.perf_counter() - clock:.1f} s")
    clock = time.perf_counter()
    result["temperature"] = temperature
    scaled = _held_out_scaled(source, held, kept, top, gap_label, correct, temperature) if held.any() else None
    result["ece_temperature_scaled"] = scaled["after"]["ece"] if scaled else None
    held_metrics = acc.group_metrics(held_group)
    result["temperature_fit"] = {
        "fit_rows": fit_how, "num_fit": int(fit.sum()), "num_held_out": int(held.sum()),
        "range": list(TEMPERATURE_RANGE),
        "held_out_before": ({key: held_metrics[key] for key in ("ece", "nll", "reliability")}
                            if scaled else None),
        "held_out_after": scaled["after"] if scaled else None}
    how = f"kept ({kept.held.spilled} spill)" if kept.held_kept else "decoded again"
    log(f"calibrate: held-out rows at T ({how}): {time.perf_counter() - clock:.1f} s")
    clock = time.perf_counter()
    result["bootstrap"] = bootstrap_intervals(confidence, correct)
    result["reliability"] = overall["reliability"]
    for kind in source.groups:
      result[f"{kind}s"] = {}
      for g, name in enumerate(names):
        if name.startswith(kind + ":"):
          member = kinds[list(source.groups).index(kind) + 1] == g
          m = acc.group_metrics(g)
          m["ece_equal_mass"] = metrics.equal_mass_calibration_error(confidence[member], correct[member])
          result[f"{kind}s"][name.split(":", 1)[1]] = m
    if source.ood is not None:
      result["ood"] = ood_metrics(confidence, source.ood)
    order = np.argsort(-confidence, kind="stable")  # one sort for both
    result["selective_prediction"] = selective_prediction(confidence, correct, order)
    result["calibration_auc"] = auroc(confidence, correct, order)
    log(f"calibrate: equal-mass ECE, bootstrap, breakdowns, OOD, selective prediction: "
        f"{time.perf_counter() - clock:.1f} s")
    return result
  finally:
    kept.close()


def _fit(kept: TemperatureRows, gap_label: np.ndarray, rows_per_chunk: int) -> float:
  store = kept.fit
  # A start close to the optimum, from a subsample, keeps the passes over all fit rows to two or three.
  sample = store.head(max(1, (1 << 23) // store.k))
  start = fit_temperature(lambda: [sample], gap_label[:len(sample)]) if store.rows > len(sample) else 1.0
  return fit_temperature(lambda: store.chunks(rows_per_chunk), gap_label, 1.0 / start)


def _held_out_scaled(source: Source, held: np.ndarray, kept: TemperatureRows, top: np.ndarray,
                     gap_label: np.ndarray, correct: np.ndarray, temperature: float) -> dict:
  """Top-label confidence and NLL of softmax(z / T) on the held-out rows, from their kept shifted scores (or,
  when they were not kept, from a second read of the file)."""
  beta = np.float32(1.0 / temperature)
  scratch = np.empty(source.rows_per_chunk * source.num_classes, np.float32)
  conf_scaled, nll, done = np.empty(int(held.sum())), 0.0, 0
  for rows, d in _held_chunks(source, held, kept, top, scratch):
    if scratch.size < d.size:
      scratch = np.empty(d.size, np.float32)
    e = np.multiply(d, beta, out=scratch[:d.size].reshape(d.shape))
    np.exp(e, out=e)
    s = e.sum(axis=1).astype(np.float64)
    keep = held[rows]  # all of them, except in whole chunks of a second read
    s, rows = s[keep], rows[keep]
    conf_scaled[done:done + len(s)] = 1.0 / s
    nll += float((np.log(s) + float(beta) * gap_label[rows]).sum())
    done += len(s)
  held_correct = correct[held]
  sums = metrics.bin_sums(metrics.equal_width_bin_index(conf_scaled, NUM_BINS), conf_scaled, held_correct, NUM_BINS)
  return {"after": {"ece": float(metrics.calibration_error(*sums)), "nll": nll / done,
                    "reliability": metrics.reliability_from_sums(*sums, np.linspace(0, 1, NUM_BINS + 1))}}


def _held_chunks(source: Source, held: np.ndarray, kept: TemperatureRows, top: np.ndarray, scratch: np.ndarray):
  """(row numbers, shifted scores d of those rows): the kept held-out rows, or whole chunks of a second read
  of the file (every row is computed and the held-out ones kept: cheaper than copying them out)."""
  if kept.held_kept:
    yield from kept.held_chunks(source.rows_per_chunk)
    return
  for row0, batch in prediction_stream.chunks(source, [source.score]):
    x = prediction_stream.score_matrix(source, batch.column(0), row0)
    rows = np.arange(row0, row0 + len(x))
    if held[rows].any():
      yield rows, shifted_log_scores(source, x, top[rows], scratch.reshape(-1, source.num_classes))


# ---------------------------------------------------------------- artifacts

def json_safe(value):
  """NaN and Inf (an empty reliability bin) become null: strict JSON, readable by any parser."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def calibrate(predictions_path: str, output_dir: str, log=print) -> dict:
  """Writes calibration.json, the reliability/selective-prediction PNGs and calibration.html (a fragment the
  report embeds) under output_dir (a local path or a URI such as gs://...); returns calibration.json.

  Local outputs appear all together or not at all: they are written to a staging folder inside output_dir and
  renamed into place once every one is whole, so a full disk leaves an earlier run's outputs as they were."""
  from concurrent.futures import ThreadPoolExecutor

  from schemas.lineage import fingerprint_path, write_lineage
  remote = "://" in output_dir
  if not remote:
    check_output_dir(output_dir)  # before the analysis, which can take long
  # gs:// inputs are fingerprinted by their GCS checksums (no download); other URIs are named only.
  named_only = "://" in predictions_path and not storage.is_gcs(predictions_path)
  with ThreadPoolExecutor(max_workers=2) as background:
    # Both overlap the streaming pass, which leaves a core partly idle: the lineage hash of the input and
    # importing matplotlib (seconds each on large inputs / without cached bytecode).
    fingerprint = None if named_only or ("://" not in predictions_path and not os.path.exists(predictions_path)) \
        else background.submit(fingerprint_path, predictions_path)
    background.submit(__import__, "evaluators.plots")
    result = json_safe(analyse(predictions_path, log=log))
    clock = time.perf_counter()
    fingerprints = {"predictions": fingerprint.result()} if fingerprint else {}
    log(f"calibrate: waited {time.perf_counter() - clock:.1f} s for the input's sha256 (lineage)")
  created = not remote and not os.path.isdir(output_dir)
  if not remote:
    os.makedirs(output_dir, exist_ok=True)
  staging = tempfile.mkdtemp(prefix="patchflow-calibration-" if remote else ".calibrate-tmp-",
                             dir=None if remote else output_dir)
  try:
    clock = time.perf_counter()
    pngs = figures(result)
    for name, png in pngs.items():
      _write_file(os.path.join(staging, name), png)
    _write_file(os.path.join(staging, "calibration.json"),
                json.dumps(result, indent=1, sort_keys=True, allow_nan=False).encode("utf-8"))
    _write_file(os.path.join(staging, "calibration.html"), html_fragment(result, pngs).encode("utf-8"))
    log(f"calibrate: figures, HTML and JSON: {time.perf_counter() - clock:.1f} s")
    config = {"num_bins": NUM_BINS, "num_equal_mass_bins": NUM_EQUAL_MASS_BINS, "seed": SEED,
              "bootstrap_replicates": BOOTSTRAP_REPLICATES, "predictions": predictions_path}
    # A remote input other than gs:// is named, not fingerprinted (hashing it would download it again).
    write_lineage(staging, "calibrate", config, {} if named_only else {"predictions": predictions_path},
                  fingerprints)
    if storage.is_gcs(output_dir):
      for name in sorted(os.listdir(staging)):
        storage.upload_file(os.path.join(staging, name), storage.join(output_dir, name))
    elif remote:
      from pyarrow import fs
      filesystem, inner = fs.FileSystem.from_uri(output_dir)
      filesystem.create_dir(inner, recursive=True)
      fs.copy_files(staging, inner, destination_filesystem=filesystem)
    else:
      for name in sorted(os.listdir(staging)):  # renames need no space: every output is whole by now
        os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    if created and not os.listdir(output_dir):
      os.rmdir(output_dir)
    raise
  shutil.rmtree(staging, ignore_errors=True)
  log(f"calibrate: accuracy {result['accuracy']:.4f} ece {result['ece']:.4f} "
      f"ece_equal_mass {result['ece_equal_mass']:.4f} temperature {result['temperature']:.3f} "
      f"({result['num_examples']} rows, {result['num_classes']} classes)")
  return result


def figures(result: dict) -> dict[str, bytes]:
  """PNG name -> bytes: reliability of all rows, held-out reliability before/after temperature scaling,
  selective prediction."""
  from evaluators import plots
  out = {"reliability.png": plots.reliability_diagram(result["reliability"], f"all rows (ECE {result['ece']:.3f})")}
  fit = result["temperature_fit"]
  if fit["held_out_after"]:
    out["reliability_temperature_scaled.png"] = plots.reliability_pair(
        fit["held_out_before"]["reliability"], fit["held_out_after"]["reliability"],
        f"held-out, T = 1 (ECE {fit['held_out_before']['ece']:.3f})",
        f"held-out, T = {result['temperature']:.3g} (ECE {fit['held_out_after']['ece']:.3f})")
  out["selective_prediction.png"] = plots.selective_prediction(result["selective_prediction"])
  return out


def _number(value, digits: int = 4) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def html_fragment(result: dict, pngs: dict[str, bytes]) -> str:
  """A self-contained HTML fragment (figures inline) that report.html embeds under its Calibration heading."""
  from evaluators.report import _img, _table
  boot = result["bootstrap"]
  fit = result["temperature_fit"]
  interval = lambda key: f"[{_number(boot[key][0])}, {_number(boot[key][1])}]"
  parts = [f"<p>{result['num_examples']} rows, {result['num_classes']} classes, scores from "
           f"<code>{result['score_column']}</code>. Definitions: docs/calibration.md in the patchflow repository.</p>"]
  parts.append(_table(["metric", "value", "bootstrap 95%"], [
      ["accuracy", _number(result["accuracy"]), interval("accuracy")],
      ["NLL", _number(result["nll"]), ""], ["Brier", _number(result["brier"]), ""],
      ["ECE (15 equal-width bins)", _number(result["ece"]), interval("ece")],
      ["ECE (100 equal-mass bins)", _number(result["ece_equal_mass"]), ""],
      ["RMS calibration error", _number(result["rms_ce"]), ""],
      ["classwise ECE", _number(result["classwise_ece"]), ""],
      ["temperature", _number(result["temperature"], 3), f"fit on {fit['fit_rows']} ({fit['num_fit']} rows)"],
      ["ECE after temperature scaling (held-out)", _number(result["ece_temperature_scaled"]),
       f"{fit['num_held_out']} held-out rows, before: "
       f"{_number((fit['held_out_before'] or {}).get('ece'))}"],
      ["calibration AUC", _number(result["calibration_auc"]), ""],
      ["selective prediction area", _number(result["selective_prediction"]["area_under_curve"]), ""]]))
  for kind in ("splits", "shifts"):
    if kind in result:
      parts.append(f"<h3>Per {kind[:-1]}</h3>")
      parts.append(_table([kind[:-1], "rows", "accuracy", "NLL", "Brier", "ECE", "ECE equal-mass", "RMS CE",
                           "classwise ECE"], [
          [name, m["num_examples"], *(_number(m.get(key)) for key in (
              "accuracy", "nll", "brier", "ece", "ece_equal_mass", "rms_ce", "classwise_ece"))]
          for name, m in result[kind].items()]))
  if "ood" in result:
    ood = result["ood"]
    parts.append("<h3>Out-of-distribution detection (score 1 - max probability)</h3>")
    parts.append(_table(["OOD rows", "in-distribution rows", "AUROC", "AUPRC", "FPR at 95% TPR"], [[
        ood["num_ood"], ood["num_in_distribution"], _number(ood["auroc"]), _number(ood["auprc"]),
        _number(ood["fpr_at_95_tpr"])]]))
  for name, png in pngs.items():
    parts.append(_img(png, name.removesuffix(".png").replace("_", " ")))
  return "\n".join(parts)


def _write_file(path: str, data: bytes) -> None:
  """A new file holding `data`, written with os.write (a full disk raises here, not later on close)."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
  finally:
    os.close(fd)


def check_output_dir(path: str) -> None:
  """A local output directory can be made at `path`: neither it nor a folder above it is a file."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ContractError(f"--output {path!r}: {probe} is a file, not a directory")
