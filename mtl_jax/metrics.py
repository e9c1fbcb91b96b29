"""NumPy evaluation metrics for classification over per-task class masks.

Host-side, on gathered predictions. Scores may be logits or probabilities; where a `class_mask`
is given, classes outside the example's task are never predicted.

Conventions:
- Ties in a ranking count one half (average ranks, Mann-Whitney U) for AUROC; top-k breaks ties
  towards the lower class index, like `argmax`.
- A metric that is undefined on its input (AUROC without positives or without negatives, AP
  without positives, any metric on zero examples) returns NaN rather than raising, so that one
  tiny task does not stop an evaluation; callers average with `np.nanmean`.
- Unseen-class detection: examples of classes never seen in training are the *positives*, scored
  by `1 - max softmax probability` (the less confident, the more likely unseen).
"""
from typing import Optional

import numpy as np


def _masked_scores(scores: np.ndarray, class_mask: Optional[np.ndarray]) -> np.ndarray:
  scores = np.asarray(scores, np.float64)
  if class_mask is None:
    return scores
  return np.where(np.asarray(class_mask, bool), scores, -np.inf)


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
  top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]  # Stable: ties go to the lower index.
  return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def accuracy(
    scores: np.ndarray, labels: np.ndarray, class_mask: Optional[np.ndarray] = None
) -> float:
  """Fraction of examples whose highest-scoring task class is the label; NaN for N = 0."""
  scores = _masked_scores(scores, class_mask)
  labels = np.asarray(labels)
  if labels.shape[0] == 0:
    return float("nan")
  return float(np.mean(np.argmax(scores, axis=-1) == labels))


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks of `values`, tied values sharing the mean of their ranks."""
  order = np.argsort(values, kind="stable")
  sorted_values = values[order]
  # Tie groups are runs of equal sorted values; each gets the mean of its first and last rank.
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  ends = np.r_[starts[1:], len(values)]  # Exclusive.
  group_rank = (starts + 1 + ends) / 2.0
  ranks = np.empty(len(values), np.float64)
  ranks[order] = np.repeat(group_rank, ends - starts)
  return ranks


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
  is_positive = np.asarray(is_positive, bool).reshape(-1)
  num_pos = int(is_positive.sum())
  num_neg = is_positive.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  positive_rank_sum = _average_ranks(scores)[is_positive].sum()
  u_statistic = positive_rank_sum - num_pos * (num_pos + 1) / 2.0
  return float(u_statistic / (num_pos * num_neg))


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
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  per_class = [
      binary_auroc(probs[:, c], labels == c)
      for c in range(num_classes)
      if 0 < np.sum(labels == c) < labels.shape[0]
  ]
  return float(np.mean(per_class)) if per_class else float("nan")


def per_task_macro_auroc(
    probs: np.ndarray, labels: np.ndarray, task_ids: np.ndarray, num_classes: np.ndarray
) -> dict[int, float]:
  """`macro_auroc` of every task present in `task_ids`.

  Args:
    probs: [N, C] scores over the padded class axis.
    labels: [N] int.
    task_ids: [N] int.
    num_classes: [T] class count of each task.

  Returns:
    {task id: macro AUROC (NaN where undefined)}.
  """
  task_ids = np.asarray(task_ids)
  probs = np.asarray(probs)
  labels = np.asarray(labels)
  return {
      int(t): macro_auroc(probs[task_ids == t], labels[task_ids == t], int(num_classes[t]))
      for t in np.unique(task_ids)
  }


def expected_calibration_error(
    confidences: np.ndarray, correct: np.ndarray, num_bins: int = 15
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
  confidences = np.asarray(confidences, np.float64).reshape(-1)
  correct = np.asarray(correct, np.float64).reshape(-1)
  if confidences.size == 0:
    return float("nan")
  inner_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
  # Number of inner edges strictly below the confidence = index of its right-closed bin.
  bins = np.searchsorted(inner_edges, confidences, side="left")
  confidence_sums = np.bincount(bins, weights=confidences, minlength=num_bins)
  correct_sums = np.bincount(bins, weights=correct, minlength=num_bins)
  # |sum(correct) - sum(confidence)| / N is n_b / N * |acc_b - conf_b|, and 0 for empty bins.
  return float(np.sum(np.abs(correct_sums - confidence_sums)) / confidences.size)


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
  is_positive = np.asarray(is_positive, bool).reshape(-1)
  num_pos = int(is_positive.sum())
  if num_pos == 0:
    return float("nan")
  order = np.argsort(-scores, kind="stable")
  sorted_scores = scores[order]
  true_positives = np.cumsum(is_positive[order])
  # The last index of each run of equal scores: one threshold per distinct score.
  threshold_ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
  tp = true_positives[threshold_ends]
  precision = tp / (threshold_ends + 1)
  recall = tp / num_pos
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


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
