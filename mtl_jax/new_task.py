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
  1. The old run's latest (or given) checkpoint is restored whole, with its tokenizer (token ids
     must stay those the encoder learnt).
  2. One head row per new task is appended to the stacked heads, and to their row-wise AdamW
     state (zero moments, zero step count). With `with_adapter`, one adapter slot per new task
     is appended too (zero output projection, so it starts as the identity), with fresh
     optimiser rows, and `adapter_map` points the new task at it; otherwise the new task maps to
     slot 0 (no adapter). `num_classes` grows by the new tasks' (trained) class counts.
  3. Training runs a dedicated jitted step: the encoder runs in inference mode (no dropout; no
     embedding augmentation) under `stop_gradient`, and gradients are taken only with respect to
     the gathered rows of the new tasks (`task_layers.apply_task_layers`, `losses`), which
     `optim.row_adam_update` updates; the step scatters them back into the stacked arrays. The
     encoder, its optimiser state and every other task's head and adapter rows are passed
     through untouched, so the old tasks' outputs stay bit-identical. The learning rate follows
     the config's warmup + cosine schedule over `steps` (peak: `learning_rate`, default the
     config's); batches sample the new catalogue's train split as training does.
  4. The new tasks are evaluated on their validation and test splits (reports for the new tasks
     in `<new_workdir>/reports`), and `<new_workdir>` receives a checkpoint whose meta holds the
     grown task table (so `mtl_jax.predict` serves old and new tasks from it), the adapter count,
     and an `added_tasks` event, plus a copy of the tokenizer in `<new_workdir>/tokenizer`.

The state's step counter advances by `steps` (it counts updates applied to the state).
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import shutil
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from mtl_jax import catalogue as cat
from mtl_jax import checkpointing
from mtl_jax import evaluation
from mtl_jax import input_pipeline
from mtl_jax import losses
from mtl_jax import optim
from mtl_jax import predict
from mtl_jax import task_layers
from mtl_jax import tfds_builder
from mtl_jax import train


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


def _grow_state(state: train.TrainState, rng, num_new: int, new_num_classes: np.ndarray,
                with_adapter: bool, adapter_size: int, adapter_layers: int) -> train.TrainState:
  """The state with `num_new` fresh head rows (and adapter slots), optimiser rows included."""
  tasks = state.params["tasks"]
  hidden, max_classes = tasks["heads"]["kernel"].shape[1:]
  head_rng, adapter_rng = jax.random.split(rng)
  concat = lambda old, new: jnp.concatenate([old, new.astype(old.dtype)])

  def grow(params, opt_state: optim.RowAdamState, fresh):
    zeros = jax.tree.map(jnp.zeros_like, fresh)
    return (jax.tree.map(concat, params, fresh),
            optim.RowAdamState(mu=jax.tree.map(concat, opt_state.mu, zeros),
                               nu=jax.tree.map(concat, opt_state.nu, zeros),
                               count=concat(opt_state.count, jnp.zeros((num_new,), jnp.int32))))

  heads, heads_opt = grow(tasks["heads"], state.task_opt_state["heads"],
                          task_layers.init_heads(head_rng, num_new, hidden, max_classes))
  adapters, adapters_opt = tasks["adapters"], state.task_opt_state["adapters"]
  num_slots = adapters["up"].shape[0]
  if with_adapter:
    adapters, adapters_opt = grow(adapters, adapters_opt, task_layers.init_adapters(
        adapter_rng, num_new, hidden, adapter_size, adapter_layers))
    new_slots = num_slots + jnp.arange(num_new, dtype=jnp.int32)
  else:
    new_slots = jnp.zeros((num_new,), jnp.int32)
  return state.replace(
      params={**state.params, "tasks": {"heads": heads, "adapters": adapters}},
      task_opt_state={"heads": heads_opt, "adapters": adapters_opt},
      adapter_map=concat(state.adapter_map, new_slots),
      num_classes=concat(state.num_classes, jnp.asarray(new_num_classes, jnp.int32)))


class NewTaskTrainer:
  """The train and eval steps for new tasks appended after `first_task` (and `first_slot`)."""

  def __init__(self, trainer: train.Trainer, first_task: int, first_slot: int,
               with_adapter: bool, schedule):
    self.trainer = trainer
    self.config = trainer.config
    self.first_task = first_task
    self.first_slot = first_slot
    self.with_adapter = with_adapter
    self.schedule = schedule
    self.num_tasks = trainer.num_tasks
    self._step = None

  def train_step(self, state: train.TrainState, batch: dict, local_step):
    """One update of the new tasks' rows; everything else is returned as it came in."""
    config, trainer = self.config, self.trainer
    pooled, _ = trainer.encoder.apply({"params": state.params["encoder"]}, batch,
                                      deterministic=True)
    pooled = jax.lax.stop_gradient(pooled)
    tasks = state.params["tasks"]
    task_ids = batch["task_id"]
    num_slots = tasks["adapters"]["up"].shape[0]
    rows = {"heads": jnp.arange(self.first_task, self.num_tasks, dtype=jnp.int32)}
    head_index = task_ids - self.first_task
    if self.with_adapter:
      rows["adapters"] = jnp.arange(self.first_slot, num_slots, dtype=jnp.int32)
      adapter_index = state.adapter_map[task_ids] - self.first_slot
      frozen_adapters = None
    else:
      # New tasks use slot 0 (no adapter): the adapter input is inert and never updated.
      adapter_index = jnp.zeros_like(task_ids)
      frozen_adapters = optim.gather_rows(tasks["adapters"], jnp.zeros((1,), jnp.int32))
    active = jnp.full(task_ids.shape, self.with_adapter)
    row_params = {k: optim.gather_rows(tasks[k], r) for k, r in rows.items()}
    class_mask = task_layers.class_mask(state.num_classes, task_ids, config.model.max_classes)
    weight = (batch["label"] < state.num_classes[task_ids]).astype(jnp.float32)

    def loss_fn(row_params):
      layers = {"heads": row_params["heads"],
                "adapters": row_params.get("adapters", frozen_adapters)}
      logits = task_layers.apply_task_layers(layers, pooled, head_index, adapter_index, active)
      per_example = losses.cross_entropy(logits, jnp.where(weight > 0, batch["label"], 0),
                                         class_mask)
      return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(row_params)
    grad_norm = optax.global_norm(grads)
    clip = jnp.minimum(1.0, config.optimizer.clip_norm / (grad_norm + 1e-6))
    grads = jax.tree.map(lambda g: g * clip, grads)
    learning_rate = self.schedule(local_step)
    new_tasks, task_opt_state = dict(tasks), dict(state.task_opt_state)
    for k in rows:
      new_tasks[k], task_opt_state[k] = optim.row_adam_update(
          tasks[k], state.task_opt_state[k], rows[k], grads[k], learning_rate, config)
    predicted = jnp.argmax(losses.mask_logits(logits, class_mask), axis=-1)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate,
               "accuracy": jnp.sum((predicted == batch["label"]) * weight) /
                           jnp.maximum(jnp.sum(weight), 1.0)}
    return state.replace(step=state.step + 1,
                         params={**state.params, "tasks": new_tasks},
                         task_opt_state=task_opt_state), metrics

  def jitted_train_step(self, num_adapter_slots: int):
    if self._step is None:
      trainer = self.trainer
      state_sh = trainer.state_shardings(num_adapter_slots)
      self._step = jax.jit(
          self.train_step, donate_argnums=0,
          in_shardings=(state_sh, trainer.batch_sharding, None),
          out_shardings=(state_sh, jax.sharding.NamedSharding(trainer.mesh,
                                                              jax.sharding.PartitionSpec())))
    return self._step


def _to_model_batch(batch: dict, first_task: int, max_images: int) -> dict:
  """A batch of the new catalogue -> the model's task ids and image slots."""
  batch = dict(batch)
  batch["task_id"] = batch["task_id"] + np.int32(first_task)
  missing = max_images - batch["images"].shape[1]
  if missing:
    batch["images"] = np.pad(batch["images"], ((0, 0), (0, missing), (0, 0)))
    batch["image_mask"] = np.pad(batch["image_mask"], ((0, 0), (0, missing)))
  return batch


def evaluate_new_tasks(trainer: train.Trainer, state: train.TrainState, new_catalogue,
                       split: str, tokenizer, first_task: int, max_images: int) -> dict:
  """Per-task sums (numpy [N] vectors) of the new tasks over one split of their catalogue."""
  step_fn = trainer.jitted_eval_sums(train.num_adapter_slots(state))
  totals = None
  for local in input_pipeline.eval_batches(new_catalogue, split, tokenizer, trainer.config):
    batch = trainer.global_batch(_to_model_batch(local, first_task, max_images))
    sums = step_fn(state.params, state.adapter_map, state.num_classes, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  num_new = new_catalogue.task_table.num_tasks
  if totals is None:
    return {k: np.zeros(num_new) for k in evaluation.SUM_KEYS}
  return {k: np.asarray(v)[first_task:first_task + num_new]
          for k, v in jax.device_get(totals).items()}


def _copy_tokenizer(run: predict.Run, new_workdir: epath.Path) -> None:
  out = new_workdir / predict.TOKENIZER_DIR
  if out.exists():
    shutil.rmtree(out)
  source = epath.Path(run.tokenizer_source)
  if source.is_dir():
    shutil.copytree(source, out)
  else:  # A pretrained checkpoint's tokenizer, named by `model.text_init`.
    run.tokenizer.save_pretrained(os.fspath(out))


def add_task(workdir: str | os.PathLike, new_workdir: str | os.PathLike,
             catalogue_dir: str | os.PathLike, steps: int, with_adapter: bool = False, *,
             step: int | None = None, learning_rate: float | None = None,
             batch_size: int | None = None, log_every: int = 50) -> dict:
  """Adds the tasks of `catalogue_dir` to the run in `workdir`, writing the result to
  `new_workdir` (see the module docstring).

  Args:
    workdir: the trained run.
    new_workdir: where the grown run goes (must not hold a checkpoint yet).
    catalogue_dir: a catalogue holding the new task(s).
    steps: train steps on the new tasks.
    with_adapter: also give each new task a fresh adapter.
    step: the old run's checkpoint to start from (default: the latest).
    learning_rate: peak learning rate (default: the config's `optimizer.learning_rate`).
    batch_size: train batch size (default: the config's).
    log_every: print the training loss every so many steps.

  Returns:
    {"step", "tasks", "train": summary of the last `log_every` steps' mean loss/accuracy,
     "validation": summary, "test": summary, "rows": {split: per-task rows}}.
  """
  workdir, new_workdir = epath.Path(workdir), epath.Path(new_workdir)
  if steps <= 0:
    raise ValueError(f"steps={steps}: use a positive number of train steps.")
  if os.path.abspath(workdir) == os.path.abspath(new_workdir):
    raise ValueError(f"new_workdir={new_workdir} is the old run's workdir. Fix: write the grown "
                     "model to a directory of its own; the old run stays as it is.")
  if (new_workdir / "checkpoints").exists() and any((new_workdir / "checkpoints").iterdir()):
    raise FileExistsError(f"{new_workdir}/checkpoints already holds a checkpoint. Fix: choose "
                          "an empty new_workdir, or remove that one.")
  run = predict.open_run(workdir, step)
  config, old_table, tokenizer = run.config, run.task_table, run.tokenizer
  _check_new_catalogue(old_table, cat.read_task_table(catalogue_dir), config.model.max_classes,
                       os.fspath(catalogue_dir))
  if batch_size is not None and batch_size % run.trainer.mesh.shape["data"]:
    raise ValueError(f"batch_size={batch_size} is not a multiple of the "
                     f"{run.trainer.mesh.shape['data']} data-parallel devices.")
  new_workdir.mkdir(parents=True, exist_ok=True)
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
  holdout = config.eval.holdout_classes
  new_num_classes = train.trained_num_classes(new_table.num_classes, holdout)
  trainer = train.Trainer(config, run.trainer.spec,
                          train.trained_num_classes(table.num_classes, holdout),
                          run.trainer.mesh)

  old_state = run.restore_state()
  start_step = int(old_state.step)
  first_slot = train.num_adapter_slots(old_state)
  num_slots = first_slot + (num_new if with_adapter else 0)
  grow = jax.jit(functools.partial(
      _grow_state, num_new=num_new, new_num_classes=new_num_classes, with_adapter=with_adapter,
      adapter_size=config.model.adapter_size, adapter_layers=config.model.adapter_layers),
      out_shardings=trainer.state_shardings(num_slots))
  state = grow(old_state, jax.random.fold_in(jax.random.key(config.seed + 2), start_step))
  del old_state

  schedule = optim.learning_rate_schedule(task_config, steps)
  new_trainer = NewTaskTrainer(trainer, first_task, first_slot, with_adapter, schedule)
  step_fn = new_trainer.jitted_train_step(num_slots)
  batches = input_pipeline.TrainBatches(new_catalogue, tokenizer, task_config, 0)
  history, train_summary = [], {}
  started = time.time()
  try:
    for local_step in range(steps):
      batch = trainer.global_batch(_to_model_batch(next(batches), first_task,
                                                   table.max_images))
      state, metrics = step_fn(state, batch, jnp.asarray(local_step, jnp.int32))
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
  train_sizes = new_catalogue.num_examples("train")
  for split in ("validation", "test"):
    sums = evaluate_new_tasks(trainer, state, new_catalogue, split, tokenizer, first_task,
                              table.max_images)
    rows = evaluation.task_rows(new_table, sums, train_sizes, new_catalogue.skipped.get(split))
    results[split] = evaluation.summarize(rows)
    results["rows"][split] = rows
    evaluation.write_report(new_workdir, split, int(state.step), rows, results[split])
    print(evaluation.format_table(f"new tasks, {split}", rows, results[split]), flush=True)

  _copy_tokenizer(run, new_workdir)
  event = {"tasks": list(new_table.names), "steps": int(steps), "with_adapter": bool(with_adapter),
           "from_workdir": os.fspath(workdir), "from_step": start_step,
           "catalogue_dir": os.fspath(catalogue_dir),
           "learning_rate": float(task_config.optimizer.learning_rate)}
  meta = {**run.meta, "task_table": table.to_json(), "num_adapter_slots": num_slots,
          "num_tasks": table.num_tasks,
          "data_iterator": {"next_step": int(state.step), "seed": int(config.seed)},
          "added_tasks": list(run.meta.get("added_tasks", [])) + [event]}
  mngr = checkpointing.manager(os.fspath(new_workdir), config.max_to_keep)
  checkpointing.save(mngr, int(state.step), state, meta, force=True)
  mngr.wait_until_finished()
  mngr.close()
  run.close()
  print(f"Added {', '.join(new_table.names)} to {workdir}: checkpoint step {int(state.step)} in "
        f"{new_workdir / 'checkpoints'}", flush=True)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mtl_jax.new_task",
      description="Add a new website (task) to a trained model; only its head (and adapter) "
                  "are trained.")
  parser.add_argument("--workdir", required=True, help="The trained run.")
  parser.add_argument("--new_workdir", required=True, help="Where the grown model goes.")
  parser.add_argument("--catalogue", required=True, help="A catalogue holding the new task(s).")
  parser.add_argument("--steps", type=int, required=True, help="Train steps on the new task.")
  parser.add_argument("--with_adapter", action="store_true",
                      help="Also train a fresh adapter for the new task.")
  parser.add_argument("--step", type=int, default=None,
                      help="The old run's checkpoint step (default: the latest).")
  parser.add_argument("--learning_rate", type=float, default=None,
                      help="Peak learning rate (default: the run's config).")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="Train batch size (default: the run's config).")
  args = parser.parse_args(argv)
  add_task(args.workdir, args.new_workdir, args.catalogue, args.steps, args.with_adapter,
           step=args.step, learning_rate=args.learning_rate, batch_size=args.batch_size)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
