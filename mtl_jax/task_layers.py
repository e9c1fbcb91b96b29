"""Task heads and DyPa adapters: one stacked parameter tree each, applied per example by index.

    heads:    kernel [T, H, C], bias [T, C]      row t is task t's classifier
    adapters: down [A, L, H, r], down_bias [A, L, r], up [A, L, r, H], up_bias [A, L, H]
              row a is adapter slot a (L residual blocks); slot 0 is "no adapter" (identity)

An example of task t uses head row t and adapter row `adapter_map[t]`. Each head is a function of
one row; `jax.vmap` over the batch applies every example's own row, gathered by index, so one
compiled program serves any number of tasks (never a Python loop, never one program per task).
C is the widest task's class count; narrower tasks mask the columns they lack (`losses.py`).

The functions take the rows to use (`head_index`, `adapter_index` index into whatever leading
axis the given tree has), so the train step can pass just the rows of the tasks in its batch.
"""
import jax
import jax.numpy as jnp
import numpy as np

# Logical axis names of every task parameter; the config's sharding rules map them to the mesh.
PARAM_AXES = {
    "heads": {"kernel": ("task", "embed", "classes"), "bias": ("task", "classes")},
    "adapters": {
        "down": ("adapter", None, "embed", "bottleneck"),
        "down_bias": ("adapter", None, "bottleneck"),
        "up": ("adapter", None, "bottleneck", "embed"),
        "up_bias": ("adapter", None, "embed"),
    },
}


def _sampler(rng):
  """(normal, zeros) drawing from a JAX key (the jitted initial state) or a NumPy Generator
  (rows grown on the host between steps, which then needs no compiled initialiser)."""
  if isinstance(rng, np.random.Generator):
    return (lambda shape: rng.standard_normal(shape, np.float32),
            lambda shape: np.zeros(shape, np.float32))
  return (lambda shape: jax.random.normal(rng, shape, jnp.float32),
          lambda shape: jnp.zeros(shape, jnp.float32))


def init_heads(rng, num_tasks: int, hidden_size: int, max_classes: int) -> dict:
  normal, zeros = _sampler(rng)
  return {
      "kernel": 0.02 * normal((num_tasks, hidden_size, max_classes)),
      "bias": zeros((num_tasks, max_classes)),
  }


def init_adapters(rng, num_slots: int, hidden_size: int, adapter_size: int,
                  adapter_layers: int = 1) -> dict:
  """Adapter rows whose output projections are zero, so a new adapter is the identity."""
  n, k, h, r = num_slots, adapter_layers, hidden_size, adapter_size
  normal, zeros = _sampler(rng)
  return {
      "down": 0.02 * normal((n, k, h, r)),
      "down_bias": zeros((n, k, r)),
      "up": zeros((n, k, r, h)),
      "up_bias": zeros((n, k, h)),
  }


def init_task_params(rng, num_tasks, num_adapter_slots, hidden_size, max_classes, adapter_size,
                     adapter_layers=1):
  head_rng, adapter_rng = jax.random.split(rng)
  return {
      "heads": init_heads(head_rng, num_tasks, hidden_size, max_classes),
      "adapters": init_adapters(adapter_rng, num_adapter_slots, hidden_size, adapter_size,
                                adapter_layers),
  }


def adapter_params_per_slot(hidden_size: int, adapter_size: int, adapter_layers: int) -> int:
  return adapter_layers * (2 * hidden_size * adapter_size + adapter_size + hidden_size)


def _adapter(row, x):
  """One adapter on one pooled vector: residual blocks x + up(gelu(down(x)))."""
  for k in range(row["down"].shape[0]):
    h = jax.nn.gelu(x @ row["down"][k] + row["down_bias"][k], approximate=False)
    x = x + h @ row["up"][k] + row["up_bias"][k]
  return x


def _head(row, x):
  """One task's linear classifier on one pooled vector."""
  return x @ row["kernel"] + row["bias"]


def _gather(tree, index):
  return jax.tree.map(lambda x: jnp.take(x, index, axis=0), tree)


def apply_task_layers(task_params, pooled, head_index, adapter_index, adapter_active,
                      with_features: bool = False):
  """pooled [B, H] -> logits [B, C] through each example's own adapter and head.

  With `with_features`, returns (logits, the head's input [B, H]: pooled after the adapter).

  Args:
    task_params: {"heads": ..., "adapters": ...}, any number of rows each.
    pooled: [B, H] float32.
    head_index: [B] int, the example's row in `task_params["heads"]`.
    adapter_index: [B] int, the example's row in `task_params["adapters"]`.
    adapter_active: [B] bool, False where the example's task maps to slot 0 (identity).
  """
  adapted = jax.vmap(_adapter)(_gather(task_params["adapters"], adapter_index), pooled)
  pooled = jnp.where(adapter_active[:, None], adapted, pooled)
  out = jax.vmap(_head)(_gather(task_params["heads"], head_index), pooled)
  return (out, pooled) if with_features else out


def class_mask(num_classes: jax.Array, task_ids: jax.Array, max_classes: int) -> jax.Array:
  """[B, C] bool: True for the classes the example's task has."""
  return jnp.arange(max_classes)[None, :] < num_classes[task_ids][:, None]
