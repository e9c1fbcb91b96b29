"""Task heads and DyPa adapters: one stacked parameter tree each, applied per example by index.

    heads:    kernel [T, H, C], bias [T, C]      row t is task t's classifier
    adapters: down [A, H, r], down_bias [A, r], up [A, r, H], up_bias [A, H]
              row a is adapter slot a; slot 0 is "no adapter" (the identity)

An example of task t uses head row t and adapter row `adapter_map[t]`. Each head is a function of
one row; `jax.vmap` over the batch applies every example's own row, gathered by index, so one
compiled program serves any number of tasks (never a Python loop, never one program per task).
C is the widest task's class count; narrower tasks mask the columns they lack (`losses.py`).

The functions take the rows to use (`head_index`, `adapter_index` index into whatever leading
axis the given tree has), so the train step can pass just the rows of the tasks in its batch.
"""
import jax
import jax.numpy as jnp

# Logical axis names of every task parameter; the config's sharding rules map them to the mesh.
PARAM_AXES = {
    "heads": {"kernel": ("task", "embed", "classes"), "bias": ("task", "classes")},
    "adapters": {
        "down": ("adapter", "embed", "bottleneck"),
        "down_bias": ("adapter", "bottleneck"),
        "up": ("adapter", "bottleneck", "embed"),
        "up_bias": ("adapter", "embed"),
    },
}


def init_heads(rng, num_tasks: int, hidden_size: int, max_classes: int) -> dict:
  return {
      "kernel": 0.02 * jax.random.normal(rng, (num_tasks, hidden_size, max_classes), jnp.float32),
      "bias": jnp.zeros((num_tasks, max_classes), jnp.float32),
  }


def init_adapters(rng, num_slots: int, hidden_size: int, adapter_size: int) -> dict:
  """Adapter rows whose output projection is zero, so a new adapter starts as the identity."""
  return {
      "down": 0.02 * jax.random.normal(rng, (num_slots, hidden_size, adapter_size), jnp.float32),
      "down_bias": jnp.zeros((num_slots, adapter_size), jnp.float32),
      "up": jnp.zeros((num_slots, adapter_size, hidden_size), jnp.float32),
      "up_bias": jnp.zeros((num_slots, hidden_size), jnp.float32),
  }


def init_task_params(rng, num_tasks, num_adapter_slots, hidden_size, max_classes, adapter_size):
  head_rng, adapter_rng = jax.random.split(rng)
  return {
      "heads": init_heads(head_rng, num_tasks, hidden_size, max_classes),
      "adapters": init_adapters(adapter_rng, num_adapter_slots, hidden_size, adapter_size),
  }


def _adapter(row, x):
  """One bottleneck adapter on one pooled vector: x + up(gelu(down(x)))."""
  h = jax.nn.gelu(x @ row["down"] + row["down_bias"], approximate=False)
  return x + h @ row["up"] + row["up_bias"]


def _head(row, x):
  """One task's linear classifier on one pooled vector."""
  return x @ row["kernel"] + row["bias"]


def _gather(tree, index):
  return jax.tree.map(lambda x: jnp.take(x, index, axis=0), tree)


def apply_task_layers(task_params, pooled, head_index, adapter_index, adapter_active):
  """pooled [B, H] -> logits [B, C] through each example's own adapter and head.

  Args:
    task_params: {"heads": ..., "adapters": ...}, any number of rows each.
    pooled: [B, H] float32.
    head_index: [B] int, the example's row in `task_params["heads"]`.
    adapter_index: [B] int, the example's row in `task_params["adapters"]`.
    adapter_active: [B] bool, False where the example's task maps to slot 0 (identity).
  """
  adapted = jax.vmap(_adapter)(_gather(task_params["adapters"], adapter_index), pooled)
  pooled = jnp.where(adapter_active[:, None], adapted, pooled)
  return jax.vmap(_head)(_gather(task_params["heads"], head_index), pooled)


def class_mask(num_classes: jax.Array, task_ids: jax.Array, max_classes: int) -> jax.Array:
  """[B, C] bool: True for the classes the example's task has."""
  return jnp.arange(max_classes)[None, :] < num_classes[task_ids][:, None]
