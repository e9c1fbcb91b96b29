"""Per-task evaluation: accuracy (top-1, and top-5 for tasks with more than 5 classes), loss,
chance level, and macro averages over tasks, unweighted and weighted by task size.

The device side (`eval_step` in train.py) sums per-task counts with `segment_sum`, so a split is
reduced to a few `[T]` vectors whatever its size; this module turns them into the report, written
as JSON and CSV into the workdir and printed as a short table.
"""
import csv
import io
import json

import numpy as np
from etils import epath

SUM_KEYS = ("count", "correct", "correct_top5", "loss")


def skipped_count(skipped: dict | None, task: str | None = None) -> int:
  """Bad records skipped ({task: {reason: count}}): of `task`, or of every task when None
  (records whose task is unknown included)."""
  if not skipped:
    return 0
  per_task = [skipped.get(task, {})] if task is not None else skipped.values()
  return int(sum(sum(reasons.values()) for reasons in per_task))


def task_rows(task_table, sums: dict, train_sizes, skipped: dict | None = None,
              train_skipped: dict | None = None) -> list[dict]:
  """One row per task from the per-task sums of one split.

  `skipped` and `train_skipped` ({task: {reason: count}}) are the bad records dropped from this
  split and from the train split: a task that lost training data shows it in every report.
  """
  rows = []
  num_classes = task_table.num_classes
  for t, name in enumerate(task_table.names):
    count = int(sums["count"][t])
    k = int(num_classes[t])
    rows.append({
        "task": name,
        "num_classes": k,
        "train_examples": int(train_sizes[t]),
        "eval_examples": count,
        "accuracy": float(sums["correct"][t] / count) if count else None,
        "top5_accuracy": float(sums["correct_top5"][t] / count) if count and k > 5 else None,
        "loss": float(sums["loss"][t] / count) if count else None,
        "chance": 1.0 / k,
        "skipped_records": skipped_count(skipped, name),
        "skipped_train_records": skipped_count(train_skipped, name),
    })
  return rows


def summarize(rows: list[dict], skipped: dict | None = None,
              train_skipped: dict | None = None) -> dict:
  """Macro averages over the tasks that have evaluation examples, and totals of the bad records
  skipped from this split and the train split (records of unknown tasks included)."""
  scored = [r for r in rows if r["accuracy"] is not None]
  if not scored:
    return {"tasks_evaluated": 0}
  acc = np.array([r["accuracy"] for r in scored])
  weights = np.array([r["eval_examples"] for r in scored], np.float64)
  top5 = [r["top5_accuracy"] for r in scored if r["top5_accuracy"] is not None]
  return {
      "tasks_evaluated": len(scored),
      "tasks_total": len(rows),
      "mean_accuracy": float(acc.mean()),
      "weighted_accuracy": float((acc * weights).sum() / weights.sum()),
      "mean_top5_accuracy": float(np.mean(top5)) if top5 else None,
      "mean_chance": float(np.mean([r["chance"] for r in scored])),
      "mean_loss": float(np.mean([r["loss"] for r in scored])),
      "min_accuracy": float(acc.min()),
      "median_accuracy": float(np.median(acc)),
      "skipped_records": skipped_count(skipped),
      "skipped_train_records": skipped_count(train_skipped),
  }


def write_report(workdir, split: str, step: int, rows: list[dict], summary: dict) -> None:
  out = epath.Path(workdir) / "reports"
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{split}.json").write_text(
      json.dumps({"split": split, "step": step, "summary": summary, "tasks": rows}, indent=1))
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  (out / f"{split}.csv").write_text(buffer.getvalue())


def _fmt(value) -> str:
  return "-" if value is None else f"{value:.3f}"


def format_table(split: str, rows: list[dict], summary: dict, max_rows: int = 12) -> str:
  """The summary plus the tasks, largest first, cut to `max_rows` (the files hold them all)."""
  lines = [f"{split}: {summary.get('tasks_evaluated', 0)} tasks, mean accuracy "
           f"{_fmt(summary.get('mean_accuracy'))} (chance {_fmt(summary.get('mean_chance'))}), "
           f"size-weighted {_fmt(summary.get('weighted_accuracy'))}, mean top-5 "
           f"{_fmt(summary.get('mean_top5_accuracy'))}"]
  lines.append(f"{'task':<28} {'classes':>7} {'train':>7} {'eval':>6} {'acc':>6} {'top5':>6} "
               f"{'chance':>6}")
  shown = sorted(rows, key=lambda r: -r["train_examples"])
  for r in shown[:max_rows]:
    lines.append(f"{r['task'][:28]:<28} {r['num_classes']:>7} {r['train_examples']:>7} "
                 f"{r['eval_examples']:>6} {_fmt(r['accuracy']):>6} {_fmt(r['top5_accuracy']):>6} "
                 f"{_fmt(r['chance']):>6}")
  if len(shown) > max_rows:
    lines.append(f"... {len(shown) - max_rows} more tasks in reports/{split}.csv")
  return "\n".join(lines)
