"""Single-task baselines: one-task catalogues, the per-task runs (slow), and the comparison."""
import csv
import json
import os
import subprocess
import sys

import pytest

from mtl_jax import catalogue as cat
from mtl_jax import single_task
from tests.trained_run import tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_subset_catalogue_keeps_the_tasks_lines_and_image_rows(write_catalogue, tmp_path):
  source = write_catalogue(
      tmp_path / "full", {"a": ["x", "y"], "b": ["u", "v", "w"], "c": ["z"]},
      {"train": [{"id": "1", "task": "a", "label": "x", "title": "t", "images": [1]},
                 {"id": "2", "task": "b", "label": "w", "title": "t", "images": [7, 2]},
                 "not json",
                 {"id": "3", "task": "c", "label": "z", "title": "t"},
                 {"id": "4", "task": "b", "label": "u", "title": "t"}],
       "test": [{"id": "5", "task": "b", "label": "v", "title": "t"}]})
  out = single_task.write_subset_catalogue(source, tmp_path / "sub", ["b"])
  table = cat.read_task_table(out)
  assert table.names == ("b",) and table.class_names == (("u", "v", "w"),)
  ids = lambda split: [json.loads(line)["id"]
                       for line in (out / f"{split}.jsonl").read_text().splitlines()]
  assert ids("train") == ["2", "4"] and ids("validation") == [] and ids("test") == ["5"]
  assert (out / cat.EMBEDDINGS_FILE).resolve() == (source / cat.EMBEDDINGS_FILE).resolve()
  _, indices = cat.index_catalogue(out)  # A valid catalogue: image rows still resolve.
  assert len(indices["train"]) == 2
  mtime = (out / cat.TASKS_FILE).stat().st_mtime_ns
  single_task.write_subset_catalogue(source, tmp_path / "sub", ["b"])  # Reused as it is.
  assert (out / cat.TASKS_FILE).stat().st_mtime_ns == mtime
  with pytest.raises(cat.CatalogueError, match=r"\['d'\] are not tasks of this catalogue"):
    single_task.write_subset_catalogue(source, tmp_path / "other", ["a", "d"])


def _report(workdir, accuracies):
  reports = workdir / "reports"
  reports.mkdir(parents=True)
  rows = [{"task": t, "accuracy": a} for t, a in accuracies.items()]
  (reports / "test.json").write_text(json.dumps({"split": "test", "tasks": rows}))
  return workdir


def test_compare_per_task_differences_means_and_wins(tmp_path, capsys):
  mtl = _report(tmp_path / "mtl", {"a": 0.8, "b": 0.5, "c": 0.6, "d": None})
  single = _report(tmp_path / "single", {"a": 0.7, "b": 0.5, "c": 0.9, "e": 0.4})
  result = single_task.compare(mtl, single)
  assert [r["task"] for r in result["tasks"]] == ["a", "b", "c"]
  assert [r["difference"] for r in result["tasks"]] == pytest.approx([0.1, 0.0, -0.3])
  s = result["summary"]
  assert s["tasks_compared"] == 3
  assert s["mean_mtl_accuracy"] == pytest.approx(1.9 / 3)
  assert s["mean_single_accuracy"] == pytest.approx(2.1 / 3)
  assert s["mean_difference"] == pytest.approx(-0.2 / 3)
  assert (s["mtl_wins"], s["single_wins"], s["ties"]) == (1, 1, 1)
  assert result["not_compared"] == ["d", "e"]
  written = json.loads((single / "reports" / "comparison.json").read_text())
  assert written["summary"] == s
  with open(single / "reports" / "comparison.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["task"] for r in rows] == ["a", "b", "c"]
  assert float(rows[2]["difference"]) == pytest.approx(-0.3)

  assert single_task.main(["single_task", "compare", f"--mtl={mtl}", f"--single={single}",
                           f"--out={tmp_path / 'out'}"]) == 0
  printed = capsys.readouterr().out
  assert "multi-task wins 1, single-task wins 1, ties 1" in printed and "-0.300" in printed
  assert (tmp_path / "out" / "comparison.csv").exists()


def test_compare_names_a_missing_report(tmp_path):
  single = _report(tmp_path / "single", {"a": 0.7})
  with pytest.raises(FileNotFoundError, match=r"mtl/reports/test.json: missing"):
    single_task.compare(tmp_path / "mtl", single)
  other = _report(tmp_path / "other", {"z": 0.7})
  with pytest.raises(ValueError, match="No task has a test accuracy in both"):
    single_task.compare(other, single)


@pytest.mark.slow
def test_baselines_for_two_tasks_then_compare_with_the_multi_task_run(tmp_path_factory):
  """The command line trains site0001 and site0002 alone (4 steps each) on the tiny config's
  catalogue, with the multi-task run's vocabulary; `compare` reads both runs' reports."""
  mtl = tiny_run(tmp_path_factory)
  workdir = tmp_path_factory.mktemp("single")
  command = [sys.executable, "-m", "mtl_jax.single_task", "--config=configs/demo.py:tiny",
             f"--workdir={workdir}", "--tasks=site0001,site0002", "--steps=4"]
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for task in ("site0001", "site0002"):
    report = json.loads((workdir / "tasks" / task / "reports" / "test.json").read_text())
    assert [r["task"] for r in report["tasks"]] == [task] and report["step"] == 4
  gathered = json.loads((workdir / "reports" / "test.json").read_text())
  assert [r["task"] for r in gathered["tasks"]] == ["site0001", "site0002"]
  assert gathered["summary"]["tasks_evaluated"] == 2
  assert (workdir / "reports" / "test.csv").exists()
  # One vocabulary for every baseline: the one the multi-task run built from the same catalogue.
  assert (workdir / "tokenizer" / "vocab.txt").read_text() == (
      mtl / "tokenizer" / "vocab.txt").read_text()
  # Each baseline keeps a copy of the shared vocabulary beside its checkpoints.
  from mtl_jax import tokenizer as tokenizer_lib
  copied = tokenizer_lib.load_tokenizer(workdir / "tasks" / "site0001" / "tokenizer")
  assert copied.get_vocab() == tokenizer_lib.load_tokenizer(mtl / "tokenizer").get_vocab()

  result = single_task.compare(mtl, workdir)
  mtl_rows = {r["task"]: r for r in json.loads((mtl / "reports" / "test.json").read_text())
              ["tasks"]}
  assert [r["task"] for r in result["tasks"]] == ["site0001", "site0002"]
  for row, single_row in zip(result["tasks"], gathered["tasks"]):
    assert row["mtl_accuracy"] == mtl_rows[row["task"]]["accuracy"]
    assert row["single_accuracy"] == single_row["accuracy"]
  assert sorted(result["not_compared"]) == ["site0000", "site0003", "site0004", "site0005"]

  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and again.stdout.count("done earlier") == 2
