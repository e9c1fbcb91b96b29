"""Optimisers: optax AdamW for the shared encoder, a row-wise AdamW for stacked task parameters.

The task heads hold a few rows (class blocks) per task and the adapters one row per slot. A batch
holds examples of a few dozen tasks, so with `task_update="sparse"` the step updates only their
rows: it gathers their gradients, moments and parameters, applies AdamW, and scatters them
back. A task absent from a batch is left exactly as it was: no weight decay, no drift on old
momentum, and its own step counter for Adam's bias correction (as a sparse optimiser that skips
parameters with no gradient would). The cost per step is then set by the batch, not by the
number of tasks.
`task_update="dense"` passes every row every step: plain AdamW semantics, for comparison.

Weight decay is decided by a parameter's leaf name, never its rank (`nn.scan` and the stacked
task rows add a leading axis to every bias and LayerNorm parameter): `kernel`, `embedding` and
the adapters' `down`/`up` matrices decay; `bias`, LayerNorm `scale` and `down_bias`/`up_bias`
do not; any other name raises, so a new parameter must be added to one of the two lists.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * end_factor`."""
  opt = cfg.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate,
      warmup_steps=min(opt.warmup_steps, max(total_steps - 1, 0)),
      decay_steps=max(total_steps, 1),
      end_value=opt.learning_rate * opt.end_learning_rate_factor)


# Leaf names (the last key of a parameter's path) and whether AdamW decays them.
DECAYED_NAMES = frozenset({"kernel", "embedding", "down", "up"})
UNDECAYED_NAMES = frozenset({"bias", "scale", "down_bias", "up_bias"})


def _leaf_name(path) -> str:
  """The last name in a `tree_map_with_path` path (skipping e.g. a box's `.value` attribute)."""
  for key in reversed(tuple(path)):
    if isinstance(key, jax.tree_util.DictKey):
      return str(key.key)
    if isinstance(key, str):
      return key
  raise ValueError(f"Parameter path {jax.tree_util.keystr(tuple(path))} has no name.")


def decays(path) -> bool:
  """Whether weight decay applies to the parameter at `path`, by its leaf name (see above)."""
  name = _leaf_name(path)
  if name in DECAYED_NAMES:
    return True
  if name in UNDECAYED_NAMES:
    return False
  raise ValueError(
      f"No weight-decay rule for parameter {name!r} (path {jax.tree_util.keystr(tuple(path))}"
      f"): add it to DECAYED_NAMES or UNDECAYED_NAMES in mtl_jax/optim.py.")


def encoder_optimizer(cfg, schedule: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """AdamW at `schedule` times `optimizer.encoder_lr_factor`, decay masked by `decays`."""
  opt = cfg.optimizer
  factor, rate = opt.encoder_lr_factor, schedule
  if factor != 1.0:
    rate = (lambda step: factor * schedule(step)) if callable(schedule) else factor * schedule
  return optax.adamw(
      rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
      mask=lambda params: jax.tree_util.tree_map_with_path(lambda p, _: decays(p), params))


class RowAdamState(NamedTuple):
  mu: dict
  nu: dict
  count: jax.Array  # [R] int32: updates each row has received.


def row_adam_init(rows: dict) -> RowAdamState:
  num_rows = jax.tree.leaves(rows)[0].shape[0]
  return RowAdamState(
      mu=jax.tree.map(jnp.zeros_like, rows), nu=jax.tree.map(jnp.zeros_like, rows),
      count=jnp.zeros((num_rows,), jnp.int32))


def unique_rows(index: jax.Array, num_rows: int, size: int):
  """Distinct values of `index` padded with `num_rows` (an out-of-range row) to a static size.

  Returns (rows [size], position of each element of `index` in `rows`).
  """
  rows, inverse = jnp.unique(
      index, size=size, fill_value=num_rows, return_inverse=True)
  return rows.astype(jnp.int32), inverse.reshape(index.shape).astype(jnp.int32)


def gather_rows(tree, rows):
  """Rows of every leaf; out-of-range padding rows read as zeros."""
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=0, mode="fill", fill_value=0), tree)


def scatter_rows(tree, rows, values):
  """Writes `values` into `rows` of every leaf; out-of-range padding rows are dropped."""
  return jax.tree.map(lambda x, v: x.at[rows].set(v.astype(x.dtype), mode="drop"), tree, values)


def row_adam_update(params, state: RowAdamState, rows, row_grads, learning_rate, cfg):
  """AdamW on the given rows only. Returns (params, state) with every other row untouched."""
  opt = cfg.optimizer
  count = jnp.take(state.count, rows, mode="fill", fill_value=0) + 1
  mu = jax.tree.map(lambda m, g: opt.b1 * m + (1 - opt.b1) * g,
                    gather_rows(state.mu, rows), row_grads)
  nu = jax.tree.map(lambda v, g: opt.b2 * v + (1 - opt.b2) * jnp.square(g),
                    gather_rows(state.nu, rows), row_grads)
  row_params = gather_rows(params, rows)

  def step(path, p, m, v):
    shape = (-1,) + (1,) * (p.ndim - 1)
    m_hat = m / (1 - opt.b1 ** count.reshape(shape))
    v_hat = v / (1 - opt.b2 ** count.reshape(shape))
    update = m_hat / (jnp.sqrt(v_hat) + opt.eps)
    if decays(path):  # Same rule as the encoder's: matrices decay, biases do not.
      update = update + opt.weight_decay * p
    return p - learning_rate * update

  new_rows = jax.tree_util.tree_map_with_path(step, row_params, mu, nu)
  return (scatter_rows(params, rows, new_rows),
          RowAdamState(mu=scatter_rows(state.mu, rows, mu), nu=scatter_rows(state.nu, rows, nu),
                       count=state.count.at[rows].set(count, mode="drop")))
