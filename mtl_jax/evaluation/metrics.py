"""NumPy classification metrics over per-task class masks: the one implementation of each.

Host-side, on gathered predictions. Scores may be logits or probabilities; where a `class_mask`
is given, classes outside the example's task are never predicted.

Conventions:
- Ties in a ranking count one half (average ranks, Mann-Whitney U) for AUROC; top-k breaks ties
  towards the lower class index, like `argmax`.
- A metric that is undefined on its input (AUROC without positives or without negatives, AP
  without positives, any metric on zero examples) returns NaN rather than raising, so that one
  tiny task does not stop an evaluation; callers average with `np.nanmean` (the report turns NaN
  into None/null).
- Unseen-class detection: examples of classes never seen in training are the *positives*, scored
  by `1 - max softmax probability` (the less confident, the more likely unseen). Its AUROC equals
  that of "seen positive, scored by max softmax" (AUROC is symmetric); its AUPR does not, and is
  the AUPR of the unseen class.
- Calibration: equal-width bins (i/M, (i+1)/M] of max-softmax confidence, a confidence of exactly
  0 in the first bin (Guo et al. 2017). `calibration_sums` is the only binning; ECE, the
  reliability diagram (`calibration_bins`, `calibration_from_sums`) and the per-task ECE of
  `report.evaluate_outputs` all read it. (The train loop's device-side sums, in JAX, bin the same
  way; `calibration_from_sums` turns them into the same dict.)

Grouped forms (`grouped_binary_auroc`, `grouped_average_precision`, `calibration_sums` with
`groups`) compute one value per group (task, or task x class) with one sort of all examples, so
an evaluation of thousands of tasks needs no Python loop over tasks; the single-group functions
are these with one group.
"""
from typing import Optional

import numpy as np

DEFAULT_NUM_BINS = 15


def _masked_scores(scores: np.ndarray, class_mask: Optional[np.ndarray]) -> np.ndarray:
  scores = np.asarray(scores, np.float64)
  if class_mask is None:
    return scores
  return np.where(np.asarray(class_mask, bool), scores, -np.inf)


# --- Accuracy ------------------------------------------------------------------------------------

def label_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """[N] int: the label's position in each row's ranking, 0 = predicted.

  Classes scoring strictly above the label, plus tied classes of a lower index: ties go to the
  lower index, as `argmax` and a stable sort do. Masked (-inf) classes never rank above a real
  label. A label is in the top k iff its rank < k.
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels)
  label_score = np.take_along_axis(scores, labels[:, None], axis=-1)
  lower_index = np.arange(scores.shape[-1])[None, :] < labels[:, None]
  above = (scores > label_score) | ((scores == label_score) & lower_index)
  return np.sum(above, axis=-1)


def topk_accuracy(
    scores: np.ndarray, labels: np.ndarray, k: int, class_mask: Optional[np.ndarray] = None
) -> float:
  """Fraction of examples whose label is among the k highest scores of their task's classes.

  Args:
    scores: [N, C] logits or probabilities.
    labels: [N] int.
    k: how many top classes count as a hit.
    class_mask: optional [N, C] bool, the classes of each example's task.

  Returns:
    The top-k accuracy, NaN for N = 0.
  """
  scores = _masked_scores(scores, class_mask)
  labels = np.asarray(labels)
  if labels.shape[0] == 0:
    return float("nan")
  return float(np.mean(label_rank(scores, labels) < k))


def accuracy(
    scores: np.ndarray, labels: np.ndarray, class_mask: Optional[np.ndarray] = None
) -> float:
  """Fraction of examples whose highest-scoring task class is the label; NaN for N = 0."""
  scores = _masked_scores(scores, class_mask)
  labels = np.asarray(labels)
  if labels.shape[0] == 0:
    return float("nan")
  return float(np.mean(np.argmax(scores, axis=-1) == labels))


# --- Ranking metrics -----------------------------------------------------------------------------

def _sort_by_group_and_score(scores, groups, num_groups, descending: bool) -> np.ndarray:
  """The order sorting by group, then score (ties in any order).

  Two plain argsorts (the scores' dense ranks, then one int64 key of group and rank) are several
  times faster than `np.lexsort` on millions of values.
  """
  by_score = np.argsort(scores)
  sorted_scores = scores[by_score]
  dense = np.empty(scores.size, np.int64)
  dense[by_score] = np.cumsum(np.r_[False, sorted_scores[1:] != sorted_scores[:-1]])
  levels = int(dense.max(initial=0)) + 1
  if num_groups * levels >= 2**62:  # The key would overflow: the slower exact sort.
    return np.lexsort((-scores if descending else scores, groups))
  if descending:
    dense = levels - 1 - dense
  return np.argsort(groups * levels + dense)


def _group_layout(scores, is_positive, groups, num_groups, descending: bool):
  """Sorts by (group, score); returns the sorted arrays, each position's index within its group,
  the tie-run id of each position (a run = equal group and score) and the runs' first positions.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  is_positive = np.asarray(is_positive, bool).reshape(-1)
  groups = np.asarray(groups, np.int64).reshape(-1)
  if not scores.shape == is_positive.shape == groups.shape:
    raise ValueError(f"scores, is_positive and groups have {scores.size}, {is_positive.size} and "
                     f"{groups.size} values; pass one of each per example.")
  if groups.size and (groups.min() < 0 or groups.max() >= num_groups):
    raise ValueError(f"groups must lie in [0, {num_groups}); got {groups.min()}..{groups.max()}.")
  order = _sort_by_group_and_score(scores, groups, num_groups, descending)
  s, p, g = scores[order], is_positive[order], groups[order]
  counts = np.bincount(g, minlength=num_groups)
  group_start = np.cumsum(counts) - counts
  position = np.arange(g.size) - group_start[g]
  new_run = np.ones(g.size, bool)
  new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
  run_id = np.cumsum(new_run) - 1
  run_start = np.flatnonzero(new_run)
  return s, p, g, counts, position, run_id, run_start


def grouped_binary_auroc(scores, is_positive, groups, num_groups: int) -> np.ndarray:
  """`binary_auroc` of every group at once: [num_groups] float, NaN where undefined.

  One sort by (group, score), average ranks within each group's tie runs, and the Mann-Whitney U
  statistic per group: O(N log N) for all groups together.

  Args:
    scores: [N] float, higher means more likely positive.
    is_positive: [N] bool.
    groups: [N] int in [0, num_groups).
    num_groups: G.
  """
  _, p, g, counts, position, run_id, run_start = _group_layout(
      scores, is_positive, groups, num_groups, descending=False)
  run_length = np.diff(np.r_[run_start, g.size])
  # 1-based ranks within the group, a tie run sharing the mean of its ranks.
  run_rank = position[run_start] + (run_length + 1) / 2.0
  rank = run_rank[run_id]
  num_pos = np.bincount(g, weights=p, minlength=num_groups)
  num_neg = counts - num_pos
  positive_rank_sum = np.bincount(g, weights=rank * p, minlength=num_groups)
  defined = (num_pos > 0) & (num_neg > 0)
  with np.errstate(invalid="ignore", divide="ignore"):
    auroc = (positive_rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)
  return np.where(defined, auroc, np.nan)


def grouped_average_precision(scores, is_positive, groups, num_groups: int) -> np.ndarray:
  """`average_precision` of every group at once: [num_groups] float, NaN without positives."""
  _, p, g, _, position, run_id, run_start = _group_layout(
      scores, is_positive, groups, num_groups, descending=True)
  if g.size == 0:
    return np.full(num_groups, np.nan)
  run_end = np.r_[run_start[1:], g.size] - 1  # Inclusive: the threshold is the run's score.
  true_positives = np.cumsum(p)
  # Positives of the earlier groups, subtracted to count within each group.
  first = position == 0
  group_offset = np.zeros(num_groups)
  group_offset[g[first]] = true_positives[first] - p[first]
  run_group = g[run_start]
  tp_at_run_end = true_positives[run_end] - group_offset[run_group]
  precision = tp_at_run_end / (position[run_end] + 1)
  positives_in_run = np.bincount(run_id, weights=p, minlength=run_start.size)
  num_pos = np.bincount(g, weights=p, minlength=num_groups)
  # AP = sum over thresholds of (recall step) x precision; the recall step of a tie run is its
  # positives / the group's positives.
  weighted = np.bincount(run_group, weights=positives_in_run * precision, minlength=num_groups)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(num_pos > 0, weighted / num_pos, np.nan)


def binary_auroc(scores: np.ndarray, is_positive: np.ndarray) -> float:
  """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2.

  Computed from the Mann-Whitney U statistic with average ranks, O(N log N).

  Args:
    scores: [N] float, higher means more likely positive.
    is_positive: [N] bool.

  Returns:
    AUROC in [0, 1]; NaN without positives or without negatives.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  return float(grouped_binary_auroc(scores, is_positive, np.zeros(scores.size, np.int64), 1)[0])


def average_precision(scores: np.ndarray, is_positive: np.ndarray) -> float:
  """Area under the precision-recall curve, step-wise as sklearn's `average_precision_score`.

  AP = sum_n (R_n - R_{n-1}) * P_n over the distinct score thresholds in decreasing order, where
  an example is predicted positive when its score is >= the threshold (tied scores enter
  together).

  Args:
    scores: [N] float, higher means more likely positive.
    is_positive: [N] bool.

  Returns:
    AP in [0, 1]; NaN without positives.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  return float(grouped_average_precision(scores, is_positive, np.zeros(scores.size, np.int64),
                                         1)[0])


def per_task_class_auroc(
    probs: np.ndarray, labels: np.ndarray, task_ids: np.ndarray, num_classes: np.ndarray
) -> np.ndarray:
  """One-vs-rest AUROC of every (task, class): [T, C] float, NaN where undefined.

  Class c of task t is scored over the examples of task t, by `probs[:, c]`, positives those
  labelled c; classes c >= num_classes[t] (and any class without a positive or a negative) are
  NaN. One grouped sort over the (example, class) pairs of classes that have a positive.

  Args:
    probs: [N, C] scores over the padded class axis.
    labels: [N] int, each < num_classes[task_ids] (callers drop other examples first).
    task_ids: [N] int in [0, T).
    num_classes: [T] class count of each task.
  """
  probs = np.asarray(probs)
  labels = np.asarray(labels, np.int64)
  task_ids = np.asarray(task_ids, np.int64)
  num_tasks, width = len(num_classes), probs.shape[-1]
  out = np.full((num_tasks, width), np.nan)
  if labels.size == 0:
    return out
  positives = np.bincount(task_ids * width + labels, minlength=num_tasks * width)
  task_count = np.bincount(task_ids, minlength=num_tasks)
  # Pairs worth ranking: the task's classes with a positive and a negative.
  scored = (positives > 0) & (positives < np.repeat(task_count, width))
  scored &= (np.arange(width)[None, :] < np.asarray(num_classes)[:, None]).reshape(-1)
  pair_group = task_ids[:, None] * width + np.arange(width)[None, :]  # [N, C]
  keep = scored[pair_group]
  if not keep.any():
    return out
  groups = pair_group[keep]
  is_positive = (labels[:, None] == np.arange(width)[None, :])[keep]
  auroc = grouped_binary_auroc(probs[keep], is_positive, groups, num_tasks * width)
  return np.where(scored, auroc, np.nan).reshape(num_tasks, width)


def macro_auroc(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
  """Mean one-vs-rest AUROC over the classes 0..num_classes-1 that can be scored.

  A class is skipped if it has no positive or no negative example. Call it on one task's
  examples (a class column means different things in different tasks); `per_task_macro_auroc`
  does that for a mixed evaluation set.

  Args:
    probs: [N, C] scores, C >= num_classes; columns from num_classes on are ignored.
    labels: [N] int.
    num_classes: the task's class count.

  Returns:
    Macro AUROC; NaN if no class can be scored.
  """
  labels = np.asarray(labels)
  result = per_task_macro_auroc(probs, labels, np.zeros(labels.size, np.int64),
                                np.array([num_classes]))
  return result.get(0, float("nan"))


def per_task_macro_auroc(
    probs: np.ndarray, labels: np.ndarray, task_ids: np.ndarray, num_classes: np.ndarray
) -> dict[int, float]:
  """`macro_auroc` of every task present in `task_ids`.

  Args:
    probs: [N, C] scores over the padded class axis.
    labels: [N] int; examples labelled >= their task's num_classes are left out (unseen).
    task_ids: [N] int.
    num_classes: [T] class count of each task.

  Returns:
    {task id: macro AUROC (NaN where undefined)}.
  """
  probs = np.asarray(probs)
  labels = np.asarray(labels, np.int64)
  task_ids = np.asarray(task_ids, np.int64)
  num_classes = np.asarray(num_classes)
  keep = labels < num_classes[task_ids]
  means = task_macro_auroc(probs[keep], labels[keep], task_ids[keep], num_classes)
  return {int(t): float(means[t]) for t in np.unique(task_ids)}


def task_macro_auroc(probs, labels, task_ids, num_classes) -> np.ndarray:
  """[T] macro AUROC of every task (NaN where no class can be scored), from
  `per_task_class_auroc` (same arguments: labels within their task's classes)."""
  values = per_task_class_auroc(probs, labels, task_ids, num_classes)
  defined = ~np.isnan(values)
  count = defined.sum(axis=-1)
  total = np.where(defined, values, 0.0).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / count, np.nan)


# --- Calibration ---------------------------------------------------------------------------------

def calibration_sums(confidences, correct, num_bins: int = DEFAULT_NUM_BINS, groups=None,
                     num_groups: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per (group, bin): example count, confidence sum and correct sum, each [num_groups, M].

  The binning of every calibration number here: equal-width bins (i/M, (i+1)/M], a confidence
  of exactly 0 in the first.
  """
  confidences = np.asarray(confidences, np.float64).reshape(-1)
  correct = np.asarray(correct, np.float64).reshape(-1)
  groups = (np.zeros(confidences.size, np.int64) if groups is None
            else np.asarray(groups, np.int64).reshape(-1))
  inner_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
  # Number of inner edges strictly below the confidence = index of its right-closed bin.
  index = groups * num_bins + np.searchsorted(inner_edges, confidences, side="left")
  size = num_groups * num_bins
  shape = (num_groups, num_bins)
  return (np.bincount(index, minlength=size).reshape(shape),
          np.bincount(index, weights=confidences, minlength=size).reshape(shape),
          np.bincount(index, weights=correct, minlength=size).reshape(shape))


def ece_from_sums(counts, confidence_sums, correct_sums) -> np.ndarray:
  """ECE of each row of [..., M] bin sums: sum_b |correct_b - confidence_b| / N (NaN for N = 0).

  |sum(correct) - sum(confidence)| / N is n_b / N * |accuracy_b - confidence_b|, 0 for an empty
  bin.
  """
  total = np.asarray(counts, np.float64).sum(axis=-1)
  gap = np.abs(np.asarray(correct_sums, np.float64) - confidence_sums).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, gap / total, np.nan)


def expected_calibration_error(
    confidences: np.ndarray, correct: np.ndarray, num_bins: int = DEFAULT_NUM_BINS
) -> float:
  """Expected calibration error over equal-width confidence bins.

  ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|, with bins (i/M, (i+1)/M] (a
  confidence of exactly 0 goes to the first bin), as in Guo et al. 2017.

  Args:
    confidences: [N] predicted probability of the predicted class, in [0, 1].
    correct: [N] bool, whether the prediction was right.
    num_bins: M.

  Returns:
    ECE in [0, 1]; NaN for N = 0.
  """
  return float(ece_from_sums(*calibration_sums(confidences, correct, num_bins))[0])


def calibration_from_sums(counts, confidence_sums, correct_sums) -> dict:
  """The reliability-diagram dict from per-bin example counts and sums ([M] each).

  Returns:
    {"num_examples", "num_bins", "ece", "bins": [{"lower", "upper", "confidence", "accuracy",
    "count"}]}: the format of `reports/calibration.json` (without its "split"). `confidence`
    and `accuracy` are the bin's means, None for an empty bin; `ece` is None without examples.
  """
  counts, confidence_sums, correct_sums = (np.asarray(x, np.float64).reshape(-1) for x in (
      counts, confidence_sums, correct_sums))
  num_bins = len(counts)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = []
  for b in range(num_bins):
    n = int(counts[b])
    bins.append({
        "lower": float(edges[b]), "upper": float(edges[b + 1]),
        "confidence": float(confidence_sums[b] / n) if n else None,
        "accuracy": float(correct_sums[b] / n) if n else None,
        "count": n,
    })
  ece = float(ece_from_sums(counts, confidence_sums, correct_sums))
  return {"num_examples": int(counts.sum()), "num_bins": int(num_bins),
          "ece": None if np.isnan(ece) else ece, "bins": bins}


def calibration_bins(probs_max, correct, num_bins: int = DEFAULT_NUM_BINS) -> dict:
  """Reliability-diagram bins of max-softmax confidence against accuracy.

  Args:
    probs_max: [N] the probability of each example's predicted class, in [0, 1].
    correct: [N] bool, whether the prediction was right.
    num_bins: M equal-width bins over [0, 1].

  Returns:
    The `calibration_from_sums` dict; its `ece` is `expected_calibration_error` of the same
    inputs (None for N = 0).
  """
  confidences = np.asarray(probs_max, np.float64).reshape(-1)
  correct = np.asarray(correct, np.float64).reshape(-1)
  if confidences.shape != correct.shape:
    raise ValueError(f"calibration_bins: probs_max has {confidences.size} values but correct "
                     f"has {correct.size}; pass one of each per example.")
  if num_bins < 1:
    raise ValueError(f"calibration_bins: num_bins={num_bins}; use a positive bin count.")
  if confidences.size and (confidences.min() < 0 or confidences.max() > 1):
    raise ValueError("calibration_bins: probs_max holds values outside [0, 1]; pass "
                     "probabilities (softmax outputs), not logits.")
  counts, confidence_sums, correct_sums = calibration_sums(confidences, correct, num_bins)
  return calibration_from_sums(counts[0], confidence_sums[0], correct_sums[0])


# --- Unseen classes ------------------------------------------------------------------------------

def unseen_class_detection(
    max_prob_seen_examples: np.ndarray, max_prob_unseen_examples: np.ndarray
) -> dict[str, float]:
  """How well max-softmax confidence separates examples of unseen classes from seen ones.

  Unseen-class examples are the positives, scored by `1 - max softmax probability` (over the
  task's classes), so a model that is less confident on unseen classes scores higher.

  Args:
    max_prob_seen_examples: [N_seen] max softmax probability on examples of training classes.
    max_prob_unseen_examples: [N_unseen] the same on examples of classes never seen in training.

  Returns:
    {"auroc": ..., "aupr": ...}; AUPR is `average_precision` with unseen as positive.
  """
  seen = np.asarray(max_prob_seen_examples, np.float64).reshape(-1)
  unseen = np.asarray(max_prob_unseen_examples, np.float64).reshape(-1)
  scores = 1.0 - np.concatenate([seen, unseen])
  is_unseen = np.concatenate([np.zeros(seen.size, bool), np.ones(unseen.size, bool)])
  return {
      "auroc": binary_auroc(scores, is_unseen),
      "aupr": average_precision(scores, is_unseen),
  }


def grouped_unseen_class_detection(max_prob, is_unseen, groups, num_groups: int
                                   ) -> tuple[np.ndarray, np.ndarray]:
  """`unseen_class_detection` of every group at once: ([G] AUROC, [G] AUPR), NaN where
  undefined (AUROC without seen or without unseen examples, AUPR without unseen ones)."""
  scores = 1.0 - np.asarray(max_prob, np.float64)
  return (grouped_binary_auroc(scores, is_unseen, groups, num_groups),
          grouped_average_precision(scores, is_unseen, groups, num_groups))


# Scores of how *known* an example looks (higher = more likely a trained class), each turned into
# an unseen-class detector by ranking unseen examples (the positives) by its negation.
UNSEEN_SCORES = ("msp", "max_logit", "energy", "mahalanobis")


def logit_known_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
  """The logit-based known-class scores of each row, over its finite (task) columns.

  - msp: the max softmax probability (Hendrycks & Gimpel 2017).
  - max_logit: the largest logit (Hendrycks et al. 2022).
  - energy: logsumexp of the logits, i.e. minus the free energy (Liu et al. 2020).

  Args:
    logits: [N, C] float, -inf in columns outside the example's trained classes.

  Returns:
    {"msp", "max_logit", "energy"}: [N] float64 each.
  """
  x = np.asarray(logits, np.float64)
  top = x.max(axis=1)
  energy = top + np.log(np.sum(np.exp(x - top[:, None]), axis=1))
  return {"msp": np.exp(top - energy), "max_logit": top, "energy": energy}


def grouped_unseen_detection(known_score, is_unseen, groups, num_groups: int
                             ) -> tuple[np.ndarray, np.ndarray]:
  """([G] AUROC, [G] AUPR) of detecting unseen examples by a score where higher means more
  known (unseen examples ranked by its negation); NaN where undefined. Non-finite scores (no
  fit for the example's task) leave their examples out."""
  known_score = np.asarray(known_score, np.float64).reshape(-1)
  keep = np.isfinite(known_score)
  scores = -known_score[keep]
  is_unseen = np.asarray(is_unseen, bool).reshape(-1)[keep]
  groups = np.asarray(groups, np.int64).reshape(-1)[keep]
  return (grouped_binary_auroc(scores, is_unseen, groups, num_groups),
          grouped_average_precision(scores, is_unseen, groups, num_groups))


class TiedGaussianFit:
  """Class-conditional Gaussians on features with one covariance per task, tied over its
  classes (Lee et al. 2018, without input preprocessing), fitted in one streaming pass.

  `update` accumulates, per task, class counts and feature sums and the sum of outer products
  (float64); `fit` turns them into class means and a whitening of the within-class covariance
  Sigma_t = (sum x x^T - sum_c n_c mu_c mu_c^T) / n_t, plus `ridge` times its mean variance on
  the diagonal (tasks with fewer examples than feature dimensions have a singular one).
  `known_score` is minus the squared Mahalanobis distance to the nearest class mean (higher =
  more known). Memory: T x H x H float64 for the outer products.

  Args:
    trained_num_classes: [T] each task's trained class count; examples labelled at or above it
      (held out) are left out of the fit.
    feature_dim: H.
  """

  def __init__(self, trained_num_classes, feature_dim: int):
    self.trained = np.asarray(trained_num_classes, np.int64).reshape(-1)
    num_tasks, width = self.trained.size, int(self.trained.max(initial=1))
    self.counts = np.zeros((num_tasks, width))
    self.sums = np.zeros((num_tasks, width, feature_dim))
    self.outer = np.zeros((num_tasks, feature_dim, feature_dim))
    self.means = self.whiten = None

  def update(self, features, labels, task_ids) -> None:
    """Adds a batch of (features [N, H], head-column labels [N], task ids [N])."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels, np.int64).reshape(-1)
    task_ids = np.asarray(task_ids, np.int64).reshape(-1)
    known = labels < self.trained[task_ids]
    x, y, t = features[known], labels[known], task_ids[known]
    np.add.at(self.counts, (t, y), 1.0)
    np.add.at(self.sums, (t, y), x)
    # Batches of a split sorted by task hold few tasks: one product per task present.
    for task in np.unique(t):
      mine = x[t == task]
      self.outer[task] += mine.T @ mine

  def fit(self, ridge: float = 1e-3) -> "TiedGaussianFit":
    """Means [T, C, H] (NaN for classes without examples) and whitening matrices [T, H, H]
    (NaN for tasks without examples), such that |(x - mu) W|^2 is the Mahalanobis distance."""
    with np.errstate(invalid="ignore", divide="ignore"):
      self.means = self.sums / self.counts[..., None]
      n = self.counts.sum(axis=1)
      between = np.einsum("tc,tch,tck->thk", self.counts, np.nan_to_num(self.means),
                          np.nan_to_num(self.means))
      cov = (self.outer - between) / n[:, None, None]
    dim = cov.shape[-1]
    scale = np.trace(np.nan_to_num(cov), axis1=1, axis2=2) / dim
    cov = cov + (ridge * np.maximum(scale, 1e-12))[:, None, None] * np.eye(dim)
    has_data = n > 0
    self.whiten = np.full_like(cov, np.nan)
    if has_data.any():
      values, vectors = np.linalg.eigh(cov[has_data])
      self.whiten[has_data] = vectors / np.sqrt(np.maximum(values, 1e-300))[:, None, :]
    return self

  def known_score(self, features, task_ids) -> np.ndarray:
    """[N] minus the squared Mahalanobis distance of each example to its task's nearest class
    mean; NaN for tasks without a fit."""
    features = np.asarray(features, np.float64)
    task_ids = np.asarray(task_ids, np.int64).reshape(-1)
    out = np.full(task_ids.size, np.nan)
    order = np.argsort(task_ids, kind="stable")
    starts = np.flatnonzero(np.r_[True, task_ids[order][1:] != task_ids[order][:-1]])
    for rows in np.split(order, starts[1:]) if order.size else []:
      task = task_ids[rows[0]]
      has_class = self.counts[task, :self.trained[task]] > 0
      if not has_class.any() or np.isnan(self.whiten[task]).any():
        continue
      z = features[rows] @ self.whiten[task]  # [n, H]
      centres = self.means[task, :self.trained[task]][has_class] @ self.whiten[task]  # [c, H]
      distance = np.sum((z[:, None, :] - centres[None]) ** 2, axis=-1)
      out[rows] = -distance.min(axis=1)
    return out
