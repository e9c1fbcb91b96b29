"""Training: the train state, the pure train step, evaluation, and the loop around them.

Shapes first: the state is built abstractly with `jax.eval_shape`, shardings come from the
logical axis names and the config's rules, and `jax.jit(init, out_shardings=...)` creates the
parameters already sharded. `train_step(state, batch) -> (state, metrics)` is one pure function
under `jax.jit` with the state donated; its rng is the config seed folded with the step, so the
step count in the state is the only clock.
"""
import dataclasses
import functools
import os
import signal
import threading
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from mtl_jax import augment
from mtl_jax import checkpointing
from mtl_jax import config_base
from mtl_jax import dypa
from mtl_jax import evaluation
from mtl_jax import input_pipeline
from mtl_jax import losses
from mtl_jax import optim
from mtl_jax import report_html
from mtl_jax import sharding
from mtl_jax import synthetic
from mtl_jax import task_layers
from mtl_jax import tfds_builder
from mtl_jax import tokenizer as tokenizer_lib
from mtl_jax.model import Encoder, ModelSpec


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: the number of updates applied.
  params: dict  # {"encoder": ..., "tasks": {"heads": ..., "adapters": ...}}
  opt_state: optax.OptState  # The encoder's AdamW state.
  task_opt_state: dict  # {"heads": RowAdamState, "adapters": RowAdamState}
  adapter_map: jax.Array  # [T] int32: task -> adapter slot (0: none).
  num_classes: jax.Array  # [T] int32: each task's class count.


CALIBRATION_BINS = 15


class NonFiniteLossError(FloatingPointError):
  pass


def model_spec(config, task_table, vocab_size: int) -> ModelSpec:
  m = config.model
  spec = ModelSpec(
      # Rounded up so that the word table splits evenly over a `model` axis (rules shard
      # `vocab`); ids past the tokenizer's are never used.
      vocab_size=-(-vocab_size // 128) * 128, max_positions=config.data.max_text_len,
      image_dim=task_table.image_dim, max_images=task_table.max_images,
      hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
      mlp_size=m.mlp_size, dropout=m.dropout, pooling=m.pooling, dtype=m.dtype, remat=m.remat)
  if m.text_init:
    # Table sizes follow the checkpoint; the layer sizes stay the config's, and the loader
    # names any field that disagrees with the checkpoint.
    from mtl_jax import pretrained  # Local: only runs that load weights need it.
    overrides = pretrained.spec_overrides(m.text_init)
    spec = dataclasses.replace(spec, **{k: overrides[k] for k in (
        "vocab_size", "max_positions", "layer_norm_eps", "type_vocab_size")})
  return spec


def trained_num_classes(num_classes, holdout: int) -> np.ndarray:
  """Class counts the model trains on: each task's last `holdout` classes held out, where
  at least 2 classes remain."""
  num_classes = np.asarray(num_classes, np.int32)
  return np.where(num_classes - holdout >= 2, num_classes - holdout, num_classes).astype(np.int32)


def dummy_batch(spec: ModelSpec, batch_size: int = 1) -> dict:
  return {
      "token_ids": jnp.zeros((batch_size, spec.max_positions), jnp.int32),
      "token_mask": jnp.ones((batch_size, spec.max_positions), jnp.int32),
      "images": jnp.zeros((batch_size, spec.max_images, spec.image_dim), jnp.float32),
      "image_mask": jnp.ones((batch_size, spec.max_images), jnp.int32),
  }


class Trainer:
  """What the step functions close over: model spec, config, optimiser, mesh and shardings."""

  def __init__(self, config, spec: ModelSpec, num_classes: np.ndarray, mesh):
    self.config = config
    self.spec = spec
    self.encoder = Encoder(spec)
    self.num_classes = np.asarray(num_classes, np.int32)
    self.num_tasks = len(self.num_classes)
    self.mesh = mesh
    self.schedule = optim.learning_rate_schedule(config, config.total_steps)
    self.tx = optim.encoder_optimizer(config, self.schedule)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self._train_step = {}  # Number of adapter slots -> jitted step (DyPa changes it).
    self._eval_step = {}

  # --- State -------------------------------------------------------------------------------

  def init_state(self, rng, num_adapter_slots: int = 1) -> TrainState:
    encoder_rng, task_rng = jax.random.split(rng)
    encoder = nn.meta.unbox(self.encoder.init({"params": encoder_rng}, dummy_batch(self.spec))
                            ["params"])
    tasks = task_layers.init_task_params(
        task_rng, self.num_tasks, num_adapter_slots, self.spec.hidden_size,
        self.config.model.max_classes, self.config.model.adapter_size,
        self.config.model.adapter_layers)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"encoder": encoder, "tasks": tasks},
        opt_state=self.tx.init(encoder),
        task_opt_state={k: optim.row_adam_init(v) for k, v in tasks.items()},
        adapter_map=jnp.zeros((self.num_tasks,), jnp.int32),
        num_classes=jnp.asarray(self.num_classes))

  def _abstract_init(self, num_adapter_slots: int):
    return jax.eval_shape(
        functools.partial(self.init_state, num_adapter_slots=num_adapter_slots),
        jax.random.key(0))

  def state_shardings(self, num_adapter_slots: int = 1):
    """NamedShardings for every leaf of the state, from logical axis names and config rules."""
    boxed = jax.eval_shape(lambda: self.encoder.init(
        {"params": jax.random.key(0)}, dummy_batch(self.spec))["params"])
    encoder_specs = nn.get_partition_spec(boxed)
    task_specs = jax.tree.map(lambda axes: P(*axes), task_layers.PARAM_AXES,
                              is_leaf=lambda x: isinstance(x, tuple))
    abstract = self._abstract_init(num_adapter_slots)
    opt_specs = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract.opt_state, encoder_specs,
        transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
    row_axis = {"heads": "task", "adapters": "adapter"}
    specs = TrainState(
        step=P(), params={"encoder": encoder_specs, "tasks": task_specs},
        opt_state=opt_specs,
        task_opt_state={k: optim.RowAdamState(mu=task_specs[k], nu=task_specs[k],
                                              count=P(row_axis[k])) for k in task_specs},
        adapter_map=P(), num_classes=P())
    return sharding.logical_to_sharding(specs, self.mesh, self.config.sharding_rules)

  def abstract_state(self, num_adapter_slots: int = 1):
    shapes = self._abstract_init(num_adapter_slots)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings(num_adapter_slots))

  def create_state(self, rng, num_adapter_slots: int = 1) -> TrainState:
    """Parameters born sharded: init compiled with the target shardings as its outputs."""
    init = jax.jit(self.init_state, static_argnums=1,
                   out_shardings=self.state_shardings(num_adapter_slots))
    return init(rng, num_adapter_slots)

  # --- Steps --------------------------------------------------------------------------------

  def train_step(self, state: TrainState, batch: dict):
    """One pure update. Returns (new state, metrics)."""
    config = self.config
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    task_ids = batch["task_id"]
    batch_size = task_ids.shape[0]
    tasks = state.params["tasks"]
    num_slots = tasks["adapters"]["up"].shape[0]
    slots = state.adapter_map[task_ids]
    if config.optimizer.task_update == "sparse":
      head_rows, head_index = optim.unique_rows(task_ids, self.num_tasks,
                                                min(batch_size, self.num_tasks))
      # Slot 0 (no adapter) is never updated: its examples index the dropped padding row.
      adapter_rows, adapter_index = optim.unique_rows(
          jnp.where(slots > 0, slots, num_slots), num_slots, min(batch_size, num_slots))
    else:
      head_rows, head_index = jnp.arange(self.num_tasks), task_ids
      adapter_rows, adapter_index = jnp.arange(num_slots), slots
    rows = {"heads": head_rows, "adapters": adapter_rows}
    row_params = {k: optim.gather_rows(tasks[k], rows[k]) for k in rows}
    class_mask = task_layers.class_mask(state.num_classes, task_ids, config.model.max_classes)
    # Examples whose label is outside their task's trained classes (held out) carry no loss.
    weight = (batch["label"] < state.num_classes[task_ids]).astype(jnp.float32)
    targets = jax.nn.one_hot(batch["label"], config.model.max_classes) * class_mask

    aug = config.augment
    aug_inputs = config_base.augment_inputs(config)
    aug_stats = {}
    if aug.kind != "none":
      # One rng for every augmented input: the same partner and lambda for all of them.
      aug_rng = jax.random.fold_in(rng, 1)
      mix_fn = functools.partial(augment.augment, aug_rng, targets=targets, task_ids=task_ids,
                                 class_mask=class_mask, kind=aug.kind, alpha=aug.alpha,
                                 label_smoothing=aug.label_smoothing, example_mask=weight > 0)
      _, targets, aug_stats = mix_fn(jnp.zeros((batch_size, 1)), mask=None)

    def mix(name, x, mask):
      return mix_fn(x, mask=mask)[0] if name in aug_inputs and aug.kind != "none" else x

    def loss_fn(encoder_params, row_params):
      pooled, _ = self.encoder.apply({"params": encoder_params}, batch, deterministic=False,
                                     rngs={"dropout": rng}, mix=mix)
      pooled = mix("pooled", pooled, None)
      logits = task_layers.apply_task_layers(row_params, pooled, head_index, adapter_index,
                                             slots > 0)
      per_example = losses.soft_cross_entropy(logits, targets, class_mask)
      return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0), logits

    (loss, logits), (encoder_grads, row_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params["encoder"], row_params)
    grad_norm = optax.global_norm((encoder_grads, row_grads))
    clip = jnp.minimum(1.0, config.optimizer.clip_norm / (grad_norm + 1e-6))
    encoder_grads, row_grads = jax.tree.map(lambda g: g * clip, (encoder_grads, row_grads))

    updates, opt_state = self.tx.update(encoder_grads, state.opt_state, state.params["encoder"])
    encoder = optax.apply_updates(state.params["encoder"], updates)
    learning_rate = self.schedule(state.step)
    new_tasks, task_opt_state = {}, {}
    for k in rows:
      new_tasks[k], task_opt_state[k] = optim.row_adam_update(
          tasks[k], state.task_opt_state[k], rows[k], row_grads[k], learning_rate, config)

    predicted = jnp.argmax(losses.mask_logits(logits, class_mask), axis=-1)
    metrics = {
        "loss": loss,
        "accuracy": jnp.sum((predicted == batch["label"]) * weight) / jnp.maximum(
            jnp.sum(weight), 1.0),
        "grad_norm": grad_norm,
        "encoder_param_norm": optax.global_norm(encoder),
        "learning_rate": learning_rate,
        "tasks_in_batch": jnp.sum(head_rows < self.num_tasks),
    }
    metrics.update(aug_stats)
    new_state = state.replace(
        step=state.step + 1, params={"encoder": encoder, "tasks": new_tasks},
        opt_state=opt_state, task_opt_state=task_opt_state)
    if config.optimizer.nonfinite == "skip":
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      new_state = jax.lax.cond(finite, lambda: new_state,
                               lambda: state.replace(step=state.step + 1))
      metrics["skipped_steps"] = 1 - finite.astype(jnp.int32)
    return new_state, metrics

  def eval_sums(self, params, adapter_map, num_classes, batch) -> dict:
    """Per-task sums over the real examples of one batch: [T] vectors (see evaluation.py)."""
    pooled, _ = self.encoder.apply({"params": params["encoder"]}, batch, deterministic=True)
    task_ids = batch["task_id"]
    slots = adapter_map[task_ids]
    logits = task_layers.apply_task_layers(params["tasks"], pooled, task_ids, slots, slots > 0)
    class_mask = task_layers.class_mask(num_classes, task_ids, self.config.model.max_classes)
    masked = losses.mask_logits(logits.astype(jnp.float32), class_mask)
    label_logit = jnp.take_along_axis(masked, batch["label"][:, None], axis=-1)
    rank = jnp.sum(masked > label_logit, axis=-1)  # Classes scored strictly above the label.
    loss = losses.cross_entropy(logits, batch["label"], class_mask)
    # Held-out (unseen) classes are scored by `predict_probs`, not here.
    weight = batch["example_mask"].astype(jnp.float32) * (
        batch["label"] < num_classes[task_ids])
    loss = jnp.where(weight > 0, loss, 0.0)
    total = lambda v: jax.ops.segment_sum(v * weight, task_ids, num_segments=self.num_tasks)
    # Reliability-diagram sums: max-softmax confidence in CALIBRATION_BINS right-closed bins.
    confidence = jnp.max(jax.nn.softmax(masked, axis=-1), axis=-1)
    bins = jnp.searchsorted(jnp.linspace(0.0, 1.0, CALIBRATION_BINS + 1)[1:-1], confidence,
                            side="left")
    per_bin = lambda v: jax.ops.segment_sum(v * weight, bins, num_segments=CALIBRATION_BINS)
    correct = jnp.argmax(masked, axis=-1) == batch["label"]
    return {"count": total(jnp.ones_like(weight)), "correct": total(rank == 0),
            "correct_top5": total(rank < 5), "loss": total(loss),
            "calibration_count": per_bin(jnp.ones_like(weight)),
            "calibration_confidence": per_bin(confidence), "calibration_correct": per_bin(correct)}

  def predict_probs(self, params, adapter_map, num_classes, batch) -> jax.Array:
    """[B, C] class probabilities over each example's (trained) task classes."""
    pooled, _ = self.encoder.apply({"params": params["encoder"]}, batch, deterministic=True)
    task_ids = batch["task_id"]
    slots = adapter_map[task_ids]
    logits = task_layers.apply_task_layers(params["tasks"], pooled, task_ids, slots, slots > 0)
    class_mask = task_layers.class_mask(num_classes, task_ids, self.config.model.max_classes)
    return jnp.exp(losses.masked_log_softmax(logits, class_mask))

  def jitted_train_step(self, num_adapter_slots: int):
    if num_adapter_slots not in self._train_step:
      state_sh = self.state_shardings(num_adapter_slots)
      self._train_step[num_adapter_slots] = jax.jit(
          self.train_step, donate_argnums=0, in_shardings=(state_sh, self.batch_sharding),
          out_shardings=(state_sh, sharding.replicated(self.mesh)))
    return self._train_step[num_adapter_slots]

  def jitted_eval_sums(self, num_adapter_slots: int):
    if num_adapter_slots not in self._eval_step:
      state_sh = self.state_shardings(num_adapter_slots)
      self._eval_step[num_adapter_slots] = jax.jit(
          self.eval_sums, in_shardings=(state_sh.params, state_sh.adapter_map,
                                        state_sh.num_classes, self.batch_sharding),
          out_shardings=sharding.replicated(self.mesh))
    return self._eval_step[num_adapter_slots]

  def global_batch(self, local_batch: dict) -> dict:
    """This process's slice -> global arrays sharded over the mesh's `data` axis."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()}

  def evaluate(self, state: TrainState, catalogue, split: str, tokenizer) -> dict:
    """Per-task sums over a whole split, as numpy [T] vectors."""
    step_fn = self.jitted_eval_sums(num_adapter_slots(state))
    totals = None
    for local in input_pipeline.eval_batches(catalogue, split, tokenizer, self.config,
                                             jax.process_index(), jax.process_count()):
      sums = step_fn(state.params, state.adapter_map, state.num_classes, self.global_batch(local))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:  # An empty split.
      return {**{k: np.zeros(self.num_tasks) for k in evaluation.SUM_KEYS},
              **{f"calibration_{k}": np.zeros(CALIBRATION_BINS)
                 for k in ("count", "confidence", "correct")}}
    return jax.tree.map(np.asarray, jax.device_get(totals))


def num_adapter_slots(state: TrainState) -> int:
  return state.params["tasks"]["adapters"]["up"].shape[0]


# --- The run ---------------------------------------------------------------------------------

def prepare_data(config, workdir: epath.Path):
  """The catalogue (generated into the workdir if none is configured) and its tokenizer."""
  if config.data.catalogue_dir:
    catalogue_dir = epath.Path(config.data.catalogue_dir)
  else:
    catalogue_dir = workdir / "catalogue"
    synthetic.generate_catalogue(catalogue_dir, config.data.synthetic)
  catalogue = tfds_builder.load_catalogue(str(catalogue_dir), str(workdir / "prepared"),
                                          on_bad_record=config.data.on_bad_record)
  if config.data.tokenizer_dir:
    tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer_dir)
  elif config.model.text_init:
    from mtl_jax import pretrained  # Local: only runs that load weights need it.
    tokenizer = pretrained.load_tokenizer_for(config.model.text_init)
  else:
    tokenizer = tokenizer_lib.build_tokenizer(catalogue, str(workdir / "tokenizer"),
                                              config.data.vocab_size)
  local = workdir / "tokenizer"
  if not local.exists() and jax.process_index() == 0:
    # A copy beside the checkpoints, so that the run predicts (mtl_jax.predict) and grows
    # (mtl_jax.new_task) without the original directory or package.
    tmp = workdir / f".tokenizer.tmp-{os.getpid()}"
    tokenizer.save_pretrained(os.fspath(tmp))
    tmp.rename(local)
  return catalogue, tokenizer


def _log_and_print(writer, step, split, rows, summary):
  writer.write_scalars(step, {f"{split}/{k}": v for k, v in summary.items()
                              if isinstance(v, (int, float))})
  if jax.process_index() == 0:
    print(evaluation.format_table(split, rows, summary), flush=True)


def train_and_evaluate(config, workdir: str, stop_at_step: int | None = None) -> dict:
  """Trains on every task of the catalogue, evaluates, and writes the report.

  Re-running with the same workdir resumes from its latest checkpoint. `stop_at_step` ends the
  run early (after checkpointing) as a preemption would; tests use it. Returns the test summary
  (or the latest validation summary when stopped early).
  """
  if "://" not in str(workdir):
    workdir = os.path.abspath(workdir)  # Orbax refuses relative checkpoint paths.
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config_base.validate_config(config, jax.device_count(), jax.process_count())
  if jax.process_index() == 0:
    catalogue, tokenizer = prepare_data(config, workdir)
  if jax.process_count() > 1:
    # Process 0 prepares first; the others then reuse its files (a shared filesystem) or
    # prepare their own copy, never racing on the same directory.
    multihost_utils.sync_global_devices("mtl_jax: data prepared")
    if jax.process_index() > 0:
      catalogue, tokenizer = prepare_data(config, workdir)
  task_table = catalogue.task_table
  config_base.validate_against_data(config, task_table)

  mesh = sharding.make_mesh(config.mesh)
  spec = model_spec(config, task_table, len(tokenizer))
  trainer = Trainer(config, spec,
                    trained_num_classes(task_table.num_classes, config.eval.holdout_classes), mesh)
  mngr = checkpointing.manager(str(workdir), config.max_to_keep)
  restored = checkpointing.restore_latest(
      mngr, lambda meta: trainer.abstract_state(meta["num_adapter_slots"]))
  if restored is None:
    state = trainer.create_state(jax.random.key(config.seed))
    if config.model.text_init:
      from mtl_jax import pretrained  # Local: only runs that load weights need it.
      encoder = pretrained.load_text_encoder(config.model.text_init, state.params["encoder"],
                                             spec)
      state = state.replace(params={**state.params, "encoder": jax.device_put(
          encoder, trainer.state_shardings().params["encoder"])})
    start_step = 0
    dypa_events = []
  else:
    start_step, state, meta = restored
    dypa_events = meta.get("dypa_events", [])
    if meta["data_iterator"]["next_step"] != start_step:
      raise checkpointing.CheckpointError(
          f"Checkpoint {start_step} in {mngr.directory} holds data position "
          f"{meta['data_iterator']['next_step']}; it does not belong to this run.")
    if jax.process_index() == 0:
      print(f"Resumed from step {start_step} ({mngr.directory / str(start_step)})", flush=True)
  train_sizes = np.diff(catalogue.task_offsets["train"])

  writer = metric_writers.create_default_writer(
      str(workdir), just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
  progress = periodic_actions.ReportProgress(
      num_train_steps=config.total_steps, writer=writer, every_secs=30)
  batches = input_pipeline.TrainBatches(catalogue, tokenizer, config, start_step,
                                        jax.process_index(), jax.process_count())

  def meta_for(state):
    return {"data_iterator": batches.state(), "config": config.to_json(),
            "task_table": task_table.to_json(), "num_adapter_slots": num_adapter_slots(state),
            "num_tasks": trainer.num_tasks, "dypa_events": dypa_events,
            "model_spec": dataclasses.asdict(spec)}

  def checkpoint(state):
    checkpointing.save(mngr, int(state.step), state, meta_for(state), force=True)

  def check_finite(step, metrics, task_ids):
    if not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
      if config.optimizer.nonfinite == "skip":
        names = sorted({task_table.names[t] for t in np.unique(task_ids)})
        print(f"WARNING: step {step} skipped: non-finite loss or gradient; tasks in that "
              f"batch: {', '.join(names)}", flush=True)
        return
      mngr.wait_until_finished()
      latest = mngr.latest_step()
      names = sorted({task_table.names[t] for t in np.unique(task_ids)})
      raise NonFiniteLossError(
          f"Non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at "
          f"step {step}; tasks in that batch: {', '.join(names)}. Last good checkpoint: "
          f"{workdir / 'checkpoints' / str(latest) if latest is not None else 'none'}. "
          "Lower --config.optimizer.learning_rate or check those tasks' data.")

  def drain(keep):
    """Reads back the metrics of all but the last `keep` dispatched steps."""
    while len(pending) > keep:
      done_step, done_metrics, task_ids = pending.pop(0)
      done_metrics = jax.device_get(done_metrics)
      check_finite(done_step, done_metrics, task_ids)
      history.append(done_metrics)

  # Two programs in flight keep the device busy while the host reads the previous step's loss.
  # Fake multi-device CPU meshes deadlock with several collective programs queued, so there
  # each step is awaited.
  lag = 0 if jax.default_backend() == "cpu" and jax.device_count() > 1 else 1
  pending, history = [], []
  last_summary = {}
  step = start_step
  evaluations = step // config.eval_every  # Validation evaluations done so far in this run.
  started = time.time()
  preempted = []
  previous_handler = None
  if threading.current_thread() is threading.main_thread():
    # SIGTERM (a preempted VM, a scheduler): checkpoint at the current step and exit cleanly.
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  try:
    while step < config.total_steps:
      local = next(batches)
      train_step = trainer.jitted_train_step(num_adapter_slots(state))
      state, metrics = train_step(state, trainer.global_batch(local))
      step += 1
      pending.append((step, metrics, local["task_id"]))
      drain(keep=lag)
      progress(step)
      if step % config.log_every == 0 or step == config.total_steps:
        drain(keep=0)
        means = {k: float(np.nanmean([h[k] for h in history])) for k in history[0]}
        writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
        history = []
        if jax.process_index() == 0:
          rate = (step - start_step) / (time.time() - started)
          print(f"step {step}/{config.total_steps}: loss {means['loss']:.4f}, accuracy "
                f"{means['accuracy']:.3f}, {rate:.1f} steps/s, ETA "
                f"{(config.total_steps - step) / max(rate, 1e-9):.0f}s", flush=True)
      evaluate_now = step % config.eval_every == 0 and step < config.total_steps
      allocate_now = dypa.is_due(config, step, evaluations + evaluate_now, evaluate_now)
      if evaluate_now or allocate_now:
        rows = evaluation.task_rows(task_table, trainer.evaluate(state, catalogue, "validation",
                                                                 tokenizer), train_sizes)
        evaluations += evaluate_now
        last_summary = evaluation.summarize(rows)
        _log_and_print(writer, step, "validation", rows, last_summary)
      if allocate_now:
        state, event = dypa.expand(trainer, state, rows, step)
        dypa_events.append(event)
        writer.write_scalars(step, {"dypa/adapters": event["adapters_after"],
                                    "dypa/parameters": event["parameters_after"],
                                    "dypa/new_adapters": len(event["tasks"])})
        if jax.process_index() == 0:
          print(f"DyPa at step {step}: {len(event['tasks'])} new adapters "
                f"({event['adapters_after']} in all, task-specific share "
                f"{100 * event['task_specific_share_after']:.2f}%): "
                f"{', '.join(event['tasks'])}", flush=True)
      if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
        preempted.append(True)
      stopping = step < config.total_steps and (
          any(preempted) or (stop_at_step is not None and stop_at_step <= step))
      if step % config.checkpoint_every == 0 or step == config.total_steps or stopping:
        checkpoint(state)
      if stopping:
        mngr.wait_until_finished()
        if any(preempted) and jax.process_index() == 0:
          print(f"Preempted: checkpoint written at step {step} in {mngr.directory}; run the "
                "same command to resume.", flush=True)
        if previous_handler is not None:
          signal.signal(signal.SIGTERM, previous_handler)
        return last_summary
  finally:
    batches.close()

  drain(keep=0)
  mngr.wait_until_finished()
  results = {}
  for split in ("validation", "test"):
    sums = trainer.evaluate(state, catalogue, split, tokenizer)
    # Bad records skipped from this split and from the train split, per task and in total.
    skipped = (catalogue.skipped.get(split, {}), catalogue.skipped.get("train", {}))
    rows = evaluation.task_rows(task_table, sums, train_sizes, *skipped)
    results[split] = evaluation.summarize(rows, *skipped)
    if jax.process_index() == 0:
      evaluation.write_report(workdir, split, int(state.step), rows, results[split])
      if split == "test":
        report_html.write_calibration(workdir, report_html.calibration_from_sums(
            sums["calibration_count"], sums["calibration_confidence"],
            sums["calibration_correct"]))
    _log_and_print(writer, int(state.step), split, rows, results[split])
  writer.flush()
  mngr.close()
  if jax.process_index() == 0:
    # The page reads the reports just written and the last checkpoint's DyPa events.
    print(f"Report: {report_html.write_html_report(workdir)}", flush=True)
  if previous_handler is not None:  # A SIGTERM during the final evaluation lets it finish.
    signal.signal(signal.SIGTERM, previous_handler)
  return results["test"]


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float, str, bool)):
      out[f"{prefix}{k}"] = v
  return out
