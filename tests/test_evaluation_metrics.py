"""mtl_jax.evaluation.metrics against brute-force references and hand-checked cases."""
import json

import numpy as np
import pytest

from mtl_jax.evaluation import metrics
from tests.evaluation_references import (reference_auroc, reference_average_precision,
                                         reference_ece, reference_topk)


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
  assert np.isnan(metrics.binary_auroc([], [])) and np.isnan(metrics.average_precision([], []))


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


def test_per_task_macro_auroc_leaves_out_unseen_labels():
  np_rng = np.random.default_rng(7)
  task_ids = np_rng.integers(0, 2, 60)
  num_classes = np.array([3, 4])
  labels = np_rng.integers(0, num_classes[task_ids] + 1)  # One extra (unseen) class per task.
  probs = np_rng.random((60, 5))
  result = metrics.per_task_macro_auroc(probs, labels, task_ids, num_classes)
  for t in range(2):
    seen = (task_ids == t) & (labels < num_classes[t])
    assert result[t] == pytest.approx(
        metrics.macro_auroc(probs[seen], labels[seen], num_classes[t]), rel=1e-12)


@pytest.mark.parametrize("with_ties", [False, True])
def test_grouped_forms_match_the_references_group_by_group(with_ties):
  np_rng = np.random.default_rng(8)
  num_groups = 7
  groups = np_rng.integers(0, num_groups - 1, 300)  # The last group is empty.
  scores = random_scores(np_rng, 300, with_ties)
  is_positive = np_rng.random(300) < 0.3
  is_positive[groups == 2] = False  # A group without positives.
  is_positive[groups == 3] = True  # A group without negatives.
  auroc = metrics.grouped_binary_auroc(scores, is_positive, groups, num_groups)
  ap = metrics.grouped_average_precision(scores, is_positive, groups, num_groups)
  assert auroc.shape == ap.shape == (num_groups,)
  for g in range(num_groups):
    s, p = list(scores[groups == g]), list(is_positive[groups == g])
    if any(p) and not all(p):
      assert auroc[g] == pytest.approx(reference_auroc(s, p), rel=1e-12)
    else:
      assert np.isnan(auroc[g])
    if any(p):
      assert ap[g] == pytest.approx(reference_average_precision(s, p), rel=1e-12)
    else:
      assert np.isnan(ap[g])
  detection_auroc, detection_aupr = metrics.grouped_unseen_class_detection(
      1 - scores, is_positive, groups, num_groups)
  np.testing.assert_allclose(detection_auroc, auroc, rtol=1e-12)
  np.testing.assert_allclose(detection_aupr, ap, rtol=1e-12)


def test_per_task_class_auroc_marks_classes_without_both_sides():
  probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
  labels = np.array([0, 1, 0])
  per_class = metrics.per_task_class_auroc(probs, labels, np.zeros(3, int), np.array([3]))
  assert per_class[0, 0] == 1.0 and per_class[0, 1] == 1.0
  assert np.isnan(per_class[0, 2])  # No positive.
  assert metrics.task_macro_auroc(probs, labels, np.zeros(3, int), np.array([3]))[0] == 1.0


def test_label_rank_breaks_ties_to_the_lower_index():
  scores = np.array([[1.0, 2.0, 2.0, 0.0], [1.0, 1.0, 1.0, -np.inf]])
  assert metrics.label_rank(scores, np.array([2, 0])).tolist() == [1, 0]
  assert metrics.label_rank(scores, np.array([1, 2])).tolist() == [0, 2]


# --- Reliability bins (the format of reports/calibration.json) ----------------------------------

def test_calibration_bins_by_hand():
  # Two bins, (0, 0.5] and (0.5, 1]; a confidence of exactly 0 goes to the first.
  calibration = metrics.calibration_bins([0.0, 0.4, 0.5, 0.9, 1.0], [0, 1, 1, 1, 0], num_bins=2)
  low, high = calibration["bins"]
  assert (low["lower"], low["upper"], high["lower"], high["upper"]) == (0.0, 0.5, 0.5, 1.0)
  assert low["count"] == 3 and high["count"] == 2
  assert low["confidence"] == pytest.approx(0.3) and low["accuracy"] == pytest.approx(2 / 3)
  assert high["confidence"] == pytest.approx(0.95) and high["accuracy"] == pytest.approx(0.5)
  expected_ece = 3 / 5 * abs(2 / 3 - 0.3) + 2 / 5 * abs(0.5 - 0.95)
  assert calibration["ece"] == pytest.approx(expected_ece)
  assert calibration["num_examples"] == 5 and calibration["num_bins"] == 2


def test_calibration_bins_agree_with_the_metric_and_mark_empty_bins():
  rng = np.random.default_rng(0)
  confidence = rng.beta(5, 2, 500)
  correct = rng.random(500) < confidence
  calibration = metrics.calibration_bins(confidence, correct, num_bins=15)
  bins = calibration["bins"]
  assert len(bins) == 15 and sum(b["count"] for b in bins) == 500
  assert calibration["ece"] == pytest.approx(
      metrics.expected_calibration_error(confidence, correct, 15))
  assert calibration["ece"] == pytest.approx(reference_ece(confidence, correct, 15))
  from_bins = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"]) for b in bins
                  if b["count"])
  assert calibration["ece"] == pytest.approx(from_bins)
  empty = [b for b in bins if not b["count"]]
  assert empty and all(b["confidence"] is None and b["accuracy"] is None for b in empty)
  json.dumps(calibration, allow_nan=False)  # The file format: plain JSON, no NaN.
  # The same dict from sums (as a device-side accumulation gives them).
  counts, confidence_sums, correct_sums = metrics.calibration_sums(confidence, correct, 15)
  assert metrics.calibration_from_sums(counts[0], confidence_sums[0], correct_sums[0]) == (
      calibration)
  assert metrics.calibration_bins([], [])["ece"] is None


def test_calibration_bins_reject_logits_and_mismatched_lengths():
  with pytest.raises(ValueError, match="logits"):
    metrics.calibration_bins([2.5, 0.1], [1, 0])
  with pytest.raises(ValueError, match="one of each"):
    metrics.calibration_bins([0.5, 0.1], [1])


def test_grouped_calibration_sums_are_per_group_bins():
  rng = np.random.default_rng(9)
  confidence, groups = rng.random(200), rng.integers(0, 3, 200)
  correct = rng.random(200) < confidence
  counts, confidence_sums, correct_sums = metrics.calibration_sums(confidence, correct, 10,
                                                                   groups, 4)
  assert counts.shape == (4, 10) and counts[3].sum() == 0
  ece = metrics.ece_from_sums(counts, confidence_sums, correct_sums)
  for g in range(3):
    assert ece[g] == pytest.approx(reference_ece(confidence[groups == g], correct[groups == g],
                                                 10))
  assert np.isnan(ece[3])
