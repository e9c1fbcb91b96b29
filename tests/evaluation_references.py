"""Brute-force references for the evaluation tests: the definitions, written as directly as
possible (Python loops, pair counting, one threshold at a time), sharing no code with
mtl_jax.evaluation."""
import math

import numpy as np


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


def _softmax(logits):
  top = max(logits)
  exps = [math.exp(v - top) for v in logits]
  total = sum(exps)
  return [e / total for e in exps]


def _mean_or_none(values):
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def reference_evaluation(full, trained, logits, labels, task_ids, num_bins=15):
  """Per-task rows (the metric keys of `evaluate_outputs`), the pooled ECE over seen examples
  and the pooled unseen-class AUROC/AUPR over the tasks with held-out classes, by a loop over
  tasks and examples."""
  rows, seen_conf, seen_correct, pool_scores, pool_unseen = [], [], [], [], []
  for t in range(len(full)):
    k = int(trained[t])
    mine = [i for i in range(len(labels)) if task_ids[i] == t]
    probs = {i: _softmax([float(v) for v in logits[i][:k]]) for i in mine}
    seen = [i for i in mine if labels[i] < k]
    unseen = [i for i in mine if labels[i] >= k]
    row = {"num_classes": int(full[t]), "trained_classes": k, "eval_examples": len(seen)}
    correct, top5, losses, confidences = [], [], [], []
    for i in seen:
      row_logits = [float(v) for v in logits[i][:k]]
      ranked = sorted(range(k), key=lambda c: (-row_logits[c], c))
      correct.append(ranked[0] == labels[i])
      top5.append(labels[i] in ranked[:5])
      losses.append(-math.log(probs[i][labels[i]]))
      confidences.append(max(probs[i]))
    row["accuracy"] = float(np.mean(correct)) if seen else None
    row["top5_accuracy"] = float(np.mean(top5)) if seen and k > 5 else None
    row["loss"] = float(np.mean(losses)) if seen else None
    row["chance"] = 1.0 / k
    per_class = []
    for c in range(k):
      positive = [labels[i] == c for i in seen]
      if any(positive) and not all(positive):
        per_class.append(reference_auroc([probs[i][c] for i in seen], positive))
    row["macro_auroc"] = float(np.mean(per_class)) if per_class else None
    row["ece"] = reference_ece(confidences, correct, num_bins) if seen else None
    seen_conf += confidences
    seen_correct += correct
    if k < full[t]:
      scores = [1.0 - max(probs[i]) for i in seen + unseen]
      is_unseen = [False] * len(seen) + [True] * len(unseen)
      row["unseen_examples"] = len(unseen)
      row["unseen_auroc"] = reference_auroc(scores, is_unseen) if seen and unseen else None
      row["unseen_aupr"] = reference_average_precision(scores, is_unseen) if unseen else None
      pool_scores += scores
      pool_unseen += is_unseen
    rows.append(row)
  pooled = {
      "ece": reference_ece(seen_conf, seen_correct, num_bins),
      "unseen_auroc": reference_auroc(pool_scores, pool_unseen) if any(pool_unseen) else None,
      "unseen_aupr": (reference_average_precision(pool_scores, pool_unseen)
                      if any(pool_unseen) else None),
  }
  return rows, pooled


def reference_summary(rows, pooled):
  """The summary keys computed from reference rows, as the report documents them."""
  scored = [r for r in rows if r["accuracy"] is not None]
  acc = [r["accuracy"] for r in scored]
  summary = {
      "tasks_evaluated": len(scored),
      "tasks_total": len(rows),
      "mean_accuracy": float(np.mean(acc)),
      "weighted_accuracy": sum(r["accuracy"] * r["eval_examples"] for r in scored)
      / sum(r["eval_examples"] for r in scored),
      "mean_top5_accuracy": _mean_or_none(r["top5_accuracy"] for r in scored),
      "mean_chance": float(np.mean([r["chance"] for r in scored])),
      "mean_loss": float(np.mean([r["loss"] for r in scored])),
      "min_accuracy": min(acc),
      "median_accuracy": float(np.median(acc)),
      "mean_macro_auroc": _mean_or_none(r["macro_auroc"] for r in scored),
      "mean_ece": _mean_or_none(r["ece"] for r in scored),
      "ece": pooled["ece"],
  }
  if any("unseen_examples" in r for r in rows):
    summary["mean_unseen_auroc"] = _mean_or_none(r.get("unseen_auroc") for r in rows)
    summary["mean_unseen_aupr"] = _mean_or_none(r.get("unseen_aupr") for r in rows)
    summary["pooled_unseen_auroc"] = pooled["unseen_auroc"]
    summary["pooled_unseen_aupr"] = pooled["unseen_aupr"]
  return summary
