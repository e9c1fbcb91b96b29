"""Adds a new website (task) to a trained model, training only what belongs to the new task.

  python -m mtl_jax.new_task --workdir=runs/demo --new_workdir=runs/demo_plus \
      --catalogue=new_site_catalogue/ --steps=300 [--with_adapter] [--learning_rate=3e-3]

  from mtl_jax import new_task
  new_task.add_task("runs/demo", "runs/demo_plus", "new_site_catalogue/", steps=300)

The new task's data is a catalogue in the usual format (`mtl_jax/catalogue.py`) whose tasks.json
lists the new task (several new tasks may be added at once; each gets its own head). Its
`image_dim` must be the model's and its `max_images` at most the model's; its task names must be
new and its class counts at most `model.max_classes`.

What happens:
  1. The old run's latest (or given) checkpoint is restored whole and verified against its
     fingerprints (`workdir.open_run`), with its tokenizer (token ids must stay those the
     encoder learnt). Every argument is checked before `new_workdir` is created, and the new
     workdir is locked against a second writer.
  2. `state.grow` (the growth function DyPa uses too) gives each new task head blocks after
     the existing tasks' ones, with row-wise AdamW state (zero moments, zero step count). With
     `with_adapter`, one adapter slot per new task is appended too (zero output projection, so
     it starts as the identity) and `adapter_map` points the new task at it; otherwise the new
     task maps to slot 0 (no adapter). `num_classes` grows by the new tasks' (trained) class counts.
  3. Training runs the train step of training itself (`steps.train_step`), with the model's
     encoder frozen (`train_encoder=False`: inference mode, no dropout, no embedding
     augmentation, no gradient). Only the rows of the tasks in a batch are updated, and batches
     hold new tasks only, so the encoder, its optimiser state and every other task's head and
     adapter rows are passed through untouched: the old tasks' outputs stay bit-identical. The
     learning rate follows the config's warmup + cosine schedule over `steps` (peak:
     `learning_rate`, default the config's); batches sample the new catalogue's train split as
     training does.
  4. The new tasks are evaluated with the evaluation of training (`steps.evaluate`,
     `evaluation.evaluate_outputs`) on their validation and test splits (reports for the new
     tasks in `<new_workdir>/reports`), and `<new_workdir>` receives a checkpoint whose meta
     holds the grown task table (so `mtl_jax.predict` serves old and new tasks from it), the
     adapter count, and an `added_tasks` event, plus a copy of the tokenizer.

The state's step counter advances by `steps` (it counts updates applied to the state).
"""
from __future__ import annotations

if __name__ == "__main__":  # First, before the heavy imports: see allocator.py.
  from mtl_jax import allocator
  allocator.reexec_under_tcmalloc()

import copy
import os
import time
from typing import Sequence

import jax
import numpy as np
from absl import flags

from mtl_jax import catalogue as cat
from mtl_jax import checkpointing
from mtl_jax import cli
from mtl_jax import evaluation
from mtl_jax import input_pipeline
from mtl_jax import state as state_lib
from mtl_jax import steps as steps_lib
from mtl_jax import tfds_builder
from mtl_jax import train
from mtl_jax import workdir as workdir_lib


def _check_new_catalogue(old: cat.TaskTable, new: cat.TaskTable, max_classes: int,
                         catalogue_dir: str) -> None:
  tasks_json = os.path.join(catalogue_dir, cat.TASKS_FILE)
  clash = [n for n in new.names if old.has_task(n)]
  if clash:
    raise cat.CatalogueError(
        f"{tasks_json}, field 'tasks': {clash} are already tasks of the model. Fix: give the new "
        "task a name of its own (the model's tasks are listed by "
        "`python -m mtl_jax.predict --workdir=RUN --list_tasks`).")
  if new.image_dim != old.image_dim:
    raise cat.CatalogueError(
        f"{tasks_json}, field 'image_dim': {new.image_dim}, but the model's image embeddings are "
        f"{old.image_dim}-wide. Fix: embed the new task's images with the image encoder the model "
        "was trained with.")
  if new.max_images > old.max_images:
    raise cat.CatalogueError(
        f"{tasks_json}, field 'max_images': {new.max_images}, more than the model's "
        f"{old.max_images}. Fix: keep at most {old.max_images} images per product.")
  widest = int(new.num_classes.max())
  if widest > max_classes:
    name = new.names[int(new.num_classes.argmax())]
    raise cat.CatalogueError(
        f"{tasks_json}, field 'tasks': task {name!r} has {widest} classes, more than the "
        f"model's heads hold (model.max_classes={max_classes}). Fix: merge classes, or train a "
        "model with a larger model.max_classes.")


def _to_model_batch(batch: dict, first_task: int, max_images: int) -> dict:
  """A batch of the new catalogue -> the model's task ids and image slots."""
  batch = dict(batch)
  batch["task_id"] = batch["task_id"] + np.int32(first_task)
  missing = max_images - batch["images"].shape[1]
  if missing:
    batch["images"] = np.pad(batch["images"], ((0, 0), (0, missing), (0, 0)))
    batch["image_mask"] = np.pad(batch["image_mask"], ((0, 0), (0, missing)))
  return batch


def add_task(workdir: str | os.PathLike, new_workdir: str | os.PathLike,
             catalogue_dir: str | os.PathLike, steps: int, with_adapter: bool = False, *,
             step: int | str | None = None, learning_rate: float | None = None,
             batch_size: int | None = None, log_every: int = 50) -> dict:
  """Adds the tasks of `catalogue_dir` to the run in `workdir`, writing the result to
  `new_workdir` (see the module docstring).

  Args:
    workdir: the trained run.
    new_workdir: where the grown run goes (must not hold a checkpoint yet).
    catalogue_dir: a catalogue holding the new task(s).
    steps: train steps on the new tasks.
    with_adapter: also give each new task a fresh adapter.
    step: the old run's checkpoint to start from: a step, "best" or None (the latest).
    learning_rate: peak learning rate (default: the config's `optimizer.learning_rate`).
    batch_size: train batch size (default: the config's).
    log_every: print the training loss every so many steps.

  Returns:
    {"step", "tasks", "train": summary of the last `log_every` steps' mean loss/accuracy,
     "validation": summary, "test": summary, "rows": {split: per-task rows}}.
  """
  if steps <= 0:
    raise workdir_lib.RunDirError(f"--steps={steps}: use a positive number of train steps.")
  run = workdir_lib.open_run(workdir, step)
  try:
    new_workdir = workdir_lib.resolve(new_workdir)
    if new_workdir == run.workdir:
      raise workdir_lib.RunDirError(
          f"--new_workdir={new_workdir} is the old run's workdir. Fix: write the grown model to "
          "a directory of its own; the old run stays as it is.")
    if (new_workdir / workdir_lib.CHECKPOINTS).exists() and any(
        (new_workdir / workdir_lib.CHECKPOINTS).iterdir()):
      raise workdir_lib.RunDirError(
          f"{new_workdir / workdir_lib.CHECKPOINTS} already holds a checkpoint. Fix: choose an "
          "empty --new_workdir, or remove that one.")
    if run.model.class_order is not None:
      raise workdir_lib.shared_holdout_error()
    _check_new_catalogue(run.task_table, cat.read_task_table(catalogue_dir),
                         run.config.model.max_classes, os.fspath(catalogue_dir))
    data_devices = run.model.mesh.shape["data"]
    if batch_size is not None and (batch_size <= 0 or batch_size % data_devices):
      raise workdir_lib.RunDirError(
          f"--batch_size={batch_size} is not a positive multiple of the {data_devices} "
          "data-parallel devices. Fix: use a multiple of it.")
    # Everything is checked before the new workdir is created.
    with (workdir_lib.prepared(new_workdir) as new_workdir,
          workdir_lib.writer_lock(new_workdir)):
      return _add_task(run, new_workdir, catalogue_dir, steps, with_adapter,
                       learning_rate=learning_rate, batch_size=batch_size, log_every=log_every)
  finally:
    run.close()


def _add_task(run, new_workdir, catalogue_dir, steps, with_adapter, *, learning_rate,
              batch_size, log_every):
  config, old_table = run.config, run.task_table
  new_catalogue = tfds_builder.load_catalogue(
      os.fspath(catalogue_dir), os.fspath(new_workdir / "prepared"),
      on_bad_record=config.data.on_bad_record)
  new_table = new_catalogue.task_table
  first_task, num_new = old_table.num_tasks, new_table.num_tasks
  table = cat.TaskTable(names=old_table.names + new_table.names,
                        class_names=old_table.class_names + new_table.class_names,
                        image_dim=old_table.image_dim, max_images=old_table.max_images)

  # The config of this training: the old run's, with the new task's steps and optimiser knobs.
  task_config = copy.deepcopy(config)
  with task_config.unlocked():
    task_config.total_steps = steps
    if learning_rate is not None:
      task_config.optimizer.learning_rate = learning_rate
    if batch_size is not None:
      task_config.batch_size = batch_size
    # Only the rows of the tasks in a batch (the new ones) may change, whatever the run used.
    task_config.optimizer.task_update = "sparse"

  old_state = run.restore_state()  # Verified against its fingerprints.
  start_step = int(old_state.step)
  new_num_classes = state_lib.trained_num_classes(new_table.num_classes,
                                                  config.eval.holdout_classes)
  # The same train step as training, with the encoder frozen and a schedule of its own.
  model = workdir_lib.model_for(task_config, run.meta, table, len(run.tokenizer),
                                mesh=run.model.mesh, schedule_steps=steps,
                                schedule_start=start_step, train_encoder=False)
  state = state_lib.grow(
      model, old_state, (config.seed, 2, start_step),
      new_num_classes=new_num_classes,
      adapter_tasks=np.arange(first_task, first_task + num_new) if with_adapter else ())
  del old_state
  num_slots = state_lib.num_adapter_slots(state)

  step_fn = steps_lib.jitted_train_step(model, num_slots)
  batches = input_pipeline.TrainBatches(new_catalogue, run.tokenizer, task_config, 0)
  history, train_summary = [], {}
  started = time.time()
  try:
    for local_step in range(steps):
      batch = model.global_batch(_to_model_batch(next(batches), first_task, table.max_images))
      state, metrics = step_fn(state, batch)
      history.append(metrics)
      if (local_step + 1) % log_every == 0 or local_step + 1 == steps:
        history = jax.device_get(history)
        train_summary = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
        if not np.isfinite(train_summary["loss"]):
          raise train.NonFiniteLossError(
              f"Non-finite loss training the new tasks at step {local_step + 1}. Fix: lower "
              "--learning_rate or check the new catalogue's data.")
        print(f"new-task step {local_step + 1}/{steps}: loss {train_summary['loss']:.4f}, "
              f"accuracy {train_summary['accuracy']:.3f} "
              f"({(local_step + 1) / (time.time() - started):.1f} steps/s)", flush=True)
        history = []
  finally:
    batches.close()

  results = {"step": int(state.step), "tasks": list(new_table.names), "train": train_summary,
             "rows": {}}
  for split in ("validation", "test"):
    outputs = steps_lib.evaluate(model, state.params, state.adapter_map, (
        _to_model_batch(b, first_task, table.max_images) for b in input_pipeline.eval_batches(
            new_catalogue, split, run.tokenizer, task_config)))
    outputs["task_id"] = outputs["task_id"] - first_task
    result = evaluation.evaluate_outputs(new_table, outputs, new_num_classes,
                                         new_catalogue.num_examples("train"),
                                         new_catalogue.skipped.get(split))
    results[split] = result.summary
    results["rows"][split] = result.rows
    evaluation.write_report(new_workdir, split, int(state.step), result)
    print(evaluation.format_table(f"new tasks, {split}", result.rows, result.summary),
          flush=True)

  workdir_lib.keep_tokenizer(new_workdir, run.tokenizer)
  event = {"tasks": list(new_table.names), "steps": int(steps), "with_adapter": bool(with_adapter),
           "from_workdir": os.fspath(run.workdir), "from_step": start_step,
           "catalogue_dir": os.fspath(catalogue_dir),
           "learning_rate": float(task_config.optimizer.learning_rate)}
  meta = {**run.meta, "task_table": table.to_json(), "num_adapter_slots": num_slots,
          "num_tasks": table.num_tasks,
          "data_iterator": {"next_step": int(state.step), "seed": int(config.seed)},
          "added_tasks": list(run.meta.get("added_tasks", [])) + [event]}
  mngr = workdir_lib.checkpoint_manager(new_workdir, config.max_to_keep, create=True)
  checkpointing.save(mngr, int(state.step), state, meta, force=True)
  mngr.wait_until_finished()
  mngr.close()
  print(f"Added {', '.join(new_table.names)} to {run.workdir}: checkpoint step "
        f"{int(state.step)} in {new_workdir / workdir_lib.CHECKPOINTS}", flush=True)
  html = evaluation.write_html_report(new_workdir, meta.get("dypa_events"), task_config.to_dict())
  print(f"Report (the new tasks): {html}", flush=True)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  flag_values = cli.flag_values()
  define = lambda kind, name, default, text, **kw: getattr(flags, f"DEFINE_{kind}")(
      name, default, text, flag_values=flag_values, **kw)
  define("string", "workdir", None, "The trained run.", required=True)
  define("string", "new_workdir", None, "Where the grown model goes.", required=True)
  define("string", "catalogue", None, "A catalogue holding the new task(s).", required=True)
  define("integer", "steps", None, "Train steps on the new task.", required=True)
  define("bool", "with_adapter", False, "Also train a fresh adapter for the new task.")
  define("string", "step", None, "The old run's checkpoint: " + workdir_lib.STEP_HELP)
  define("float", "learning_rate", None, "Peak learning rate (default: the run's config).")
  define("integer", "batch_size", None, "Train batch size (default: the run's config).")
  cli.parse(flag_values, argv, "python -m mtl_jax.new_task")
  f = flag_values
  add_task(f.workdir, f.new_workdir, f.catalogue, f.steps, f.with_adapter, step=f.step,
           learning_rate=f.learning_rate, batch_size=f.batch_size)
  return 0


if __name__ == "__main__":
  cli.run(main)
