"""evaluate_outputs against a per-task brute-force reference; report files and printed table."""
import csv
import io
import json
import re
import time

import numpy as np
import pytest

from mtl_jax.catalogue import TaskTable
from mtl_jax.evaluation import report
from mtl_jax.evaluation import (SplitResult, evaluate_outputs, format_table, summarize,
                                write_report)
from tests.evaluation_references import reference_evaluation, reference_summary

# Full and trained class counts: tasks 1, 2, 4 and 6 hold classes out of training; task 3 has
# no evaluation example, task 5 one, task 6 only examples of its held-out class.
FULL = np.array([3, 7, 5, 2, 9, 6, 4])
TRAINED = np.array([3, 6, 4, 2, 7, 6, 3])
COUNTS = [40, 60, 30, 0, 80, 1, 5]
WIDTH = 10  # Logit columns (C_max): wider than every task's trained classes.


def task_table(full=FULL, names=None):
  names = names or [f"shop-{t}" for t in range(len(full))]
  return TaskTable(names=names, class_names=[[f"c{i}" for i in range(k)] for k in full],
                   image_dim=4, max_images=1)


def make_outputs(seed=0, masked_value=1e30):
  """Random outputs in shuffled task order, with exact ties (copied logit rows) and
  `masked_value` in every column >= the example's trained classes."""
  rng = np.random.default_rng(seed)
  task_id = rng.permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))
  label = rng.integers(0, FULL[task_id])
  label[task_id == 6] = 3  # Task 6: only its held-out class.
  logits = rng.normal(0, 2, (task_id.size, WIDTH))
  for t in range(len(COUNTS)):
    mine = np.flatnonzero(task_id == t)
    if mine.size >= 4:  # Identical rows give tied probabilities and confidences.
      logits[mine[1]] = logits[mine[0]]
      logits[mine[3]] = logits[mine[2]]
  logits[np.arange(WIDTH)[None, :] >= TRAINED[task_id][:, None]] = masked_value
  return {"logits": logits.astype(np.float32), "label": label, "task_id": task_id}


def assert_rows_match(rows, expected):
  assert len(rows) == len(expected)
  for row, ref in zip(rows, expected):
    for key, value in ref.items():
      if value is None or isinstance(value, int):
        assert row[key] == value, (row["task"], key)
      else:
        assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (row["task"], key)


def test_evaluate_outputs_matches_the_per_task_reference():
  outputs = make_outputs()
  train_sizes = np.arange(len(FULL)) * 10 + 3
  result = evaluate_outputs(task_table(), outputs, TRAINED, train_sizes)
  assert isinstance(result, SplitResult)
  expected_rows, pooled = reference_evaluation(FULL, TRAINED, outputs["logits"],
                                               outputs["label"], outputs["task_id"])
  assert_rows_match(result.rows, expected_rows)
  held_out = TRAINED < FULL
  for t, row in enumerate(result.rows):
    assert row["task"] == f"shop-{t}" and row["train_examples"] == train_sizes[t]
    assert ("unseen_examples" in row) == held_out[t]
    assert row["skipped_records"] == row["skipped_train_records"] == 0
  # The edge cases are what the fixture says they are.
  no_examples, one_example, only_unseen = result.rows[3], result.rows[5], result.rows[6]
  assert no_examples["eval_examples"] == 0 and no_examples["accuracy"] is None
  assert no_examples["macro_auroc"] is None and no_examples["ece"] is None
  assert one_example["eval_examples"] == 1 and one_example["macro_auroc"] is None
  assert one_example["top5_accuracy"] is not None  # 6 trained classes.
  assert result.rows[2]["top5_accuracy"] is None  # 4 trained classes.
  assert only_unseen["eval_examples"] == 0 and only_unseen["unseen_examples"] == 5
  assert only_unseen["unseen_auroc"] is None and only_unseen["unseen_aupr"] == 1.0
  assert result.rows[4]["unseen_examples"] > 0 and result.rows[4]["unseen_auroc"] is not None

  expected_summary = reference_summary(expected_rows, pooled)
  for key, value in expected_summary.items():
    assert result.summary[key] == pytest.approx(value, rel=1e-9), key
  assert result.summary["skipped_records"] == result.summary["skipped_train_records"] == 0
  assert result.summary["tasks_evaluated"] == 5  # Tasks 3 and 6 have no seen example.

  calibration = result.calibration
  seen = outputs["label"] < TRAINED[outputs["task_id"]]
  assert calibration["num_examples"] == seen.sum() == sum(b["count"] for b in calibration["bins"])
  assert calibration["num_bins"] == 15
  assert calibration["ece"] == pytest.approx(pooled["ece"], rel=1e-9)
  json.dumps({"rows": result.rows, "summary": result.summary, "calibration": calibration},
             allow_nan=False)


@pytest.mark.parametrize("masked_value", [-1e30, 0.0, np.nan, np.inf])
def test_masked_columns_never_affect_results(masked_value):
  huge = evaluate_outputs(task_table(), make_outputs(masked_value=1e30), TRAINED, np.ones(7))
  other = evaluate_outputs(task_table(), make_outputs(masked_value=masked_value), TRAINED,
                           np.ones(7))
  assert other.rows == huge.rows
  assert other.summary == huge.summary
  assert other.calibration == huge.calibration
  # Extra padded columns change nothing either.
  outputs = make_outputs()
  outputs["logits"] = np.concatenate([outputs["logits"], np.full((len(outputs["label"]), 5),
                                                                 1e30, np.float32)], axis=1)
  assert evaluate_outputs(task_table(), outputs, TRAINED, np.ones(7)).rows == huge.rows


def test_result_does_not_depend_on_example_order():
  outputs = make_outputs(seed=3)
  base = evaluate_outputs(task_table(), outputs, TRAINED, np.ones(7))
  order = np.random.default_rng(0).permutation(len(outputs["label"]))
  shuffled = {k: v[order] for k, v in outputs.items()}
  again = evaluate_outputs(task_table(), shuffled, TRAINED, np.ones(7))
  for row, other in zip(base.rows, again.rows):
    assert row.keys() == other.keys()
    for key in row:
      assert other[key] == pytest.approx(row[key], rel=1e-12), key


def test_chunking_does_not_change_results(monkeypatch):
  outputs = make_outputs(seed=4)
  whole = evaluate_outputs(task_table(), outputs, TRAINED, np.ones(7))
  monkeypatch.setattr(report, "CHUNK_CELLS", 64)  # About one task per chunk.
  chunked = evaluate_outputs(task_table(), outputs, TRAINED, np.ones(7))
  for row, other in zip(whole.rows, chunked.rows):
    for key in row:
      assert other[key] == pytest.approx(row[key], rel=1e-12), key
  assert chunked.calibration["ece"] == pytest.approx(whole.calibration["ece"], rel=1e-12)


def test_without_held_out_classes_there_are_no_unseen_keys():
  full = np.array([4, 6])
  rng = np.random.default_rng(5)
  task_id = rng.integers(0, 2, 50)
  outputs = {"logits": rng.normal(size=(50, 6)).astype(np.float32),
             "label": rng.integers(0, full[task_id]), "task_id": task_id}
  result = evaluate_outputs(task_table(full), outputs, full, np.array([10, 20]))
  assert not any(k.startswith("unseen") for r in result.rows for k in r)
  assert not any("unseen" in k for k in result.summary)
  assert result.rows[0]["chance"] == 0.25 and result.rows[0]["top5_accuracy"] is None


def test_skipped_records_per_task_and_in_total():
  skipped = {"shop-1": {"missing_title": 2, "bad_label": 1}, "unknown-shop": {"unknown_task": 4}}
  train_skipped = {"shop-0": {"bad_label": 5}}
  result = evaluate_outputs(task_table(), make_outputs(), TRAINED, np.ones(7), skipped,
                            train_skipped)
  assert result.rows[1]["skipped_records"] == 3 and result.rows[0]["skipped_records"] == 0
  assert result.rows[0]["skipped_train_records"] == 5
  assert result.summary["skipped_records"] == 7  # Unknown tasks included.
  assert result.summary["skipped_train_records"] == 5


def test_bad_inputs_name_the_problem():
  outputs = make_outputs()
  table = task_table()
  with pytest.raises(ValueError, match="outside its 3 classes"):
    bad = dict(outputs, label=outputs["label"].copy())
    bad["label"][np.flatnonzero(outputs["task_id"] == 0)[0]] = 3
    evaluate_outputs(table, bad, TRAINED, np.ones(7))
  with pytest.raises(ValueError, match="one per task"):
    evaluate_outputs(table, outputs, TRAINED[:3], np.ones(7))
  with pytest.raises(ValueError, match="non-finite logits"):
    bad = dict(outputs, logits=outputs["logits"].copy())
    bad["logits"][0, 0] = np.nan
    evaluate_outputs(table, bad, TRAINED, np.ones(7))
  with pytest.raises(ValueError, match="trained_num_classes"):
    evaluate_outputs(table, outputs, np.minimum(TRAINED + 1, 99), np.ones(7))


def test_empty_split():
  outputs = {"logits": np.zeros((0, WIDTH), np.float32), "label": np.zeros(0, int),
             "task_id": np.zeros(0, int)}
  result = evaluate_outputs(task_table(), outputs, TRAINED, np.ones(7))
  assert result.summary["tasks_evaluated"] == 0 and result.summary["mean_accuracy"] is None
  assert result.summary["ece"] is None and result.calibration["num_examples"] == 0
  assert all(r["accuracy"] is None for r in result.rows)


def test_ten_thousand_tasks_take_seconds():
  rng = np.random.default_rng(6)
  num_tasks, per_task, width = 10_000, 100, 64
  full = np.minimum(2 + 3 * rng.pareto(1.0, num_tasks).astype(int), width)  # Long-tailed.
  trained = np.where(full - 1 >= 2, full - 1, full)
  table = task_table(full, [f"t{t}" for t in range(num_tasks)])
  task_id = rng.permutation(np.repeat(np.arange(num_tasks), per_task))
  outputs = {"logits": rng.normal(size=(task_id.size, width)).astype(np.float32),
             "label": rng.integers(0, full[task_id]), "task_id": task_id}
  start = time.perf_counter()
  result = evaluate_outputs(table, outputs, trained, np.full(num_tasks, 50))
  seconds = time.perf_counter() - start
  assert result.summary["tasks_evaluated"] == num_tasks
  assert 0.4 < result.summary["mean_macro_auroc"] < 0.6  # Random logits.
  assert seconds < 60, f"evaluate_outputs took {seconds:.1f} s for 10,000 tasks x 100"


# --- Files and the printed table ----------------------------------------------------------------

def test_write_report_files(tmp_path):
  result = evaluate_outputs(task_table(), make_outputs(), TRAINED, np.arange(7) + 1)
  write_report(tmp_path, "validation", 12, result)
  assert not (tmp_path / "reports" / "calibration.json").exists()  # The test split only.
  write_report(tmp_path, "test", 12, result, trained_steps=20)  # Step 12 was the best.
  reports = tmp_path / "reports"
  saved = json.loads((reports / "test.json").read_text())
  assert saved == {"split": "test", "step": 12, "trained_steps": 20, "summary": result.summary,
                   "tasks": result.rows}
  assert json.loads((reports / "validation.json").read_text())["trained_steps"] == 12
  calibration = json.loads((reports / "calibration.json").read_text())
  assert calibration == {"split": "test", **result.calibration}
  lines = list(csv.DictReader(io.StringIO((reports / "test.csv").read_text())))
  assert [line["task"] for line in lines] == [r["task"] for r in result.rows]
  header = list(lines[0])
  assert header[:5] == ["task", "num_classes", "trained_classes", "train_examples",
                        "eval_examples"]
  assert {"macro_auroc", "ece", "unseen_auroc", "unseen_aupr", "skipped_train_records"} <= set(
      header)
  assert lines[0]["unseen_auroc"] == ""  # Task 0 holds nothing out: an empty cell.
  assert lines[3]["accuracy"] == ""  # No examples: None is an empty cell.
  assert float(lines[1]["accuracy"]) == pytest.approx(result.rows[1]["accuracy"])


def test_summarize_rows_gathered_from_several_reports():
  """As single_task gathers per-task reports: pooled numbers are unknown there (None)."""
  result = evaluate_outputs(task_table(), make_outputs(), TRAINED, np.ones(7))
  summary = summarize(result.rows)
  assert summary["ece"] is None and summary["pooled_unseen_auroc"] is None
  for key in ("mean_accuracy", "mean_macro_auroc", "mean_ece", "mean_unseen_auroc"):
    assert summary[key] == result.summary[key]
  assert summarize([])["tasks_evaluated"] == 0


def test_format_table():
  result = evaluate_outputs(task_table(), make_outputs(), TRAINED, np.arange(7) * 100,
                            train_skipped={"shop-2": {"bad_label": 2}})
  text = format_table("validation", result.rows, result.summary, max_rows=3)
  lines = text.splitlines()
  # experiments/common.py parses the first line.
  match = re.match(r"^validation: \d+ tasks, mean accuracy ([0-9.]+|-)", lines[0])
  assert match and float(match.group(1)) == pytest.approx(result.summary["mean_accuracy"],
                                                          abs=1e-3)
  s = result.summary
  assert f"mean macro AUROC {s['mean_macro_auroc']:.3f}, ECE {s['ece']:.3f}" in text
  assert f"AUROC {s['mean_unseen_auroc']:.3f}" in text
  assert f"pooled AUROC {s['pooled_unseen_auroc']:.3f}" in text
  assert "2 in train" in text
  assert "shop-6" in text and "shop-0" not in text  # Largest first, cut to 3.
  assert text.endswith("... 4 more tasks in reports/validation.csv")
  plain = evaluate_outputs(task_table(FULL), make_outputs(), FULL, np.ones(7))
  assert "unseen" not in format_table("test", plain.rows, plain.summary)


def test_flatten():
  assert report.flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1]}) == {
      "a.b": 1, "a.c.d": "x", "e": [1]}

