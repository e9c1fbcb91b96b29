"""Single-task baselines: one model per task, and their comparison with the multi-task model.

  python -m mtl_jax.single_task --config=configs/demo.py --workdir=runs/single \
      [--tasks=site0001,site0002] [--steps=N]
  python -m mtl_jax.single_task compare --mtl=runs/demo --single=runs/single [--out=DIR]

Baselines. For each chosen task (default: every task of the catalogue) the runner writes a
one-task catalogue `<workdir>/catalogues/<task>/` (tasks.json with that task alone, the task's
lines of each split file, and a link to the full catalogue's image_embeddings.npy, whose row
indices the lines keep), then trains it with `train.train_and_evaluate` into
`<workdir>/tasks/<task>/`: the same config (model, optimiser, batch size, evaluation) with
`data.catalogue_dir` pointing at the one-task catalogue and `total_steps` set to `--steps`
(default: the config's own). The catalogue is the config's (`data.catalogue_dir`) or, when that
is empty, the synthetic one its `data.synthetic` generates, exactly as the multi-task run does.

Every baseline shares one tokenizer: the one the multi-task run would use (the config's
`data.tokenizer_dir` or `model.text_init`, or else a vocabulary built from the full catalogue's
train split into `<workdir>/tokenizer`), so that a baseline differs from the multi-task model only
in its training data, not in its vocabulary.

Each task's run writes its own `reports/{validation,test}.json`; the runner gathers their rows
into `<workdir>/reports/{validation,test}.{json,csv}` in the format of `evaluation.write_report`
(one row per task), so the two kinds of run read the same way. Re-running the command skips the
tasks whose report exists and resumes an interrupted one from its checkpoint.

Comparison. `compare(mtl_workdir, single_workdir)` reads both test reports and writes, per task
present in both, the multi-task and single-task accuracy and their difference, the means over
those tasks and how many tasks each side wins (`comparison.{json,csv}` in `<single>/reports` by
default), and prints the table.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mtl_jax import catalogue as cat
from mtl_jax import evaluation

TASKS_SUBDIR = "tasks"
CATALOGUES_SUBDIR = "catalogues"
COMPARISON_FILE = "comparison"


# --- One-task catalogues ------------------------------------------------------------------------

def write_subset_catalogue(source_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           task_names: Sequence[str]) -> Path:
  """Writes a catalogue holding only `task_names` of `source_dir` (in that order).

  Each split keeps the lines whose `task` is one of the names, byte for byte; lines that are not
  JSON objects are left out (the full catalogue's own validation reports them). The embedding
  file is linked (copied where links are not possible), so image row indices stay valid. An
  existing `out_dir` with the same task list and a `_COMPLETE` marker is reused.

  Raises:
    CatalogueError: a name that is not a task of the source catalogue.
  """
  source_dir, out_dir = Path(source_dir), Path(out_dir)
  table = cat.read_task_table(source_dir)
  unknown = [n for n in task_names if not table.has_task(n)]
  if unknown:
    raise cat.CatalogueError(
        f"{source_dir / cat.TASKS_FILE}, field 'tasks': {unknown} are not tasks of this "
        f"catalogue. Fix: choose among its {table.num_tasks} tasks "
        f"({', '.join(table.names[:5])}{', ...' if table.num_tasks > 5 else ''}).")
  subset = cat.TaskTable(
      names=tuple(task_names),
      class_names=tuple(table.class_names[table.task_index(n)] for n in task_names),
      image_dim=table.image_dim, max_images=table.max_images)
  tasks_json = json.dumps(subset.to_json(), indent=1) + "\n"
  if (cat.is_complete(out_dir) and (out_dir / cat.TASKS_FILE).exists()
      and (out_dir / cat.TASKS_FILE).read_text(encoding="utf-8") == tasks_json):
    return out_dir
  if out_dir.exists():
    shutil.rmtree(out_dir)  # An incomplete or different subset: written again.
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  wanted = set(task_names)
  for split in cat.SPLITS:
    source = source_dir / cat.split_file(split)
    with open(source, "rb") as fin, open(tmp / cat.split_file(split), "wb") as fout:
      for line in fin:
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if isinstance(record, dict) and record.get("task") in wanted:
          fout.write(line if line.endswith(b"\n") else line + b"\n")
  embeddings = source_dir / cat.EMBEDDINGS_FILE
  if embeddings.exists():
    try:
      os.symlink(embeddings.resolve(), tmp / cat.EMBEDDINGS_FILE)
    except OSError:
      shutil.copyfile(embeddings, tmp / cat.EMBEDDINGS_FILE)
  (tmp / cat.TASKS_FILE).write_text(tasks_json, encoding="utf-8")
  (tmp / cat.COMPLETE_MARKER).write_text("")
  tmp.rename(out_dir)
  return out_dir


def source_catalogue(config, workdir: str | os.PathLike) -> Path:
  """The catalogue the config trains on; the synthetic one is generated into `<workdir>/catalogue`
  (deterministic by its config: the same catalogue the multi-task run generates)."""
  if config.data.catalogue_dir:
    return Path(config.data.catalogue_dir)
  from mtl_jax import synthetic  # Local: only synthetic runs need the generator.
  out = Path(workdir) / "catalogue"
  synthetic.generate_catalogue(out, config.data.synthetic)
  return out


def shared_tokenizer_dir(config, workdir: str | os.PathLike, catalogue_dir: Path) -> str:
  """A tokenizer directory every baseline uses ("" when the config already names one)."""
  if config.data.tokenizer_dir or config.model.text_init:
    return ""
  from mtl_jax import tfds_builder  # Local: keeps `compare` free of TFDS and TensorFlow.
  from mtl_jax import tokenizer as tokenizer_lib
  out = Path(workdir) / "tokenizer"
  if not (out / tokenizer_lib.VOCAB_FILE).exists():
    full = tfds_builder.load_catalogue(str(catalogue_dir), str(Path(workdir) / "prepared"),
                                       on_bad_record=config.data.on_bad_record)
    tokenizer_lib.build_tokenizer(full, out, config.data.vocab_size)
  return os.fspath(out)


# --- Baselines ----------------------------------------------------------------------------------

def _task_config(config, catalogue_dir: Path, tokenizer_dir: str, steps: int | None):
  task_config = copy.deepcopy(config)
  with task_config.unlocked():
    task_config.data.catalogue_dir = os.fspath(catalogue_dir)
    if tokenizer_dir:
      task_config.data.tokenizer_dir = tokenizer_dir
    if steps is not None:
      if steps <= 0:
        raise ValueError(f"steps={steps}: use a positive number of train steps per task.")
      task_config.total_steps = steps
  return task_config


def _read_report(path: Path) -> dict:
  return json.loads(path.read_text(encoding="utf-8"))


def train_single_task_baselines(config, workdir: str | os.PathLike,
                                tasks: Iterable[str] | None = None,
                                steps: int | None = None) -> dict:
  """Trains one model per task and gathers their reports.

  Args:
    config: the multi-task run's config (any catalogue, model and optimiser settings).
    workdir: where the catalogues, runs and gathered reports go.
    tasks: task names; None: every task of the catalogue.
    steps: train steps per task; None: the config's `total_steps`.

  Returns:
    {"validation": summary, "test": summary} over the chosen tasks' single-task runs.
  """
  from mtl_jax import train  # Local: keeps `compare` light.
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  full_dir = source_catalogue(config, workdir)
  table = cat.read_task_table(full_dir)
  names = list(table.names) if tasks is None else list(tasks)
  if not names:
    raise ValueError("tasks: no task chosen. Fix: name at least one task, or leave --tasks "
                     "empty for all of them.")
  tokenizer_dir = shared_tokenizer_dir(config, workdir, full_dir)
  for i, name in enumerate(names):
    run_dir = workdir / TASKS_SUBDIR / name
    if (run_dir / "reports" / "test.json").exists():
      print(f"[{i + 1}/{len(names)}] {name}: done earlier ({run_dir}/reports)", flush=True)
      continue
    print(f"[{i + 1}/{len(names)}] {name}: training a single-task model in {run_dir}",
          flush=True)
    task_catalogue = write_subset_catalogue(full_dir, workdir / CATALOGUES_SUBDIR / name, [name])
    train.train_and_evaluate(_task_config(config, task_catalogue, tokenizer_dir, steps),
                             str(run_dir))
  results = {}
  for split in ("validation", "test"):
    reports = [_read_report(workdir / TASKS_SUBDIR / n / "reports" / f"{split}.json")
               for n in names]
    rows = [row for report in reports for row in report["tasks"]]
    results[split] = evaluation.summarize(rows)
    evaluation.write_report(workdir, split, max(r["step"] for r in reports), rows,
                            results[split])
    print(evaluation.format_table(f"single-task {split}", rows, results[split]), flush=True)
  return results


# --- Comparison ---------------------------------------------------------------------------------

def _accuracies(report_path: Path) -> dict[str, float | None]:
  if not report_path.exists():
    raise FileNotFoundError(f"{report_path}: missing. Fix: finish the run first (its test "
                            "report is written at the end of training).")
  return {r["task"]: r["accuracy"] for r in _read_report(report_path)["tasks"]}


def compare(mtl_workdir: str | os.PathLike, single_workdir: str | os.PathLike,
            out_dir: str | os.PathLike | None = None, split: str = "test") -> dict:
  """Per-task multi-task vs single-task accuracy on `split`.

  Only tasks in both reports with an accuracy on both sides are compared; the others are listed
  under `not_compared`. A task is a win for the side with the higher accuracy (equal: a tie).

  Returns:
    {"split", "tasks": [{"task", "mtl_accuracy", "single_accuracy", "difference"}],
     "summary": {"tasks_compared", "mean_mtl_accuracy", "mean_single_accuracy",
                 "mean_difference", "mtl_wins", "single_wins", "ties"}, "not_compared"}
    (difference = MTL - single), also written to `<out_dir>/comparison.{json,csv}` (default
    out_dir: `<single_workdir>/reports`).
  """
  mtl = _accuracies(Path(mtl_workdir) / "reports" / f"{split}.json")
  single = _accuracies(Path(single_workdir) / "reports" / f"{split}.json")
  rows, not_compared = [], []
  for task in list(mtl) + [t for t in single if t not in mtl]:
    a, b = mtl.get(task), single.get(task)
    if a is None or b is None:
      not_compared.append(task)
      continue
    rows.append({"task": task, "mtl_accuracy": a, "single_accuracy": b, "difference": a - b})
  if not rows:
    raise ValueError(f"No task has a {split} accuracy in both {mtl_workdir} and "
                     f"{single_workdir}. Fix: compare runs over the same catalogue.")
  diff = np.array([r["difference"] for r in rows])
  summary = {
      "tasks_compared": len(rows),
      "mean_mtl_accuracy": float(np.mean([r["mtl_accuracy"] for r in rows])),
      "mean_single_accuracy": float(np.mean([r["single_accuracy"] for r in rows])),
      "mean_difference": float(diff.mean()),
      "mtl_wins": int(np.sum(diff > 0)),
      "single_wins": int(np.sum(diff < 0)),
      "ties": int(np.sum(diff == 0)),
  }
  result = {"split": split, "mtl_workdir": os.fspath(mtl_workdir),
            "single_workdir": os.fspath(single_workdir), "summary": summary, "tasks": rows,
            "not_compared": not_compared}
  out = Path(out_dir) if out_dir is not None else Path(single_workdir) / "reports"
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{COMPARISON_FILE}.json").write_text(json.dumps(result, indent=1))
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  (out / f"{COMPARISON_FILE}.csv").write_text(buffer.getvalue())
  return result


def format_comparison(result: dict) -> str:
  s = result["summary"]
  lines = [f"{result['split']}: multi-task vs single-task accuracy over {s['tasks_compared']} "
           "tasks",
           f"{'task':<28} {'mtl':>7} {'single':>7} {'diff':>7}"]
  for r in result["tasks"]:
    lines.append(f"{r['task'][:28]:<28} {r['mtl_accuracy']:>7.3f} {r['single_accuracy']:>7.3f} "
                 f"{r['difference']:>+7.3f}")
  lines.append(f"{'mean':<28} {s['mean_mtl_accuracy']:>7.3f} {s['mean_single_accuracy']:>7.3f} "
               f"{s['mean_difference']:>+7.3f}")
  lines.append(f"multi-task wins {s['mtl_wins']}, single-task wins {s['single_wins']}, "
               f"ties {s['ties']}")
  if result["not_compared"]:
    lines.append(f"not compared (no accuracy on one side): {', '.join(result['not_compared'])}")
  return "\n".join(lines)


# --- Command line -------------------------------------------------------------------------------

def _compare_main(argv: Sequence[str]) -> int:
  import argparse
  parser = argparse.ArgumentParser(
      prog="python -m mtl_jax.single_task compare",
      description="Per-task accuracy of a multi-task run vs single-task baselines.")
  parser.add_argument("--mtl", required=True, help="The multi-task run's workdir.")
  parser.add_argument("--single", required=True, help="The single-task runner's workdir.")
  parser.add_argument("--out", default=None, help="Output folder (default: <single>/reports).")
  parser.add_argument("--split", default="test", choices=("validation", "test"))
  args = parser.parse_args(argv)
  result = compare(args.mtl, args.single, args.out, args.split)
  print(format_comparison(result), flush=True)
  return 0


def _train_main(argv: Sequence[str]) -> None:
  from absl import app, flags, logging
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the baselines' catalogues, runs and reports go.")
  flags.DEFINE_list("tasks", [], "Task names (default: every task of the catalogue).")
  flags.DEFINE_integer("steps", None, "Train steps per task (default: config.total_steps).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(unused_argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    train_single_task_baselines(flags.FLAGS.config, flags.FLAGS.workdir,
                                flags.FLAGS.tasks or None, flags.FLAGS.steps)

  app.run(main, argv=list(argv))


def main(argv: Sequence[str] | None = None):
  import sys
  argv = list(sys.argv if argv is None else argv)
  if len(argv) > 1 and argv[1] == "compare":
    return _compare_main(argv[2:])
  return _train_main(argv)


if __name__ == "__main__":
  raise SystemExit(main())
