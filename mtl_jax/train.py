"""The training loop: prepare, restore or create the state, step, evaluate, allocate, save.

Everything the loop calls lives in its own module: the run directory (workdir.py), the data
(prepare.py, input_pipeline.py), the state (state.py), the steps (steps.py), DyPa (dypa.py),
checkpoints (checkpointing.py) and the reports (evaluation/). Re-running the same command with
the same workdir resumes from its latest checkpoint, after checking that the config and the
catalogue are those the run was saved with.
"""
import dataclasses
import time

import jax
import numpy as np
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from mtl_jax import checkpointing
from mtl_jax import config_base
from mtl_jax import dypa
from mtl_jax import early_stopping
from mtl_jax import evaluation
from mtl_jax import input_pipeline
from mtl_jax import preemption
from mtl_jax import prepare
from mtl_jax import sharding
from mtl_jax import state as state_lib
from mtl_jax import steps
from mtl_jax import workdir as workdir_lib


class NonFiniteLossError(FloatingPointError):
  pass


def _print(*args):
  if jax.process_index() == 0:
    print(*args, flush=True)


def evaluate_split(model, state, catalogue, split: str, tokenizer, config,
                   with_skipped: bool = False) -> evaluation.SplitResult:
  """Every task's metrics on one split of the catalogue. A report's evaluation
  (`with_skipped`) with held-out classes also scores them by Mahalanobis distance, fitted on the
  train split (one more pass over it)."""
  batches = lambda s: input_pipeline.eval_batches(catalogue, s, tokenizer, config,
                                                  jax.process_index(), jax.process_count())
  fit = None
  if with_skipped and np.any(model.num_classes < catalogue.task_table.num_classes):
    fit = steps.fit_class_gaussians(model, state.params, state.adapter_map, batches("train"))
  outputs = steps.evaluate(model, state.params, state.adapter_map, batches(split),
                           with_features=fit is not None)
  skipped = ((catalogue.skipped.get(split, {}), catalogue.skipped.get("train", {}))
             if with_skipped else ())
  return evaluation.evaluate_outputs(catalogue.task_table, outputs, model.num_classes,
                                     catalogue.num_examples("train"), *skipped, feature_fit=fit)


def _log_result(writer, step, split, result):
  writer.write_scalars(step, {f"{split}/{k}": v for k, v in result.summary.items()
                              if isinstance(v, (int, float))})
  # The step is on the line: an evaluation need not fall on a logged step.
  _print(evaluation.format_table(f"{split} at step {step}", result.rows, result.summary))


def training_budget(config, train_sizes) -> str:
  """How many passes over the training data the run's step budget makes, in one line."""
  seen = config.total_steps * config.batch_size
  total = int(np.sum(train_sizes))
  return (f"Budget: {config.total_steps} steps x batch {config.batch_size} = {seen:,} examples, "
          f"{seen / max(total, 1):.2f} passes over the {total:,} training products"
          + (" (under one pass: most tasks will be undertrained; raise --config.total_steps)"
             if seen < total else ""))


def _final_state(config, model, mngr, tracker, state):
  """The state the end-of-training reports read, and its step: the best checkpoint's with
  `config.eval_on_best` (when one was recorded and still reads back), else the latest."""
  step = int(state.step)
  if not (tracker.enabled and config.eval_on_best) or tracker.best_step is None:
    return state, step
  if tracker.best_step == step:
    _print(f"Final evaluation: the latest step is the best ({tracker.describe_best()}).")
    return state, step
  try:
    meta = checkpointing.read_meta(mngr, tracker.best_step)
    best = checkpointing.restore(mngr, tracker.best_step,
                                 model.abstract_state(meta["num_adapter_slots"]), meta)
  except Exception as e:  # A lost best checkpoint must not lose the run's reports.
    _print(f"WARNING: the best checkpoint (step {tracker.best_step}) does not read back "
           f"({' '.join(str(e).split())[:300]}); the reports use the latest, step {step}.")
    return state, step
  _print(f"Final evaluation on the best checkpoint: {tracker.describe_best()} (latest step "
         f"{step}; config.eval_on_best=False reports the latest).")
  return best, tracker.best_step


def train_and_evaluate(config, workdir: str, stop_at_step: int | None = None) -> dict:
  """Trains on every task of the catalogue, evaluates, and writes the reports.

  `stop_at_step` ends the run early (after checkpointing) as a preemption would; tests use it.
  Returns the test summary (or the latest validation summary when stopped early).
  """
  preemption.install()
  config_base.validate_config(config, jax.device_count(), jax.process_count())
  try:
    with workdir_lib.prepared(workdir) as workdir, workdir_lib.writer_lock(workdir):
      return _train(config, workdir, stop_at_step)
  finally:
    preemption.clear()


def _train(config, workdir, stop_at_step):
  catalogue, tokenizer = prepare.prepare_data(config, workdir)
  task_table = catalogue.task_table
  config_base.validate_against_data(config, task_table)
  if (line := prepare.skipped_summary(catalogue)):
    _print(line)
  if not len(catalogue.sources["validation"]):
    _print("WARNING: the validation split is empty: no validation reports, and DyPa has no "
           "scores. Fix: add records to the catalogue's validation.jsonl.")

  mesh = sharding.make_mesh(config.mesh)
  spec = state_lib.model_spec(config, task_table, len(tokenizer))
  trained, class_order = state_lib.holdout_for(config, task_table)
  model = state_lib.Model(config, spec, trained, mesh, class_order=class_order)
  mngr = workdir_lib.checkpoint_manager(workdir, config.max_to_keep, create=True,
                                        best_metric=config.best_metric,
                                        best_mode=config.best_mode)
  restored = checkpointing.restore_latest(
      mngr, lambda meta: model.abstract_state(meta["num_adapter_slots"]),
      check_meta=lambda meta, path: workdir_lib.check_resume(meta, config, task_table, path))
  if restored is None:
    state = model.create_state(jax.random.key(config.seed))
    if config.model.text_init:
      from mtl_jax import pretrained  # Local: only runs that load weights need it.
      encoder = pretrained.load_text_encoder(config.model.text_init, state.params["encoder"],
                                             spec)
      state = state.replace(params={**state.params, "encoder": jax.device_put(
          encoder, model.state_shardings().params["encoder"])})
    if config.model.head_init == "probe":
      from mtl_jax import linear_probe  # Local: only runs that fit the probe need it.
      state, accuracy = linear_probe.heads_from_probe(model, state, catalogue, tokenizer, config)
      _print("Heads initialised by per-task linear probes on the initial encoder's features "
             f"(model.head_init=probe): mean validation accuracy "
             f"{'n/a' if accuracy is None else f'{accuracy:.3f}'}.")
    start_step, dypa_events, meta = 0, [], {}
  else:
    start_step, state, meta = restored
    dypa_events = meta.get("dypa_events", [])
    if meta["data_iterator"]["next_step"] != start_step:
      raise checkpointing.CheckpointError(
          f"Checkpoint {start_step} in {mngr.directory} holds data position "
          f"{meta['data_iterator']['next_step']}; it does not belong to this run.")
    _print(f"Resumed from step {start_step} ({mngr.directory / str(start_step)})"
           + (": training is complete; evaluating again and rewriting the reports."
              if start_step >= config.total_steps else ""))
  _print(training_budget(config, catalogue.num_examples("train")))
  tracker, note = early_stopping.Tracker.from_config(config, meta.get(early_stopping.META_KEY))
  if note:
    _print(note)

  writer = metric_writers.create_default_writer(
      str(workdir), just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in evaluation.flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  progress = periodic_actions.ReportProgress(
      num_train_steps=config.total_steps, writer=writer, every_secs=30)
  batches = input_pipeline.TrainBatches(catalogue, tokenizer, config, start_step,
                                        jax.process_index(), jax.process_count())

  def checkpoint(state):
    meta = {"data_iterator": batches.state(), "config": config.to_json(),
            "task_table": task_table.to_json(),
            "num_adapter_slots": state_lib.num_adapter_slots(state),
            "num_tasks": model.num_tasks, "dypa_events": dypa_events,
            "model_spec": dataclasses.asdict(spec),
            early_stopping.META_KEY: tracker.to_meta()}
    checkpointing.save(mngr, int(state.step), state, meta, force=True,
                       metrics=tracker.metrics(int(state.step)))

  def check_finite(step, metrics, task_ids):
    if np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]):
      return
    names = ", ".join(sorted({task_table.names[t] for t in np.unique(task_ids)}))
    if config.optimizer.nonfinite == "skip":
      _print(f"WARNING: step {step} skipped: non-finite loss or gradient; tasks in that batch: "
             f"{names}")
      return
    mngr.wait_until_finished()
    latest = mngr.latest_step()
    raise NonFiniteLossError(
        f"Non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at "
        f"step {step}; tasks in that batch: {names}. Last good checkpoint: "
        f"{mngr.directory / str(latest) if latest is not None else 'none'}. "
        "Fix: lower --config.optimizer.learning_rate or check those tasks' data.")

  # Two programs in flight keep the device busy while the host reads the previous step's loss.
  # Fake multi-device CPU meshes deadlock with several collective programs queued, so there
  # each step is awaited.
  lag = 0 if jax.default_backend() == "cpu" and jax.device_count() > 1 else 1
  pending, history = [], []

  def drain(keep):
    """Reads back the metrics of all but the last `keep` dispatched steps."""
    while len(pending) > keep:
      done_step, done_metrics, task_ids = pending.pop(0)
      done_metrics = jax.device_get(done_metrics)
      check_finite(done_step, done_metrics, task_ids)
      history.append(done_metrics)

  last_summary = {}
  final_validation = None  # The last step's validation result, when the tracker needed it.
  step = start_step
  if tracker.should_stop():
    _print(f"Stopped early at step {step} ({tracker.evals_without_improvement} validation "
           f"evaluations without improvement, patience {tracker.patience}); nothing left to "
           "train. Raise --config.early_stopping_patience to train on.")
  evaluations = step // config.eval_every  # Validation evaluations done so far in this run.
  if step == 0 and config.model.head_init == "probe" and tracker.enabled:
    # The probe heads are a model already: training must beat them to be the best checkpoint.
    result = evaluate_split(model, state, catalogue, "validation", tokenizer, config)
    _log_result(writer, step, "validation", result)
    if tracker.update(step, result.summary, count=False):
      checkpoint(state)
  started = time.time()
  try:
    while step < config.total_steps and not tracker.should_stop():
      if preemption.requested() and step == start_step:
        _print(f"Preempted before step {step + 1}: nothing new to save; run the same command "
               "to resume.")
        return last_summary
      local = next(batches)
      train_step = steps.jitted_train_step(model, state_lib.num_adapter_slots(state))
      state, metrics = train_step(state, model.global_batch(local))
      step += 1
      pending.append((step, metrics, local["task_id"]))
      drain(keep=lag)
      progress(step)
      if step % config.log_every == 0 or step == config.total_steps:
        drain(keep=0)
        means = {k: float(np.nanmean([h[k] for h in history])) for k in history[0]}
        writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
        history.clear()
        rate = (step - start_step) / (time.time() - started)
        _print(f"step {step}/{config.total_steps}: loss {means['loss']:.4f}, accuracy "
               f"{means['accuracy']:.3f}, {rate:.1f} steps/s, ETA "
               f"{(config.total_steps - step) / max(rate, 1e-9):.0f}s")
      evaluate_now = step % config.eval_every == 0 and step < config.total_steps
      allocate_now = dypa.is_due(config, step, evaluations + evaluate_now, evaluate_now)
      # The last step's validation counts for the best checkpoint, so it is measured before
      # that step is saved (and reused by the final reports).
      final_eval = tracker.enabled and step == config.total_steps
      improved = False
      if evaluate_now or allocate_now or final_eval:
        result = evaluate_split(model, state, catalogue, "validation", tokenizer, config,
                                with_skipped=final_eval)
        evaluations += evaluate_now
        last_summary = result.summary
        _log_result(writer, step, "validation", result)
        if evaluate_now or final_eval:
          improved = tracker.update(step, result.summary, count=evaluate_now)
        if final_eval:
          final_validation = result
      if allocate_now:
        state, event = dypa.expand(model, state, result.rows, step)
        dypa_events.append(event)
        writer.write_scalars(step, {"dypa/adapters": event["adapters_after"],
                                    "dypa/parameters": event["parameters_after"],
                                    "dypa/new_adapters": len(event["tasks"])})
        _print(f"DyPa at step {step}: {len(event['tasks'])} new adapters "
               f"({event['adapters_after']} in all, task-specific share "
               f"{100 * event['task_specific_share_after']:.2f}%): {', '.join(event['tasks'])}")
      if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
        preemption.request()
      stopping = step < config.total_steps and (
          preemption.requested() or (stop_at_step is not None and stop_at_step <= step))
      stop_early = tracker.should_stop()
      if (step % config.checkpoint_every == 0 or step == config.total_steps or stopping
          or improved or stop_early):
        checkpoint(state)
      if stop_early:
        _print(tracker.stop_message(step))
        break
      if stopping:
        mngr.wait_until_finished()
        if preemption.requested():
          _print(f"Preempted: checkpoint written at step {step} in {mngr.directory}; run the "
                 "same command to resume.")
        return last_summary
  finally:
    batches.close()

  drain(keep=0)
  mngr.wait_until_finished()
  eval_state, eval_step = _final_state(config, model, mngr, tracker, state)
  results = {}
  for split in ("validation", "test"):
    reuse = split == "validation" and final_validation is not None and eval_step == step
    result = final_validation if reuse else evaluate_split(
        model, eval_state, catalogue, split, tokenizer, config, with_skipped=True)
    results[split] = result.summary
    if jax.process_index() == 0:
      evaluation.write_report(workdir, split, eval_step, result, trained_steps=step)
    if not reuse:  # A reused result was logged when it was measured.
      _log_result(writer, eval_step, split, result)
  writer.flush()
  mngr.close()
  if jax.process_index() == 0:
    print(f"Report: {evaluation.write_html_report(workdir, dypa_events, config.to_dict())}", flush=True)
  return results["test"]
