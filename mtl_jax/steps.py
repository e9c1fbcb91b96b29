"""The step functions: one forward, and the train, eval and predict steps built on it.

`forward` is the model: encoder -> pooled state -> each example's adapter and head, by index.
Every step calls it: `train_step` with the rows of the tasks in its batch (the sparse row-wise
update), `eval_step` and `predict_step` with every row. All are pure functions of
`(model, state, batch)`; `model` (state.Model) holds what is fixed: config, encoder, mesh and
optimiser. The jitted forms are compiled once per adapter count and cached on the model, so
training recompiles once per DyPa expansion and never per step.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import augment
from mtl_jax import config_base
from mtl_jax import losses
from mtl_jax import optim
from mtl_jax import sharding
from mtl_jax import task_layers
from mtl_jax.state import Model, TrainState, num_adapter_slots


def forward(model: Model, encoder_params, task_params, batch, head_index, adapter_index,
            adapter_active, *, rng=None, mix=None, with_features: bool = False):
  """Logits [B, C] of each example's own task head; with `with_features`, (logits, features
  [B, H]: the pooled state as the head sees it, after the example's adapter).

  Args:
    model: the run's Model.
    encoder_params: the encoder's parameters.
    task_params: {"heads", "adapters"} stacked rows (all of them, or the rows of a batch).
    batch: token_ids, token_mask, images, image_mask.
    head_index: [B, K] each example's head block rows in `task_params` (out of range: none).
    adapter_index: [B] each example's adapter row in `task_params`.
    adapter_active: [B] bool; False where the example's task has no adapter (slot 0: identity).
    rng: dropout rng; None runs the encoder in inference mode.
    mix: the embedding-augmentation hook `mix(name, x, mask)` (train step only).
  """
  mix = mix or (lambda name, x, mask: x)
  pooled, _ = model.encoder.apply({"params": encoder_params}, batch,
                                  deterministic=rng is None,
                                  rngs={} if rng is None else {"dropout": rng}, mix=mix)
  pooled = mix("pooled", pooled, None)
  return task_layers.apply_task_layers(task_params, pooled, head_index, adapter_index,
                                       adapter_active, model.config.model.max_classes,
                                       with_features)


def logits(model: Model, params, adapter_map, batch, with_features: bool = False):
  """[B, C] float32 logits of every example, with every task row available (inference); with
  `with_features`, (logits, [B, H] float32 head inputs)."""
  slots = adapter_map[batch["task_id"]]
  out = forward(model, params["encoder"], params["tasks"], batch,
                model.head_layout.example_rows(batch["task_id"]), slots, slots > 0,
                with_features=with_features)
  return jax.tree.map(lambda x: x.astype(jnp.float32), out)


def model_labels(model: Model, batch) -> jax.Array:
  """The batch's catalogue labels as head columns (`Model.label_map`; unchanged without one)."""
  if model.label_map is None:
    return batch["label"]
  return jnp.asarray(model.label_map)[batch["task_id"], batch["label"]]


def train_step(model: Model, state: TrainState, batch: dict):
  """One update. Returns (new state, metrics).

  The rows updated are those of the tasks (and adapter slots) of the examples that carry loss;
  a task absent from the batch, or present only with examples of held-out classes, is left as it
  was (see optim.py). With `model.train_encoder` False the encoder is frozen and only task rows
  learn.
  """
  config = model.config
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  batch = {**batch, "label": model_labels(model, batch)}
  task_ids = batch["task_id"]
  batch_size = task_ids.shape[0]
  tasks = state.params["tasks"]
  num_slots = num_adapter_slots(state)
  slots = state.adapter_map[task_ids]
  class_mask = task_layers.class_mask(state.num_classes, task_ids, config.model.max_classes)
  # Examples whose label is outside their task's trained classes (held out) carry no loss.
  weight = (batch["label"] < state.num_classes[task_ids]).astype(jnp.float32)
  layout = model.head_layout
  example_blocks = layout.example_rows(task_ids)  # [B, K]; num_rows where a task has fewer.
  if config.optimizer.task_update == "sparse":
    # Examples without loss index an out-of-range padding row: read as zeros, never written.
    head_rows, head_index = optim.unique_rows(
        jnp.where(weight[:, None] > 0, example_blocks, layout.num_rows).reshape(-1),
        layout.num_rows, min(example_blocks.size, layout.num_rows + 1))
    head_index = head_index.reshape(example_blocks.shape)
    # Slot 0 (no adapter) is never updated: its examples index the padding row too.
    adapter_rows, adapter_index = optim.unique_rows(
        jnp.where((slots > 0) & (weight > 0), slots, num_slots), num_slots,
        min(batch_size, num_slots))
  else:
    head_rows, head_index = jnp.arange(layout.num_rows), example_blocks
    adapter_rows, adapter_index = jnp.arange(num_slots), slots
  rows = {"heads": head_rows, "adapters": adapter_rows}
  row_params = {k: optim.gather_rows(tasks[k], rows[k]) for k in rows}
  targets = jax.nn.one_hot(batch["label"], config.model.max_classes) * class_mask

  aug = config.augment
  aug_inputs = config_base.augment_inputs(config)
  augmenting = aug.kind != "none" and model.train_encoder
  aug_stats = {}
  mix = None
  if augmenting:
    # One rng for every augmented input: the same partner and lambda for all of them.
    mix_fn = functools.partial(augment.augment, jax.random.fold_in(rng, 1), targets=targets,
                               task_ids=task_ids, class_mask=class_mask, kind=aug.kind,
                               alpha=aug.alpha, label_smoothing=aug.label_smoothing,
                               example_mask=weight > 0)
    _, targets, aug_stats = mix_fn(jnp.zeros((batch_size, 1)), mask=None)
    mix = lambda name, x, mask: mix_fn(x, mask=mask)[0] if name in aug_inputs else x

  def loss_fn(encoder_params, row_params):
    if not model.train_encoder:
      encoder_params = jax.lax.stop_gradient(encoder_params)
    out = forward(model, encoder_params, row_params, batch, head_index, adapter_index, slots > 0,
                  rng=rng if model.train_encoder else None, mix=mix)
    per_example = losses.soft_cross_entropy(out, targets, class_mask)
    return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0), out

  if model.train_encoder:
    (loss, out), (encoder_grads, row_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params["encoder"], row_params)
  else:
    (loss, out), row_grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        state.params["encoder"], row_params)
    encoder_grads = None
  grad_norm = optax.global_norm((encoder_grads, row_grads))
  clip = jnp.minimum(1.0, config.optimizer.clip_norm / (grad_norm + 1e-6))
  encoder_grads, row_grads = jax.tree.map(lambda g: g * clip, (encoder_grads, row_grads))

  encoder, opt_state = state.params["encoder"], state.opt_state
  if model.train_encoder:
    updates, opt_state = model.tx.update(encoder_grads, opt_state, encoder)
    encoder = optax.apply_updates(encoder, updates)
  learning_rate = model.schedule(state.step - model.schedule_start)
  new_tasks, task_opt_state = {}, {}
  for k in rows:
    new_tasks[k], task_opt_state[k] = optim.row_adam_update(
        tasks[k], state.task_opt_state[k], rows[k], row_grads[k], learning_rate, config)

  predicted = jnp.argmax(losses.mask_logits(out, class_mask), axis=-1)
  metrics = {
      "loss": loss,
      "accuracy": jnp.sum((predicted == batch["label"]) * weight) / jnp.maximum(
          jnp.sum(weight), 1.0),
      "grad_norm": grad_norm,
      "encoder_param_norm": optax.global_norm(encoder),
      "learning_rate": learning_rate,
      "tasks_in_batch": jnp.sum(optim.unique_rows(
          jnp.where(weight > 0, task_ids, model.num_tasks), model.num_tasks,
          min(batch_size, model.num_tasks + 1))[0] < model.num_tasks),
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


def eval_step(model: Model, params, adapter_map, batch, with_features: bool = False) -> dict:
  """Per-example outputs for evaluation (evaluation.evaluate_outputs): logits, label (as a head
  column), task, and with `with_features` the head inputs ("features")."""
  out = {"label": model_labels(model, batch), "task_id": batch["task_id"],
         "example_mask": batch["example_mask"]}
  if with_features:
    out["logits"], out["features"] = logits(model, params, adapter_map, batch, True)
  else:
    out["logits"] = logits(model, params, adapter_map, batch)
  return out


def predict_step(model: Model, params, adapter_map, num_classes, batch) -> jax.Array:
  """[B, C] class probabilities over each example's trained task classes (zero elsewhere)."""
  class_mask = task_layers.class_mask(num_classes, batch["task_id"], model.config.model.max_classes)
  return jnp.exp(losses.masked_log_softmax(logits(model, params, adapter_map, batch), class_mask))


# --- Compiled forms, cached on the model per adapter count ---------------------------------------

def _cached(model: Model, key, build):
  if key not in model.jit_cache:
    model.jit_cache[key] = build()
  return model.jit_cache[key]


def jitted_train_step(model: Model, num_slots: int):
  """`train_step` under jit: state donated, in/out shardings from the config's rules."""
  def build():
    state_sh = model.state_shardings()
    return jax.jit(functools.partial(train_step, model), donate_argnums=0,
                   in_shardings=(state_sh, model.batch_sharding),
                   out_shardings=(state_sh, sharding.replicated(model.mesh)))
  return _cached(model, ("train", num_slots), build)


def jitted_eval_step(model: Model, num_slots: int, with_features: bool = False):
  def build():
    sh = model.state_shardings()
    return jax.jit(functools.partial(eval_step, model, with_features=with_features),
                   in_shardings=(sh.params, sh.adapter_map, model.batch_sharding),
                   out_shardings=sharding.replicated(model.mesh))
  return _cached(model, ("eval_features" if with_features else "eval", num_slots), build)


def jitted_predict_step(model: Model, num_slots: int):
  def build():
    sh = model.state_shardings()
    return jax.jit(functools.partial(predict_step, model),
                   in_shardings=(sh.params, sh.adapter_map, sh.num_classes,
                                 model.batch_sharding),
                   out_shardings=sharding.replicated(model.mesh))
  return _cached(model, ("predict", num_slots), build)


def evaluate_batches(model: Model, params, adapter_map, local_batches,
                     with_features: bool = False):
  """Yields the outputs of each batch's real examples as numpy arrays (`eval_step`'s keys but
  "example_mask"): a stream for consumers that need not hold a whole split (a feature fit)."""
  step_fn = jitted_eval_step(model, params["tasks"]["adapters"]["up"].shape[0], with_features)
  for local in local_batches:
    out = jax.device_get(step_fn(params, adapter_map, model.global_batch(local)))
    real = out.pop("example_mask").astype(bool)
    yield {k: v[real] for k, v in out.items()}


def evaluate(model: Model, params, adapter_map, local_batches,
             with_features: bool = False) -> dict:
  """Outputs of the real examples of every batch, as numpy arrays (one evaluation loop).

  Args:
    local_batches: this process's slices of padded global batches carrying `example_mask`
      (input_pipeline.eval_batches, or any batches of the same form).
    with_features: also return the head inputs (for feature-space unseen-class scores).

  Returns:
    {"logits" [N, C] float32, "label" [N] (head columns), "task_id" [N]} over the real
    examples, and "features" [N, H] float32 with `with_features`.
  """
  parts = list(evaluate_batches(model, params, adapter_map, local_batches, with_features))
  if not parts:
    empty = {"logits": np.zeros((0, model.config.model.max_classes), np.float32),
             "label": np.zeros((0,), np.int32), "task_id": np.zeros((0,), np.int32)}
    if with_features:
      empty["features"] = np.zeros((0, model.spec.hidden_size), np.float32)
    return empty
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def fit_class_gaussians(model: Model, params, adapter_map, local_batches):
  """The Mahalanobis score's class Gaussians (`metrics.TiedGaussianFit`, fitted), streamed over
  batches of the train split: only per-task sums are held, never the split's features."""
  from mtl_jax.evaluation import metrics  # Local: the steps need no evaluation code otherwise.
  fit = metrics.TiedGaussianFit(model.num_classes, model.spec.hidden_size)
  for out in evaluate_batches(model, params, adapter_map, local_batches, with_features=True):
    fit.update(out["features"], out["label"], out["task_id"])
  return fit.fit()
