"""Tests of the evaluation metrics against brute-force references and hand-checked cases."""
import numpy as np
import pytest

from mtl_jax import metrics


# Brute-force references: the definitions, written as directly as possible.


def reference_auroc(scores, is_positive):
  """Mean over all (positive, negative) pairs of 1 if the positive scores higher, 1/2 if tied."""
  positives = [s for s, p in zip(scores, is_positive) if p]
  negatives = [s for s, p in zip(scores, is_positive) if not p]
  wins = 0.0
  for sp in positives:
    for sn in negatives:
      wins += 1.0 if sp > sn else 0.5 if sp == sn else 0.0
  return wins / (len(positives) * len(negatives))


def reference_average_precision(scores, is_positive):
  """sum_n (R_n - R_{n-1}) P_n, one threshold per distinct score, predicted positive if >=."""
  ap, previous_recall = 0.0, 0.0
  for threshold in sorted(set(scores), reverse=True):
    predicted = [s >= threshold for s in scores]
    tp = sum(1 for p, y in zip(predicted, is_positive) if p and y)
    recall = tp / sum(is_positive)
    ap += (recall - previous_recall) * tp / sum(predicted)
    previous_recall = recall
  return ap


def reference_ece(confidences, correct, num_bins):
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  ece = 0.0
  for b in range(num_bins):
    in_bin = [i for i, c in enumerate(confidences)
              if (edges[b] < c <= edges[b + 1]) or (b == 0 and c == 0.0)]
    if in_bin:
      accuracy = np.mean([correct[i] for i in in_bin])
      confidence = np.mean([confidences[i] for i in in_bin])
      ece += len(in_bin) / len(confidences) * abs(accuracy - confidence)
  return ece


def reference_topk(scores, labels, k, class_mask):
  hits = 0
  for row, label, row_mask in zip(scores, labels, class_mask):
    # Highest score first, ties to the lower class index.
    ranked = sorted((c for c in range(len(row)) if row_mask[c]), key=lambda c: (-row[c], c))
    hits += label in ranked[:k]
  return hits / len(labels)


def random_scores(np_rng, shape, with_ties):
  scores = np_rng.random(shape)
  return np.round(scores, 1) if with_ties else scores  # Rounding makes many ties.


@pytest.mark.parametrize("with_ties", [False, True])
def test_binary_auroc_matches_pair_counting(with_ties):
  np_rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(np_rng.integers(2, 60))
    scores = random_scores(np_rng, n, with_ties)
    is_positive = np_rng.random(n) < np_rng.random()
    if is_positive.all() or not is_positive.any():
      continue
    np.testing.assert_allclose(metrics.binary_auroc(scores, is_positive),
                               reference_auroc(scores, is_positive), rtol=1e-12)


def test_binary_auroc_hand_checked():
  labels = np.array([0, 0, 1, 1], bool)
  assert metrics.binary_auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
  assert metrics.binary_auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
  assert metrics.binary_auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
  # One of the four pairs inverted, one tied: (2 + 0.5) / 4.
  assert metrics.binary_auroc([0.1, 0.6, 0.6, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
  assert np.isnan(metrics.binary_auroc([0.1, 0.2], [True, True]))
  assert np.isnan(metrics.binary_auroc([0.1, 0.2], [False, False]))


@pytest.mark.parametrize("with_ties", [False, True])
def test_macro_auroc_matches_per_class_reference(with_ties):
  np_rng = np.random.default_rng(1)
  num_classes = 5
  probs = random_scores(np_rng, (80, num_classes + 2), with_ties)  # Padded columns ignored.
  labels = np_rng.integers(0, num_classes - 1, 80)  # The last class has no positives: skipped.
  expected = np.mean([reference_auroc(probs[:, c], labels == c) for c in range(num_classes - 1)])
  np.testing.assert_allclose(metrics.macro_auroc(probs, labels, num_classes), expected,
                             rtol=1e-12)
  assert np.isnan(metrics.macro_auroc(probs, np.zeros(80, int), num_classes))


def test_per_task_macro_auroc_is_macro_auroc_of_each_task():
  np_rng = np.random.default_rng(2)
  task_ids = np_rng.integers(0, 3, 90)
  num_classes = np.array([2, 4, 3])
  labels = np_rng.integers(0, num_classes[task_ids])
  probs = np_rng.random((90, 4))
  result = metrics.per_task_macro_auroc(probs, labels, task_ids, num_classes)
  assert sorted(result) == [0, 1, 2]
  for t in range(3):
    assert result[t] == metrics.macro_auroc(probs[task_ids == t], labels[task_ids == t],
                                            num_classes[t])


@pytest.mark.parametrize("with_ties", [False, True])
def test_average_precision_matches_threshold_sweep(with_ties):
  np_rng = np.random.default_rng(3)
  for _ in range(20):
    n = int(np_rng.integers(1, 60))
    scores = random_scores(np_rng, n, with_ties)
    is_positive = np_rng.random(n) < np_rng.random()
    if not is_positive.any():
      continue
    np.testing.assert_allclose(metrics.average_precision(scores, is_positive),
                               reference_average_precision(list(scores), list(is_positive)),
                               rtol=1e-12)


def test_average_precision_hand_checked():
  # sklearn's documented example: average_precision_score([0, 0, 1, 1], [.1, .4, .35, .8]).
  assert metrics.average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.8333333)
  assert metrics.average_precision([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
  # All tied: one threshold, precision = positive rate.
  assert metrics.average_precision([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0]) == 0.25
  assert np.isnan(metrics.average_precision([0.1, 0.2], [0, 0]))


def test_expected_calibration_error_matches_reference():
  np_rng = np.random.default_rng(4)
  for num_bins in (1, 10, 15):
    confidences = np_rng.random(300)
    # Exact bin edges and the extremes exercise the (lo, hi] convention.
    confidences[:5] = [0.0, 1.0, 1 / 15, 2 / 15, 0.5]
    correct = np_rng.random(300) < confidences
    np.testing.assert_allclose(
        metrics.expected_calibration_error(confidences, correct, num_bins),
        reference_ece(confidences, correct, num_bins), rtol=1e-9, atol=1e-12)


def test_expected_calibration_error_hand_checked():
  # Perfectly calibrated bins: 80% right at confidence 0.8, 30% right at 0.3.
  confidences = np.r_[np.full(10, 0.8), np.full(10, 0.3)]
  correct = np.r_[np.arange(10) < 8, np.arange(10) < 3]
  assert metrics.expected_calibration_error(confidences, correct) == pytest.approx(0.0, abs=1e-12)
  # Always certain, right half the time.
  assert metrics.expected_calibration_error(np.ones(4), [1, 0, 1, 0]) == pytest.approx(0.5)
  assert np.isnan(metrics.expected_calibration_error([], []))


def test_accuracy_and_topk_match_reference_with_class_masks():
  np_rng = np.random.default_rng(5)
  num_examples, max_classes = 100, 6
  num_classes = np_rng.integers(2, max_classes + 1, num_examples)
  class_mask = np.arange(max_classes)[None, :] < num_classes[:, None]
  labels = np_rng.integers(0, num_classes)
  # Masked columns get the highest logits: a metric that ignored the mask would pick them.
  scores = np.where(class_mask, np.round(np_rng.normal(size=class_mask.shape), 1), 10.0)
  for k in (1, 2, 3):
    np.testing.assert_allclose(metrics.topk_accuracy(scores, labels, k, class_mask),
                               reference_topk(scores, labels, k, class_mask))
  assert metrics.accuracy(scores, labels, class_mask) == pytest.approx(
      reference_topk(scores, labels, 1, class_mask))
  assert metrics.topk_accuracy(scores, labels, max_classes, class_mask) == 1.0


def test_accuracy_hand_checked():
  scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
  labels = np.array([1, 1, 0])
  assert metrics.accuracy(scores, labels) == pytest.approx(1 / 3)
  assert metrics.topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
  # Without class 0, the second example's prediction becomes class 1.
  mask = np.array([[True] * 3, [False, True, True], [True] * 3])
  assert metrics.accuracy(scores, labels, mask) == pytest.approx(2 / 3)
  assert np.isnan(metrics.accuracy(np.zeros((0, 3)), np.zeros(0, int)))


def test_unseen_class_detection():
  seen = np.array([0.9, 0.95, 0.8, 0.7])
  unseen = np.array([0.3, 0.5, 0.6])
  perfect = metrics.unseen_class_detection(seen, unseen)
  assert perfect == {"auroc": 1.0, "aupr": 1.0}
  # Overconfident on unseen classes: the detector is inverted.
  assert metrics.unseen_class_detection(unseen, seen)["auroc"] == 0.0
  np_rng = np.random.default_rng(6)
  seen, unseen = np_rng.random(40), np_rng.random(25) * 0.8
  result = metrics.unseen_class_detection(seen, unseen)
  scores = list(1 - np.r_[seen, unseen])
  is_unseen = [False] * 40 + [True] * 25
  np.testing.assert_allclose(result["auroc"], reference_auroc(scores, is_unseen), rtol=1e-12)
  np.testing.assert_allclose(result["aupr"], reference_average_precision(scores, is_unseen),
                             rtol=1e-12)
