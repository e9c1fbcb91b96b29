"""The train state: what it holds, its shapes and shardings, and the one way it grows.

Shapes first: `Model.abstract_state` is `jax.eval_shape` of `init_state`; shardings come from the
logical axis names (the encoder's, and `task_layers.PARAM_AXES`) and the config's rules; and
`Model.create_state` is `jax.jit(init_state, out_shardings=...)`, so parameters are born sharded.

The state grows in two ways, both through `grow`: DyPa gives existing tasks adapter slots of their
own, and `new_task` adds tasks: head blocks after the existing tasks' ones (and optionally
adapters). Growing adds rows to the stacked arrays and to their row-wise optimiser state (zero
moments, zero step counts); the new adapter slots start as the identity, so no existing output
changes at that moment.
"""
import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from mtl_jax import optim
from mtl_jax import sharding
from mtl_jax import task_layers
from mtl_jax.model import Encoder, ModelSpec


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: the number of updates applied.
  params: dict  # {"encoder": ..., "tasks": {"heads": ..., "adapters": ...}}
  opt_state: optax.OptState  # The encoder's AdamW state.
  task_opt_state: dict  # {"heads": RowAdamState, "adapters": RowAdamState}
  adapter_map: jax.Array  # [T] int32: task -> adapter slot (0: none).
  num_classes: jax.Array  # [T] int32: each task's trained class count.


def model_spec(config, task_table, vocab_size: int) -> ModelSpec:
  m = config.model
  spec = ModelSpec.from_config(
      m,
      # Rounded up so that the word table splits evenly over a `model` axis (rules shard
      # `vocab`); ids past the tokenizer's are never used.
      vocab_size=-(-vocab_size // 128) * 128, max_positions=config.data.max_text_len,
      image_dim=task_table.image_dim, max_images=task_table.max_images)
  if m.text_init:
    # Table sizes follow the checkpoint; the layer sizes stay the config's, and the loader
    # names any field that disagrees with the checkpoint.
    from mtl_jax import pretrained  # Local: only runs that load weights need it.
    overrides = pretrained.spec_overrides(m.text_init)
    spec = dataclasses.replace(spec, **{k: overrides[k] for k in (
        "vocab_size", "max_positions", "layer_norm_eps", "type_vocab_size")})
  return spec


HOLDOUT_MODES = ("last", "shared")


def trained_num_classes(num_classes, holdout: int) -> np.ndarray:
  """Class counts the model trains on: each task's last `holdout` classes held out, where
  at least 2 classes remain (`holdout_mode="last"`; `holdout_plan` covers every mode)."""
  num_classes = np.asarray(num_classes, np.int32)
  return np.where(num_classes - holdout >= 2, num_classes - holdout, num_classes).astype(np.int32)


def holdout_plan(class_names, holdout: int, mode: str = "last"
                 ) -> tuple[np.ndarray, np.ndarray | None]:
  """Which classes each task holds out of training, and the model's class order.

  The model always trains on a task's first `trained[t]` head columns; held-out classes are
  moved behind them, so that a label >= trained[t] (in model order) means "unseen" everywhere
  (loss weight, class mask, reports).

  Modes:
    "last": each task's last `holdout` classes (catalogue order), where >= 2 classes remain.
      The model order is the catalogue order.
    "shared": the names of those classes are held out of *every* task that has a class of that
      name (compared without case and extra spaces), so that no other site teaches the model a
      held-out class. A task that would keep
      fewer than 2 classes holds none out (as in "last"); its examples of those names then
      count as known.

  Args:
    class_names: per task, its class names (`TaskTable.class_names`).
    holdout: k, the classes held out per task ("last") or the per-task source of held-out
      names ("shared").
    mode: one of `HOLDOUT_MODES`.

  Returns:
    (trained [T] int32, class_order): class_order is None when the model order is the catalogue
    order, else [T, C_max] int32 whose row t lists task t's catalogue class indices in model
    order (known classes first, each group in catalogue order; -1 pads).
  """
  if mode not in HOLDOUT_MODES:
    raise ValueError(f"Unknown eval.holdout_mode {mode!r}; use one of {HOLDOUT_MODES}.")
  full = np.array([len(c) for c in class_names], np.int32)
  trained = trained_num_classes(full, holdout)
  if mode == "last" or holdout == 0:
    return trained, None
  key = lambda name: " ".join(name.casefold().split())  # Case and spacing do not make a class.
  held_names = {key(name) for classes, k in zip(class_names, trained) for name in classes[k:]}
  order = np.full((len(full), max(full, default=0)), -1, np.int32)
  for t, classes in enumerate(class_names):
    held = np.array([key(c) in held_names for c in classes], bool)
    if len(classes) - held.sum() < 2:
      held[:] = False
    trained[t] = len(classes) - held.sum()
    order[t, :len(classes)] = np.r_[np.flatnonzero(~held), np.flatnonzero(held)]
  return trained, order


def holdout_for(config, task_table) -> tuple[np.ndarray, np.ndarray | None]:
  """`holdout_plan` of a run's config and task table (runs saved before `eval.holdout_mode`
  existed held out the last classes)."""
  return holdout_plan(task_table.class_names, config.eval.holdout_classes,
                      config.eval.get("holdout_mode", "last"))


def dummy_batch(spec: ModelSpec, batch_size: int = 1) -> dict:
  return {
      "token_ids": jnp.zeros((batch_size, spec.max_positions), jnp.int32),
      "token_mask": jnp.ones((batch_size, spec.max_positions), jnp.int32),
      "images": jnp.zeros((batch_size, spec.max_images, spec.image_dim), jnp.float32),
      "image_mask": jnp.ones((batch_size, spec.max_images), jnp.int32),
  }


def num_adapter_slots(state) -> int:
  return state.params["tasks"]["adapters"]["up"].shape[0]


class Model:
  """What a run's state and steps are built from; fixed for the life of one state shape.

  Attributes:
    config: the run's config.
    spec: the encoder's sizes.
    encoder: the Flax encoder module.
    num_classes: [T] each task's trained class count.
    mesh: the device mesh.
    schedule: the learning rate as a function of the step.
    schedule_start: the state step at which `schedule` starts (new_task trains from a
      restored step with a schedule of its own).
    train_encoder: False: the encoder runs frozen (inference mode, no gradient, no augmentation)
      and only task rows learn (`new_task`).
    tx: the encoder's optax optimiser.
    head_layout: where each task's classes live in the stacked head blocks.
    class_order: None (model order = catalogue order), or [T, C] each task's catalogue class
      indices in head-column order (`holdout_plan`).
    label_map: None, or [T, C] the inverse: catalogue label -> head column. The steps apply it
      to every batch's labels, so everything past the data speaks in head columns.
  """

  def __init__(self, config, spec: ModelSpec, num_classes, mesh, *, schedule_steps=None,
               schedule_start: int = 0, train_encoder: bool = True, class_order=None):
    self.config = config
    self.spec = spec
    self.encoder = Encoder(spec)
    self.num_classes = np.asarray(num_classes, np.int32)
    self.class_order = None if class_order is None else np.asarray(class_order, np.int32)
    self.label_map = None
    if self.class_order is not None:
      self.label_map = np.zeros_like(self.class_order)
      rows, cols = np.nonzero(self.class_order >= 0)
      self.label_map[rows, self.class_order[rows, cols]] = cols
    self.num_tasks = len(self.num_classes)
    self.head_layout = task_layers.HeadLayout.for_classes(
        self.num_classes, config.model.classes_per_block, config.model.max_classes)
    self.mesh = mesh
    self.schedule = optim.learning_rate_schedule(
        config, config.total_steps if schedule_steps is None else schedule_steps)
    self.schedule_start = schedule_start
    self.train_encoder = train_encoder
    self.tx = optim.encoder_optimizer(config, self.schedule)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.jit_cache = {}  # (kind, number of adapter slots) -> jitted function (steps.py).

  def class_names(self, task_table, task: int) -> tuple[str, ...]:
    """The names of task `task`'s trained classes, in head-column order."""
    names = task_table.class_names[task]
    k = int(self.num_classes[task])
    if self.class_order is None:
      return names[:k]
    return tuple(names[j] for j in self.class_order[task, :k])

  def init_state(self, rng, num_adapter_slots: int = 1) -> TrainState:
    encoder_rng, task_rng = jax.random.split(rng)
    encoder = nn.meta.unbox(self.encoder.init({"params": encoder_rng}, dummy_batch(self.spec))
                            ["params"])
    m = self.config.model
    tasks = task_layers.init_task_params(
        task_rng, self.head_layout, num_adapter_slots, self.spec.hidden_size, m.adapter_size,
        m.adapter_layers)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"encoder": encoder, "tasks": tasks},
        opt_state=self.tx.init(encoder),
        task_opt_state={k: optim.row_adam_init(v) for k, v in tasks.items()},
        adapter_map=jnp.zeros((self.num_tasks,), jnp.int32),
        num_classes=jnp.asarray(self.num_classes))

  def state_shapes(self, num_adapter_slots: int = 1):
    return jax.eval_shape(functools.partial(self.init_state, num_adapter_slots=num_adapter_slots),
                          jax.random.key(0))

  @functools.lru_cache(maxsize=None)
  def state_shardings(self):
    """NamedShardings for every leaf of the state, from logical axis names and config rules.

    They do not depend on the number of adapter slots (rules name axes, not sizes), so one
    set serves the state as DyPa grows it.
    """
    boxed = jax.eval_shape(lambda: self.encoder.init(
        {"params": jax.random.key(0)}, dummy_batch(self.spec))["params"])
    encoder_specs = nn.get_partition_spec(boxed)
    task_specs = jax.tree.map(lambda axes: P(*axes), task_layers.PARAM_AXES,
                              is_leaf=lambda x: isinstance(x, tuple))
    opt_specs = optax.tree_map_params(
        self.tx, lambda _, s: s, self.state_shapes().opt_state, encoder_specs,
        transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
    row_axis = {"heads": "task", "adapters": "adapter"}
    specs = TrainState(
        step=P(), params={"encoder": encoder_specs, "tasks": task_specs},
        opt_state=opt_specs,
        task_opt_state={k: optim.RowAdamState(mu=task_specs[k], nu=task_specs[k],
                                              count=P(row_axis[k])) for k in task_specs},
        adapter_map=P(), num_classes=P())
    layout = self.head_layout
    rules = sharding.resolve_rules(
        self.config.sharding_rules, self.mesh, layout.num_rows,
        head_params=layout.num_rows * (self.spec.hidden_size + 1) * layout.block,
        encoder_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(boxed))))
    return sharding.logical_to_sharding(specs, self.mesh, rules)

  def abstract_state(self, num_adapter_slots: int = 1):
    """ShapeDtypeStructs with shardings: the target of a checkpoint restore."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        self.state_shapes(num_adapter_slots), self.state_shardings())

  def create_state(self, rng, num_adapter_slots: int = 1) -> TrainState:
    """Parameters born sharded: init compiled with the target shardings as its outputs."""
    init = jax.jit(self.init_state, static_argnums=1,
                   out_shardings=self.state_shardings())
    return init(rng, num_adapter_slots)

  def global_batch(self, local_batch: dict) -> dict:
    """This process's slice -> global arrays sharded over the mesh's `data` axis."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()}


def _append_rows(params, opt_state: optim.RowAdamState, fresh):
  """Rows appended to a stacked tree and to its row-wise AdamW state (zero moments, count 0)."""
  concat = lambda old, new: jnp.concatenate([old, new.astype(old.dtype)])
  zeros = jax.tree.map(jnp.zeros_like, fresh)
  num_new = jax.tree.leaves(fresh)[0].shape[0]
  return (jax.tree.map(concat, params, fresh),
          optim.RowAdamState(mu=jax.tree.map(concat, opt_state.mu, zeros),
                             nu=jax.tree.map(concat, opt_state.nu, zeros),
                             count=concat(opt_state.count, jnp.zeros((num_new,), jnp.int32))))


def _grow_heads(heads, heads_opt, num_classes, fresh, rows, new_num_classes, *, num_rows: int):
  """Head blocks for new tasks: every array extended to `num_rows` block rows, and the new
  tasks' blocks (`rows`) set to `fresh`, with zero moments and step counts."""
  def place(old, new):
    pad = jnp.zeros((num_rows - old.shape[0],) + old.shape[1:], old.dtype)
    return jnp.concatenate([old, pad]).at[rows].set(new.astype(old.dtype))
  zeros = jax.tree.map(jnp.zeros_like, fresh)
  heads_opt = optim.RowAdamState(
      mu=jax.tree.map(place, heads_opt.mu, zeros), nu=jax.tree.map(place, heads_opt.nu, zeros),
      count=place(heads_opt.count, jnp.zeros(rows.shape, jnp.int32)))
  return (jax.tree.map(place, heads, fresh), heads_opt,
          jnp.concatenate([num_classes, new_num_classes.astype(jnp.int32)]))


def _grow_adapters(adapters, adapters_opt, adapter_map, fresh, tasks):
  num_slots = adapters["up"].shape[0]
  adapters, adapters_opt = _append_rows(adapters, adapters_opt, fresh)
  adapter_map = adapter_map.at[tasks].set(num_slots + jnp.arange(tasks.shape[0], dtype=jnp.int32))
  return adapters, adapters_opt, adapter_map


def grow(model: Model, state: TrainState, seed: tuple[int, ...], *, new_num_classes=(),
         adapter_tasks=()) -> TrainState:
  """The state with rows for new tasks and adapter slots for chosen tasks.

  Args:
    model: the Model of the grown state (its task count includes the new tasks).
    state: the state to grow; it is not changed.
    seed: seeds the NumPy generator that initialises the new head rows and adapter slots on
      the host (the same values in every process).
    new_num_classes: trained class counts of tasks appended after the existing ones (their head
      blocks, adapter slot 0 = none).
    adapter_tasks: task indices (in the grown task list) that get one new adapter slot each,
      in order; a task keeps its old slot otherwise.

  Only the grown arrays go through a jitted function (a concatenation, compiled once per shape and
  cached on the model); every other array, the encoder's included, is passed on as it is.
  """
  new_num_classes = np.asarray(new_num_classes, np.int32).reshape(-1)
  adapter_tasks = np.asarray(adapter_tasks, np.int32).reshape(-1)
  tasks = state.params["tasks"]
  task_opt = state.task_opt_state
  heads, heads_opt, num_classes = tasks["heads"], task_opt["heads"], state.num_classes
  adapters, adapters_opt, adapter_map = tasks["adapters"], task_opt["adapters"], state.adapter_map
  head_rng, adapter_rng = (np.random.default_rng([*seed, part]) for part in (0, 1))
  m, hidden = model.config.model, model.spec.hidden_size
  shardings = model.state_shardings()
  if len(new_num_classes):
    layout = model.head_layout
    old_tasks = num_classes.shape[0]
    rows = np.concatenate([layout.task_rows(t) for t in range(old_tasks, layout.num_blocks.size)])
    key = ("grow_heads", heads["kernel"].shape[0], layout.num_rows, len(rows))
    if key not in model.jit_cache:
      model.jit_cache[key] = jax.jit(
          functools.partial(_grow_heads, num_rows=layout.num_rows), out_shardings=(
              shardings.params["tasks"]["heads"], shardings.task_opt_state["heads"],
              shardings.num_classes))
    heads, heads_opt, num_classes = model.jit_cache[key](
        heads, heads_opt, num_classes,
        task_layers.init_heads(head_rng, len(rows), hidden, layout.block), rows,
        new_num_classes)
    adapter_map = jax.device_put(
        jnp.concatenate([adapter_map, jnp.zeros(len(new_num_classes), jnp.int32)]),
        shardings.adapter_map)
  if len(adapter_tasks):
    key = ("grow_adapters", num_adapter_slots(state), len(adapter_tasks), adapter_map.shape[0])
    if key not in model.jit_cache:
      model.jit_cache[key] = jax.jit(_grow_adapters, out_shardings=(
          shardings.params["tasks"]["adapters"], shardings.task_opt_state["adapters"],
          shardings.adapter_map))
    adapters, adapters_opt, adapter_map = model.jit_cache[key](
        adapters, adapters_opt, adapter_map,
        task_layers.init_adapters(adapter_rng, len(adapter_tasks), hidden, m.adapter_size,
                                  m.adapter_layers), adapter_tasks)
  return state.replace(
      params={**state.params, "tasks": {"heads": heads, "adapters": adapters}},
      task_opt_state={"heads": heads_opt, "adapters": adapters_opt},
      adapter_map=adapter_map, num_classes=num_classes)
