"""Per-task evaluation of one split from model outputs: rows, summary, files, printed table.

`evaluate_outputs` is the one entry point: the train loop, `new_task` and the experiments give it
the raw logits of the real examples of a split, and get back a `SplitResult` (one row per task,
a summary over tasks, the reliability-diagram dict). `write_report` writes it into the workdir
(`reports/{split}.json`, `.csv`, and for the test split `reports/calibration.json`), and
`format_table` prints it.

Definitions (metrics.py holds the implementations):

- A task's **trained classes** are its first `trained_num_classes[t]` classes; logits of other
  columns are masked out of the softmax and of every metric. Examples labelled with a class
  held out of training (`label >= trained_num_classes[t]`) are **unseen**; every other metric
  is computed over the **seen** examples only (`eval_examples`).
- accuracy: the argmax over the trained classes is the label; top-5 (tasks with more than 5
  trained classes): the label is among the 5 highest, ties to the lower class index (so top-1 of
  the ranking is the argmax); loss: cross-entropy over the trained classes; chance: 1 / trained
  classes.
- macro_auroc: one-vs-rest AUROC of each trained class present (at least one positive and one
  negative among the task's seen examples), scored by its softmax probability, averaged over
  classes; None when no class can be scored.
- ece: 15 equal-width bins of the max-softmax confidence (over the trained classes), per task;
  the summary's `ece` pools every seen example of every task, `mean_ece` averages the tasks.
- unseen-class detection (tasks with held-out classes): unseen examples are the positives,
  scored by 1 - max softmax probability (`metrics.unseen_class_detection`); AUROC and AUPR per
  task (over that task's seen and unseen examples), their means over the tasks where defined,
  and pooled over the examples of every task with held-out classes (tasks without any are left
  out of the pool: all their examples would be negatives, mixing the task mix into the number).
  The same numbers for each score of `metrics.UNSEEN_SCORES` carry the score's name
  (`unseen_auroc_energy`, `mean_unseen_aupr_max_logit`, `pooled_unseen_auroc_mahalanobis`, ...;
  `unseen_auroc` is `unseen_auroc_msp`): max softmax, max logit, energy (logsumexp of the
  logits), and the Mahalanobis distance of the head's input features to the nearest trained
  class mean under the task's tied covariance (`metrics.TiedGaussianFit`, fitted on the train
  split). Mahalanobis numbers need "features" in the outputs and a fit, else they are None.
  Pooled scores other than max softmax mix tasks on different scales: the per-task means are
  the fairer comparison.

Undefined numbers are None (null in JSON, empty in CSV), never NaN. Work is vectorised: one sort
by task, then per-example arrays and grouped bincounts/sorts; the logits are processed in
chunks of whole tasks so that memory stays bounded (10,000 tasks x 100 examples take seconds).
"""
import csv
import dataclasses
import io
import json
import math

import numpy as np
from etils import epath

from mtl_jax.evaluation import metrics

CALIBRATION_FILE = "calibration.json"
NUM_BINS = metrics.DEFAULT_NUM_BINS
# Logit cells (examples x padded classes) processed at once: bounds the float64 temporaries.
CHUNK_CELLS = 1 << 22


@dataclasses.dataclass
class SplitResult:
  """The evaluation of one split.

  Attributes:
    rows: one dict per task, in task order (see the module docstring).
    summary: averages over tasks and pooled numbers.
    calibration: the reliability diagram of the seen examples of every task, in the format of
      `reports/calibration.json` (`metrics.calibration_from_sums`, without "split").
  """
  rows: list[dict]
  summary: dict
  calibration: dict


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}: a nested dict (e.g. a config's `to_dict()`) as dotted keys."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def skipped_count(skipped: dict | None, task: str | None = None) -> int:
  """Bad records skipped ({task: {reason: count}}): of `task`, or of every task when None
  (records whose task is unknown included)."""
  if not skipped:
    return 0
  per_task = [skipped.get(task, {})] if task is not None else skipped.values()
  return int(sum(sum(reasons.values()) for reasons in per_task))


def _opt(value) -> float | None:
  """A float for the report: None for NaN or None."""
  if value is None:
    return None
  value = float(value)
  return None if math.isnan(value) else value


# --- From outputs to rows ------------------------------------------------------------------------

def _check_outputs(task_table, logits, labels, task_ids, trained, train_sizes):
  num_tasks = task_table.num_tasks
  full = np.asarray(task_table.num_classes)
  if logits.ndim != 2 or labels.shape != (logits.shape[0],) or task_ids.shape != labels.shape:
    raise ValueError(f"evaluate_outputs: logits {logits.shape}, label {labels.shape} and task_id "
                     f"{task_ids.shape}; pass logits [N, C] and label, task_id [N].")
  if trained.shape != (num_tasks,) or np.shape(train_sizes) != (num_tasks,):
    raise ValueError(f"evaluate_outputs: trained_num_classes {trained.shape} and train_sizes "
                     f"{np.shape(train_sizes)}; pass one per task ({num_tasks}).")
  if np.any(trained < 1) or np.any(trained > full) or trained.max(initial=0) > logits.shape[1]:
    raise ValueError(f"evaluate_outputs: trained_num_classes must lie in [1, the task's class "
                     f"count] and fit the {logits.shape[1]} logit columns; got {trained}.")
  if task_ids.size and (task_ids.min() < 0 or task_ids.max() >= num_tasks):
    raise ValueError(f"evaluate_outputs: task_id outside [0, {num_tasks}).")
  bad = (labels < 0) | (labels >= full[task_ids])
  if np.any(bad):
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"evaluate_outputs: example {i} of task {task_table.names[task_ids[i]]!r} "
                     f"has label {labels[i]}, outside its {full[task_ids[i]]} classes.")


def _chunks(task_rows: np.ndarray, task_width: np.ndarray, max_cells: int):
  """Row ranges of whole tasks, in the given task order, each about `max_cells` cells.

  Args:
    task_rows: [T] examples per task, in the order the rows are sorted.
    task_width: [T] columns each task needs (ascending, so a chunk is as wide as its last task).
    max_cells: the bound on rows x width of a chunk (a single larger task gets a chunk alone).

  Yields:
    (start row, end row, width).
  """
  start = rows = last_width = 0
  for n, width in zip(task_rows.tolist(), task_width.tolist()):
    if rows and (rows + n) * width > max_cells:
      yield start, start + rows, last_width
      start, rows = start + rows, 0
    rows += n
    last_width = width
  if rows:
    yield start, start + rows, last_width


def _example_stats(logits, labels, task_ids, trained, num_tasks):
  """Per-example numbers and per-task macro AUROC.

  Rows are sorted by (trained classes, task): each task's rows are contiguous, and a chunk of
  tasks with similar class counts is processed on only as many columns as it needs (class
  counts are long-tailed: padding to the widest task would dominate the work).

  Returns:
    (order, seen, rank, loss, known, macro_auroc): the first four over the examples in
    `order`, `known` ({"msp", "max_logit", "energy"}, `metrics.logit_known_scores`) too,
    `macro_auroc` [T] with NaN where undefined.
  """
  order = np.argsort(trained[task_ids] * num_tasks + task_ids, kind="stable")
  tid, lab = task_ids[order], labels[order]
  n = tid.size
  seen = lab < trained[tid]
  rank = np.zeros(n, np.int64)
  loss = np.zeros(n)
  known = {name: np.zeros(n) for name in ("msp", "max_logit", "energy")}
  macro = np.full(num_tasks, np.nan)
  starts = np.flatnonzero(np.r_[True, tid[1:] != tid[:-1]]) if n else np.zeros(0, np.int64)
  task_rows = np.diff(np.r_[starts, n])
  for start, end, width in _chunks(task_rows, trained[tid[starts]], CHUNK_CELLS):
    t = tid[start:end]
    valid = np.arange(width)[None, :] < trained[t][:, None]
    x = np.where(valid, logits[order[start:end], :width].astype(np.float64), -np.inf)
    finite = np.all(np.isfinite(x) | ~valid, axis=1)
    if not finite.all():
      raise ValueError("evaluate_outputs: non-finite logits in the trained classes of tasks "
                       f"{sorted(set(t[~finite].tolist()))}.")
    scores = metrics.logit_known_scores(x)
    for name, value in scores.items():
      known[name][start:end] = value
    log_norm = scores["energy"]
    s = seen[start:end]
    y = np.where(s, lab[start:end], 0)
    rank[start:end] = metrics.label_rank(x, y)
    loss[start:end] = log_norm - np.take_along_axis(x, y[:, None], axis=1)[:, 0]
    # Macro AUROC of the chunk's tasks, by the softmax probabilities of the seen examples.
    new_task = np.r_[True, t[1:] != t[:-1]]
    local = np.cumsum(new_task) - 1
    chunk_tasks = t[new_task]
    probs = np.exp(x[s] - log_norm[s, None])
    macro[chunk_tasks] = metrics.task_macro_auroc(probs, y[s], local[s], trained[chunk_tasks])
  return order, seen, rank, loss, known, macro


def evaluate_outputs(task_table, outputs: dict, trained_num_classes, train_sizes,
                     skipped: dict | None = None, train_skipped: dict | None = None,
                     feature_fit: metrics.TiedGaussianFit | None = None) -> SplitResult:
  """Every task's metrics on one split, from the model's outputs on its real examples.

  Args:
    task_table: `mtl_jax.catalogue.TaskTable` (names, full class counts).
    outputs: numpy arrays over the real examples (padding removed): "logits" [N, C_max] raw
      logits of the task heads (columns >= the task's trained class count are ignored), "label"
      [N] int (>= the trained class count: a held-out, unseen class), "task_id" [N] int, and
      optionally "features" [N, H] (the head's inputs, for the Mahalanobis score).
    trained_num_classes: [T] int, the classes the model trained on per task (its first ones).
    train_sizes: [T] int, training examples per task.
    skipped: {task: {reason: count}}, bad records skipped from this split.
    train_skipped: the same for the train split.
    feature_fit: the train split's class Gaussians (`metrics.TiedGaussianFit`, fitted), for the
      Mahalanobis score of "features".

  Returns:
    A `SplitResult`; see the module docstring for every field.

  Raises:
    ValueError: shapes that do not match, a task id or label out of range, non-finite logits.
  """
  logits = np.asarray(outputs["logits"])
  labels = np.asarray(outputs["label"]).astype(np.int64).reshape(-1)
  task_ids = np.asarray(outputs["task_id"]).astype(np.int64).reshape(-1)
  trained = np.asarray(trained_num_classes).astype(np.int64).reshape(-1)
  _check_outputs(task_table, logits, labels, task_ids, trained, train_sizes)
  num_tasks = task_table.num_tasks
  full = np.asarray(task_table.num_classes)
  order, seen, rank, loss, known, macro = _example_stats(logits, labels, task_ids, trained,
                                                         num_tasks)
  confidence = known["msp"]
  tid = task_ids[order]
  per_task = lambda w: np.bincount(tid, weights=w, minlength=num_tasks)
  count = per_task(seen.astype(np.float64))
  correct = rank == 0
  sums = {"correct": per_task(seen & correct), "top5": per_task(seen & (rank < 5)),
          "loss": per_task(np.where(seen, loss, 0.0)), "unseen": per_task(~seen)}
  # Calibration: per task and pooled, one binning.
  bin_counts, bin_confidence, bin_correct = metrics.calibration_sums(
      confidence[seen], correct[seen], NUM_BINS, tid[seen], num_tasks)
  task_ece = metrics.ece_from_sums(bin_counts, bin_confidence, bin_correct)
  calibration = metrics.calibration_from_sums(bin_counts.sum(0), bin_confidence.sum(0),
                                              bin_correct.sum(0))
  # Unseen-class detection over the tasks with held-out classes.
  held_out = trained < full
  in_pool = held_out[tid]
  unseen_auroc, unseen_aupr = metrics.grouped_unseen_class_detection(
      confidence[in_pool], ~seen[in_pool], tid[in_pool], num_tasks)
  pooled = metrics.unseen_class_detection(confidence[in_pool & seen], confidence[in_pool & ~seen])
  # Every score, per task and pooled; msp repeats the numbers above under its name.
  by_score = {"msp": (unseen_auroc, unseen_aupr, pooled["auroc"], pooled["aupr"])}
  if held_out.any() and feature_fit is not None and "features" in outputs:
    known["mahalanobis"] = feature_fit.known_score(np.asarray(outputs["features"])[order], tid)
  for name in metrics.UNSEEN_SCORES[1:]:
    if name not in known or not held_out.any():
      nan = np.full(num_tasks, np.nan)
      by_score[name] = (nan, nan, None, None)
      continue
    score, unseen = known[name][in_pool], ~seen[in_pool]
    per_task = metrics.grouped_unseen_detection(score, unseen, tid[in_pool], num_tasks)
    together = metrics.grouped_unseen_detection(score, unseen, np.zeros(score.size, np.int64), 1)
    by_score[name] = (*per_task, together[0][0], together[1][0])

  rows = []
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = lambda key: np.where(count > 0, sums[key] / count, np.nan)
    accuracy, top5, mean_loss = mean("correct"), mean("top5"), mean("loss")
  for t, name in enumerate(task_table.names):
    k = int(trained[t])
    row = {
        "task": name,
        "num_classes": int(full[t]),
        "trained_classes": k,
        "train_examples": int(train_sizes[t]),
        "eval_examples": int(count[t]),
        "accuracy": _opt(accuracy[t]),
        "top5_accuracy": _opt(top5[t]) if k > 5 else None,
        "loss": _opt(mean_loss[t]),
        "chance": 1.0 / k,
        "macro_auroc": _opt(macro[t]),
        "ece": _opt(task_ece[t]),
    }
    if held_out[t]:
      row.update({"unseen_examples": int(sums["unseen"][t]),
                  "unseen_auroc": _opt(unseen_auroc[t]), "unseen_aupr": _opt(unseen_aupr[t])})
      for score, (auroc, aupr, _, _) in by_score.items():
        row[f"unseen_auroc_{score}"] = _opt(auroc[t])
        row[f"unseen_aupr_{score}"] = _opt(aupr[t])
    row["skipped_records"] = skipped_count(skipped, name)
    row["skipped_train_records"] = skipped_count(train_skipped, name)
    rows.append(row)
  pooled_numbers = {"ece": calibration["ece"], "unseen_auroc": pooled["auroc"],
                    "unseen_aupr": pooled["aupr"]}
  for name, (_, _, auroc, aupr) in by_score.items():
    pooled_numbers.update({f"unseen_auroc_{name}": auroc, f"unseen_aupr_{name}": aupr})
  summary = summarize(rows, skipped, train_skipped, pooled=pooled_numbers)
  return SplitResult(rows=rows, summary=summary, calibration=calibration)


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def summarize(rows: list[dict], skipped: dict | None = None, train_skipped: dict | None = None,
              pooled: dict | None = None) -> dict:
  """Averages over the tasks that have (seen) evaluation examples, and totals of the bad records
  skipped from this split and the train split (records of unknown tasks included).

  `pooled` ({"ece", "unseen_auroc", "unseen_aupr", and "unseen_auroc_{score}",
  "unseen_aupr_{score}" per `metrics.UNSEEN_SCORES`}) holds the numbers over all examples, which
  rows alone cannot give (`evaluate_outputs` passes them; a summary of rows gathered from
  several reports has None there). The unseen-class keys appear when any row has held-out
  classes. Every key is present; a number without data is None.
  """
  pooled = pooled or {}
  scored = [r for r in rows if r["accuracy"] is not None]
  acc = np.array([r["accuracy"] for r in scored])
  weights = np.array([r["eval_examples"] for r in scored], np.float64)
  summary = {
      "tasks_evaluated": len(scored),
      "tasks_total": len(rows),
      "mean_accuracy": float(acc.mean()) if scored else None,
      "weighted_accuracy": float((acc * weights).sum() / weights.sum()) if scored else None,
      "mean_top5_accuracy": _mean(r["top5_accuracy"] for r in scored),
      "mean_chance": _mean(r["chance"] for r in scored),
      "mean_loss": _mean(r["loss"] for r in scored),
      "min_accuracy": float(acc.min()) if scored else None,
      "median_accuracy": float(np.median(acc)) if scored else None,
      "skipped_records": skipped_count(skipped),
      "skipped_train_records": skipped_count(train_skipped),
      "mean_macro_auroc": _mean(r.get("macro_auroc") for r in scored),
      "mean_ece": _mean(r.get("ece") for r in scored),
      "ece": _opt(pooled.get("ece")),
  }
  if any("unseen_examples" in r for r in rows):
    summary.update({
        "mean_unseen_auroc": _mean(r.get("unseen_auroc") for r in rows),
        "mean_unseen_aupr": _mean(r.get("unseen_aupr") for r in rows),
        "pooled_unseen_auroc": _opt(pooled.get("unseen_auroc")),
        "pooled_unseen_aupr": _opt(pooled.get("unseen_aupr")),
    })
    for name in metrics.UNSEEN_SCORES:
      for kind in ("auroc", "aupr"):
        key = f"unseen_{kind}_{name}"
        summary[f"mean_{key}"] = _mean(r.get(key) for r in rows)
        summary[f"pooled_{key}"] = _opt(pooled.get(key))
  return summary


# --- Files and the printed table ----------------------------------------------------------------

def write_calibration(workdir, calibration: dict, split: str = "test") -> epath.Path:
  """Writes `calibration` (`SplitResult.calibration`, `metrics.calibration_bins`) to
  `<workdir>/reports/calibration.json`, with its split."""
  out = epath.Path(workdir) / "reports"
  out.mkdir(parents=True, exist_ok=True)
  path = out / CALIBRATION_FILE
  path.write_text(json.dumps({"split": split, **calibration}, indent=1))
  return path


def write_report(workdir, split: str, step: int, result: SplitResult,
                 trained_steps: int | None = None) -> None:
  """Writes `reports/{split}.json` ({"split", "step": the checkpoint evaluated,
  "trained_steps": the steps the run trained (`step` unless the best checkpoint was evaluated),
  "summary", "tasks": rows}) and
  `reports/{split}.csv` (one line per task; a column a row lacks is empty), and for the test
  split `reports/calibration.json` (when the result has a calibration). Only process 0 should
  call it."""
  out = epath.Path(workdir) / "reports"
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{split}.json").write_text(json.dumps(
      {"split": split, "step": int(step),
       "trained_steps": int(step if trained_steps is None else trained_steps),
       "summary": result.summary, "tasks": result.rows},
      indent=1, allow_nan=False))
  fields = list(dict.fromkeys(k for row in result.rows for k in row))
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
  writer.writeheader()
  writer.writerows(result.rows)
  # A task name JSON can carry but UTF-8 cannot (a lone surrogate) is written as its escape.
  (out / f"{split}.csv").write_bytes(buffer.getvalue().encode("utf-8", "backslashreplace"))
  if split == "test" and result.calibration:
    write_calibration(workdir, result.calibration, split)


def _fmt(value) -> str:
  return "-" if value is None else f"{value:.3f}"


def format_table(split: str, rows: list[dict], summary: dict, max_rows: int = 12) -> str:
  """The summary plus the tasks, largest first, cut to `max_rows` (the files hold them all).

  The first line's start ("{split}: N tasks, mean accuracy X"; training passes the split as
  "validation at step S") is parsed by experiments/common.py: keep it.
  """
  s = summary.get
  lines = [f"{split}: {s('tasks_evaluated', 0)} tasks, mean accuracy "
           f"{_fmt(s('mean_accuracy'))} (chance {_fmt(s('mean_chance'))}), "
           f"size-weighted {_fmt(s('weighted_accuracy'))}, mean top-5 "
           f"{_fmt(s('mean_top5_accuracy'))}",
           f"  mean macro AUROC {_fmt(s('mean_macro_auroc'))}, ECE {_fmt(s('ece'))} "
           f"(mean over tasks {_fmt(s('mean_ece'))})"]
  unseen = "mean_unseen_auroc" in summary
  if unseen:
    lines.append(f"  unseen classes: AUROC {_fmt(s('mean_unseen_auroc'))}, AUPR "
                 f"{_fmt(s('mean_unseen_aupr'))} (mean over tasks); pooled AUROC "
                 f"{_fmt(s('pooled_unseen_auroc'))}, AUPR {_fmt(s('pooled_unseen_aupr'))}")
    lines.append("  unseen AUROC by score (mean over tasks / pooled): " + ", ".join(
        f"{name} {_fmt(s(f'mean_unseen_auroc_{name}'))}/{_fmt(s(f'pooled_unseen_auroc_{name}'))}"
        for name in metrics.UNSEEN_SCORES))
  if s("skipped_records") or s("skipped_train_records"):
    lines.append(f"  skipped bad records: {s('skipped_records', 0)} in {split}, "
                 f"{s('skipped_train_records', 0)} in train")
  header = (f"{'task':<28} {'classes':>7} {'train':>7} {'eval':>6} {'acc':>6} {'top5':>6} "
            f"{'chance':>6} {'auroc':>6} {'ece':>6}")
  lines.append(header + (f" {'unseen':>6} {'u-auc':>6}" if unseen else ""))
  shown = sorted(rows, key=lambda r: -r["train_examples"])
  for r in shown[:max_rows]:
    # Trained classes (their chance is the chance column), "of" all where some are held out.
    trained, full = r.get("trained_classes", r["num_classes"]), r["num_classes"]
    classes = str(full) if trained == full else f"{trained}/{full}"
    line = (f"{r['task'][:28]:<28} {classes:>7} {r['train_examples']:>7} "
            f"{r['eval_examples']:>6} {_fmt(r['accuracy']):>6} {_fmt(r['top5_accuracy']):>6} "
            f"{_fmt(r['chance']):>6} {_fmt(r.get('macro_auroc')):>6} {_fmt(r.get('ece')):>6}")
    if unseen:
      line += (f" {r.get('unseen_examples', '-'):>6} {_fmt(r.get('unseen_auroc')):>6}")
    lines.append(line)
  if len(shown) > max_rows:
    lines.append(f"... {len(shown) - max_rows} more tasks in reports/{split}.csv")
  return "\n".join(lines)
