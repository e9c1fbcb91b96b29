"""Single-task baselines: one-task catalogues, the per-task runs (slow), and the comparison."""
import csv
import json
import os
import re
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


def _report(workdir, accuracies, step=None):
  reports = workdir / "reports"
  reports.mkdir(parents=True)
  rows = [{"task": t, "accuracy": a} for t, a in accuracies.items()]
  report = {"split": "test", "tasks": rows}
  if step is not None:
    report["step"] = step
  (reports / "test.json").write_text(json.dumps(report))
  return workdir


def test_compare_refuses_a_task_that_only_shares_its_name(tmp_path):
  def report(name, classes):
    _report(tmp_path / name, {"a": 0.8, "b": 0.5})
    path = tmp_path / name / "reports" / "test.json"
    report = json.loads(path.read_text())
    for row in report["tasks"]:
      row.update(num_classes=classes if row["task"] == "b" else 4, trained_classes=4,
                 eval_examples=20)
    path.write_text(json.dumps(report))
    return tmp_path / name
  same, other = report("mtl", 4), report("single", 9)
  assert len(single_task.compare(same, report("single_same", 4))["tasks"]) == 2
  with pytest.raises(single_task.ComparisonError,
                     match=r"task 'b' has 4 classes \(4 trained\), 20 test products in .*mtl "
                           r"but 9 classes .* in .*single: not the same task. Fix: "):
    single_task.compare(same, other)


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


def test_compare_names_a_missing_run_or_report(tmp_path, capsys):
  single = _report(tmp_path / "single", {"a": 0.7})
  with pytest.raises(single_task.ComparisonError, match=r"mtl: no such run directory .*Fix: "):
    single_task.compare(tmp_path / "mtl", single)
  (tmp_path / "mtl").mkdir()
  with pytest.raises(single_task.ComparisonError, match=r"mtl/reports/test.json: missing"):
    single_task.compare(tmp_path / "mtl", single)
  other = _report(tmp_path / "other", {"z": 0.7})
  with pytest.raises(single_task.ComparisonError, match="No task has a test accuracy in both"):
    single_task.compare(other, single)
  # On the command line: one line with the fix, exit status 1.
  assert single_task.main(["single_task", "compare", f"--mtl={tmp_path / 'nothing'}",
                           f"--single={single}"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "no such run directory" in err and "Fix: " in err
  assert len(err.strip().splitlines()) == 1


# --- Hostile task names (issue 12.5) -------------------------------------------------------------

HOSTILE = ["/some/dir", "../x", "a/b", ".", "..", "", "x\x00y", "a\\b", "new\nline", " sp ace ",
           "-rf", "~", "$HOME", "C:\\Windows", "Zalando Österreich", "\udcff", "x" * 300,
           ".hidden", "trailing.", "a_b", "a-b", "site0001", "a//b", "../../../outside",
           "tasks/../../outside"]


def test_task_dir_name_is_safe_stable_and_distinct():
  # A safe-looking name shaped like a hashed one must not collide with the name it mimics.
  mimic = single_task.task_dir_name("a/b")
  names = HOSTILE + [mimic]
  dirs = [single_task.task_dir_name(n) for n in names]
  assert dirs == [single_task.task_dir_name(n) for n in names]  # Stable.
  assert len(set(dirs)) == len(names), dirs  # Distinct names, distinct directories.
  for name, d in zip(names, dirs):
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", d), (name, d)
    assert d not in (".", "..") and len(d) <= 71, (name, d)
  plain = {n: d for n, d in zip(names, dirs) if d == n}
  assert sorted(plain) == ["a-b", "a_b", "site0001"]  # Only plain names are kept as they are.
  assert mimic.startswith("a_b-") and single_task.task_dir_name(mimic) != mimic
  assert single_task.task_dir_name("Zalando Österreich").startswith("Zalando_Osterreich-")
  assert single_task.task_dir_name("").startswith("task-")


def test_task_paths_stay_inside_the_workdir(tmp_path):
  work = tmp_path / "work"
  for name in HOSTILE:
    catalogue_dir, run_dir = single_task.task_paths(work, name)
    assert catalogue_dir.parent == work / "catalogues", name
    assert run_dir.parent == work / "tasks", name
    assert catalogue_dir.name == run_dir.name == single_task.task_dir_name(name)
  # A link out of the workdir is refused before anything is written through it.
  (tmp_path / "elsewhere").mkdir()
  work.mkdir(exist_ok=True)
  (work / "tasks").symlink_to(tmp_path / "elsewhere")
  with pytest.raises(single_task.UnsafePathError, match="not inside the workdir"):
    single_task.task_paths(work, "site0001")


def test_subset_catalogue_never_deletes_outside_or_a_non_catalogue(write_catalogue, tmp_path):
  source = write_catalogue(tmp_path / "full", {"a": ["x", "y"]},
                           {"train": [{"id": "1", "task": "a", "label": "x", "title": "t"}]})
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "keep.txt").write_text("mine")
  with pytest.raises(single_task.UnsafePathError, match="not inside the workdir"):
    single_task.write_subset_catalogue(source, outside, ["a"], within=tmp_path / "work")
  with pytest.raises(single_task.UnsafePathError, match="not inside the workdir"):
    single_task.write_subset_catalogue(source, tmp_path / "work" / ".." / "outside", ["a"],
                                       within=tmp_path / "work")
  # Even without `within`, a directory that is not a catalogue is never deleted.
  with pytest.raises(single_task.UnsafePathError, match="is not a catalogue directory"):
    single_task.write_subset_catalogue(source, outside, ["a"])
  assert (outside / "keep.txt").read_text() == "mine"
  assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def _snapshot(root, skip):
  """{relative path: (is_dir, bytes)} of everything under `root` except under `skip`."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    if os.path.commonpath([dirpath, str(skip)]) == str(skip):
      continue
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      if os.path.commonpath([path, str(skip)]) == str(skip):
        continue
      is_dir = os.path.isdir(path) and not os.path.islink(path)
      out[os.path.relpath(path, root)] = (is_dir, b"" if is_dir else open(path, "rb").read())
  return out


def _fake_train(calls):
  """Stands in for train.train_and_evaluate: records the call, writes a run's two reports."""

  def train_and_evaluate(config, workdir):
    table = cat.read_task_table(config.data.catalogue_dir)
    (name,) = table.names
    with open(os.path.join(config.data.catalogue_dir, "train.jsonl")) as f:
      num_train = sum(1 for line in f if line.strip())
    calls.append({"task": name, "catalogue": config.data.catalogue_dir, "workdir": workdir,
                  "steps": config.total_steps, "warmup": config.optimizer.warmup_steps})
    reports = os.path.join(workdir, "reports")
    os.makedirs(reports, exist_ok=True)
    for split in ("validation", "test"):
      row = {"task": name, "num_classes": 2, "train_examples": num_train, "eval_examples": 1,
             "accuracy": 0.5, "top5_accuracy": 1.0, "chance": 0.5, "loss": 0.7}
      with open(os.path.join(reports, f"{split}.json"), "w") as f:
        json.dump({"split": split, "step": config.total_steps, "summary": {}, "tasks": [row]}, f)

  return train_and_evaluate


def test_baselines_with_hostile_task_names_touch_nothing_outside_the_workdir(
    write_catalogue, tmp_path, monkeypatch, capsys):
  from mtl_jax import train
  from tests.helpers import tiny_config
  # Absolute names point into tmp_path, so that a regression writes nothing outside it.
  names = [n for n in HOSTILE if n and not n.startswith("/")] + [
      f"{tmp_path}/outside", f"{tmp_path}/outside/keep.txt", f"{tmp_path}/work"]
  records = [{"id": str(i), "task": n, "label": "x", "title": "t"} for i, n in enumerate(names)]
  source = write_catalogue(tmp_path / "full", {n: ["x", "y"] for n in names},
                           {"train": records, "test": records})
  (tmp_path / "outside").mkdir()
  (tmp_path / "outside" / "keep.txt").write_text("mine")
  (tmp_path / "work" / "x").mkdir(parents=True)  # Where "../x" would land from catalogues/.
  work = tmp_path / "work"
  before = _snapshot(tmp_path, work)
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_train(calls))
  config = tiny_config(**{"data.catalogue_dir": str(source), "data.tokenizer_dir": "given"})
  results = single_task.train_single_task_baselines(config, work)
  assert results["test"]["tasks_evaluated"] == len(names)
  assert sorted(c["task"] for c in calls) == sorted(names)
  for c in calls:
    d = single_task.task_dir_name(c["task"])
    assert c["workdir"] == str(work / "tasks" / d)
    assert c["catalogue"] == str(work / "catalogues" / d)
  assert sorted(p.name for p in (work / "tasks").iterdir()) == sorted(
      single_task.task_dir_name(n) for n in names)
  assert sorted(os.listdir(work / "x")) == []
  printed = capsys.readouterr().out
  assert "'x\\x00y'" in printed  # Unprintable names are shown quoted.
  # Run again after damaging one catalogue and one run: the catalogue is rewritten (deleted and
  # written again) and the run retrained, both inside the workdir.
  (single_task.task_paths(work, "..")[0] / cat.COMPLETE_MARKER).unlink()
  for split in ("validation", "test"):
    (single_task.task_paths(work, "..")[1] / "reports" / f"{split}.json").unlink()
  calls.clear()
  single_task.train_single_task_baselines(config, work)
  assert [c["task"] for c in calls] == [".."]
  assert cat.is_complete(single_task.task_paths(work, "..")[0])
  assert "done earlier" in capsys.readouterr().out
  assert _snapshot(tmp_path, work) == before  # Nothing outside the workdir was made or removed.
  gathered = json.loads((work / "reports" / "test.json").read_text())
  assert [r["task"] for r in gathered["tasks"]] == names


# --- Steps per task (issue 15) ------------------------------------------------------------------

def test_steps_policy_sizes_each_task_by_its_train_split(write_catalogue, tmp_path, monkeypatch,
                                                          capsys):
  from mtl_jax import train
  from tests.helpers import tiny_config
  line = lambda i, task: {"id": str(i), "task": task, "label": "x", "title": "t"}
  source = write_catalogue(
      tmp_path / "full", {"small": ["x", "y"], "big": ["x", "y"]},
      {"train": [line(i, "small") for i in range(3)] + [line(10 + i, "big") for i in range(40)],
       "test": [line(99, "small"), line(98, "big")]})
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_train(calls))
  config = tiny_config(**{"data.catalogue_dir": str(source), "data.tokenizer_dir": "given",
                          "batch_size": 4, "total_steps": 50, "optimizer.warmup_steps": 10})

  # Default policy: epochs. small: ceil(2 * 3 / 4) = 2 -> min_steps 5; big: ceil(2 * 40 / 4) = 20.
  single_task.train_single_task_baselines(config, tmp_path / "w1", epochs=2, min_steps=5)
  got = {c["task"]: (c["steps"], c["warmup"]) for c in calls}
  assert got == {"small": (5, 1), "big": (20, 4)}  # Warmup keeps its 10/50 share of the run.
  printed = capsys.readouterr().out
  assert "big: training a single-task model in" in printed
  assert "20 steps (40 train examples, 2.0 epochs at batch 4; steps policy epochs)" in printed
  plan = json.loads((tmp_path / "w1" / "steps.json").read_text())
  assert plan["policy"] == "epochs" and plan["epochs"] == 2 and plan["min_steps"] == 5
  assert plan["tasks"]["big"] == {"dir": "big", "train_examples": 40, "steps": 20,
                                  "epochs": 2.0, "policy": "epochs"}
  report = json.loads((tmp_path / "w1" / "tasks" / "small" / "reports" / "test.json").read_text())
  assert report["step"] == 5

  # Capped by the config's total_steps: ceil(10 * 40 / 4) = 100 -> 50, warmup as configured.
  calls.clear()
  single_task.train_single_task_baselines(config, tmp_path / "w2", tasks=["big"], epochs=10)
  assert [(c["steps"], c["warmup"]) for c in calls] == [(50, 10)]

  # --steps: the same fixed count for every task.
  calls.clear()
  single_task.train_single_task_baselines(config, tmp_path / "w3", steps=7)
  assert sorted(c["steps"] for c in calls) == [7, 7]
  assert json.loads((tmp_path / "w3" / "steps.json").read_text())["policy"] == "fixed"

  calls.clear()
  single_task.train_single_task_baselines(config, tmp_path / "w4", steps_policy="fixed")
  assert sorted(c["steps"] for c in calls) == [50, 50]


def test_steps_policy_arguments():
  assert single_task.resolve_steps_policy() == "epochs"  # The documented default.
  assert single_task.resolve_steps_policy(steps=10) == "fixed"
  for kwargs, message in [
      ({"steps": 10, "steps_policy": "epochs"}, "--steps gives every task the same count"),
      ({"steps_policy": "uniform"}, "unknown"),
      ({"epochs": 0}, "epochs=0: not a positive number"),
      ({"epochs": float("nan")}, "epochs=nan"),
      ({"min_steps": 0}, "min_steps=0"),
      ({"steps": 0}, "steps=0: not a positive number"),
  ]:
    with pytest.raises(single_task.StepsPolicyError, match=message + ".*Fix: "):
      single_task.resolve_steps_policy(**kwargs)
  config = single_task_config = type("C", (), {"total_steps": 600, "batch_size": 32})()
  assert single_task.steps_for_task(config, 160) == 100  # 20 epochs of 160 at batch 32.
  assert single_task.steps_for_task(config, 10) == 50  # The min_steps floor.
  assert single_task.steps_for_task(config, 2400) == 600  # Capped by total_steps.
  assert single_task.steps_for_task(config, 160, "fixed") == 600
  del single_task_config


@pytest.mark.parametrize("flags,message", [
    (["--steps=4", "--steps_policy=epochs"], "steps=4 with steps_policy='epochs'"),
    (["--steps=0"], "steps=0: not a positive number"),
])
def test_command_line_rejects_bad_step_settings_in_one_line(tmp_path, flags, message):
  proc = subprocess.run(
      [sys.executable, "-m", "mtl_jax.single_task", "--config=configs/demo.py:tiny",
       f"--workdir={tmp_path / 'w'}", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert f"error: {message}" in proc.stderr and "Fix: " in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


# --- Comparison: step budgets and several runs per side (issue 13) -------------------------------

def test_compare_warns_when_the_step_budgets_differ(tmp_path, capsys):
  mtl = _report(tmp_path / "mtl", {"a": 0.8, "b": 0.5}, step=600)
  single = _report(tmp_path / "single", {"a": 0.7, "b": 0.6}, step=600)
  for task, step in (("a", 100), ("b", 600)):  # Per-task runs, as the runner lays them out.
    _report(single / "tasks" / task, {task: 0.7}, step=step)
  result = single_task.compare(mtl, single)
  warning = ("WARNING: different step budgets: multi-task 600 steps, single-task 100 to 600 "
             "steps (varying by task or run), for 1 of the 2 compared tasks; the accuracy gaps "
             "mix the models with their training lengths.")
  assert result["warnings"] == [warning]
  assert result["step_budgets"] == {"mtl": [600], "single": [100, 600], "same": False,
                                    "tasks_with_different_budgets": ["a"]}
  written = json.loads((single / "reports" / "comparison.json").read_text())
  assert written["warnings"] == [warning] and written["step_budgets"]["same"] is False
  assert single_task.main(["single_task", "compare", f"--mtl={mtl}", f"--single={single}"]) == 0
  assert capsys.readouterr().out.splitlines()[0] == warning

  # The same budget on both sides: no warning.
  same = _report(tmp_path / "same", {"a": 0.7, "b": 0.6}, step=600)
  result = single_task.compare(mtl, same)
  assert result["warnings"] == [] and result["step_budgets"]["same"] is True
  assert "WARNING" not in single_task.format_comparison(result)


def test_compare_several_runs_per_side_mean_std_and_wins(tmp_path, capsys):
  mtl = [_report(tmp_path / f"mtl{i}", acc, step=600) for i, acc in enumerate([
      {"t1": 0.8, "t2": 0.6, "t3": 0.5}, {"t1": 0.9, "t2": 0.6, "t3": 0.5},
      {"t1": 0.7, "t2": 0.6}])]
  single = [_report(tmp_path / f"single{i}", acc, step=600) for i, acc in enumerate([
      {"t1": 0.5, "t2": 0.7, "t3": 0.1}, {"t1": 0.7, "t2": 0.7, "t3": 0.1}])]
  result = single_task.compare(mtl, single)
  t1, t2 = result["tasks"]
  assert t1["task"] == "t1" and (t1["mtl_runs"], t1["single_runs"]) == (3, 2)
  assert t1["mtl_accuracy"] == pytest.approx(0.8) and t1["mtl_std"] == pytest.approx(0.1)
  assert t1["single_accuracy"] == pytest.approx(0.6)
  assert t1["single_std"] == pytest.approx(0.02 ** 0.5)
  assert t1["difference"] == pytest.approx(0.2)
  assert t1["difference_std"] == pytest.approx((0.01 + 0.02) ** 0.5)
  assert t2["difference"] == pytest.approx(-0.1) and t2["difference_std"] == pytest.approx(0.0)
  assert result["not_compared"] == ["t3"]  # Missing from one multi-task run.
  s = result["summary"]
  assert (s["mtl_runs"], s["single_runs"], s["tasks_compared"]) == (3, 2, 2)
  assert (s["mtl_wins"], s["single_wins"], s["ties"]) == (1, 1, 0)
  assert s["mean_difference"] == pytest.approx(0.05)
  assert s["mean_mtl_accuracy_std"] == pytest.approx(0.05)  # Run means 0.7, 0.75, 0.65.
  assert s["mean_single_accuracy_std"] == pytest.approx(0.005 ** 0.5)  # 0.6, 0.7.
  assert s["mean_difference_std"] == pytest.approx((0.0025 + 0.005) ** 0.5)
  assert result["mtl_workdirs"] == [str(p) for p in mtl]
  with open(single[0] / "reports" / "comparison.csv") as f:
    rows = list(csv.DictReader(f))
  assert float(rows[0]["difference_std"]) == pytest.approx((0.03) ** 0.5)

  # The command line: comma-separated runs per side.
  assert single_task.main(["single_task", "compare", "--mtl=" + ",".join(map(str, mtl)),
                           "--single=" + ",".join(map(str, single)),
                           f"--out={tmp_path / 'out'}"]) == 0
  printed = capsys.readouterr().out
  assert ("test: multi-task (3 runs) vs single-task (2 runs) accuracy over 2 tasks: mean and std "
          "over runs") in printed
  assert "t1                             0.800  0.100   0.600  0.141  +0.200  0.173" in printed
  assert "mean                           0.700  0.050   0.650  0.071  +0.050  0.087" in printed
  assert "multi-task wins 1, single-task wins 1, ties 0" in printed
  assert "not compared (no accuracy in every run of both sides): t3" in printed
  written = json.loads((tmp_path / "out" / "comparison.json").read_text())
  assert written["summary"] == s


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
  # Other settings do not pass for the finished runs: the re-run names what differs.
  for changed, expected in (("--steps=5", "was trained for 4 steps; these settings give 5"),
                            ("--config.optimizer.learning_rate=0.01",
                             "config.optimizer.learning_rate")):
    other = subprocess.run(command[:-1] + [changed] if changed.startswith("--steps")
                           else command + [changed], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 1 and expected in other.stderr, other.stderr[-2000:]
    assert "Traceback" not in other.stderr and "Fix:" in other.stderr
