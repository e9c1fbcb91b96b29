"""Task heads and DyPa adapters: one stacked parameter tree each, applied per example by index.

    heads:    kernel [R, H, b], bias [R, b]      row r is one block of b classes of one task
    adapters: down [A, L, H, r], down_bias [A, L, r], up [A, L, r, H], up_bias [A, L, H]
              row a is adapter slot a (L residual blocks); slot 0 is "no adapter" (identity)

Heads are stored in blocks of b = `model.classes_per_block` classes, so that their memory follows
the real class counts: task t owns ceil(C_t / b) consecutive block rows (`HeadLayout`), not a row
padded to the widest task. An example of task t gathers its task's blocks (up to K = ceil(C / b),
C = `model.max_classes`; blocks a task lacks read as zeros) and adapter row `adapter_map[t]`, and
its logits are the blocks side by side, cut to C columns. One compiled program serves any number
and mix of tasks (never a Python loop, never one program per task); columns past a task's class
count are masked (`losses.py`).

The functions take the rows to use (`head_index`, `adapter_index` index into whatever leading
axis the given tree has), so the train step can pass just the rows of the tasks in its batch.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import optim

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


# Head block rows are allocated in multiples of this, so that they split evenly over a `data`
# axis of up to 64 devices (`sharding.resolve_rules`); the spare rows are never read.
ROW_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class HeadLayout:
  """Where each task's classes live in the stacked head blocks.

  Attributes:
    first_block: [T] int32, each task's first block row.
    num_blocks: [T] int32, its block count, ceil(C_t / block) (at least 1).
    num_rows: the block rows allocated: sum(num_blocks) rounded up to `ROW_MULTIPLE`.
    block: classes per block.
    max_classes: the logits' width C.
  """
  first_block: np.ndarray
  num_blocks: np.ndarray
  num_rows: int
  block: int
  max_classes: int

  @classmethod
  def for_classes(cls, num_classes, block: int, max_classes: int) -> "HeadLayout":
    num_blocks = np.maximum(-(-np.asarray(num_classes, np.int64) // block), 1).astype(np.int32)
    first = (np.cumsum(num_blocks) - num_blocks).astype(np.int32)
    used = int(num_blocks.sum())
    return cls(first, num_blocks, -(-max(used, 1) // ROW_MULTIPLE) * ROW_MULTIPLE, block,
               max_classes)

  @property
  def blocks_per_example(self) -> int:
    return -(-self.max_classes // self.block)

  def task_rows(self, task: int) -> np.ndarray:
    """The block rows of task `task`, in class order."""
    return self.first_block[task] + np.arange(self.num_blocks[task])

  def example_rows(self, task_ids) -> jax.Array:
    """[B, K] each example's block rows; `num_rows` (out of range) where its task has fewer."""
    k = jnp.arange(self.blocks_per_example)[None, :]
    first = jnp.asarray(self.first_block)[task_ids][:, None]
    count = jnp.asarray(self.num_blocks)[task_ids][:, None]
    return jnp.where(k < count, first + k, self.num_rows).astype(jnp.int32)

  def task_head(self, heads, task: int) -> dict:
    """Task `task`'s classifier as one array: {"kernel" [H, C_t'], "bias" [C_t']}, its blocks
    side by side (C_t' = num_blocks * block; columns past the task's classes are unused)."""
    rows = self.task_rows(task)
    kernel = np.asarray(heads["kernel"])[rows]
    return {"kernel": np.concatenate(list(kernel), axis=-1),
            "bias": np.asarray(heads["bias"])[rows].reshape(-1)}

  def set_task_head(self, heads, task: int, kernel: np.ndarray, bias: np.ndarray) -> None:
    """The inverse of `task_head`: writes a classifier {kernel [H, C], bias [C]} into task
    `task`'s blocks of the numpy `heads`, in place; columns past the blocks' width are dropped,
    block columns past C are zero."""
    rows = self.task_rows(task)
    width = len(rows) * self.block
    k = np.zeros((kernel.shape[0], width), np.float32)
    b = np.zeros(width, np.float32)
    columns = min(width, kernel.shape[1])
    k[:, :columns], b[:columns] = kernel[:, :columns], bias[:columns]
    heads["kernel"][rows] = k.reshape(-1, len(rows), self.block).transpose(1, 0, 2)
    heads["bias"][rows] = b.reshape(len(rows), self.block)


def init_heads(rng, num_rows: int, hidden_size: int, block: int) -> dict:
  normal, zeros = _sampler(rng)
  return {
      "kernel": 0.02 * normal((num_rows, hidden_size, block)),
      "bias": zeros((num_rows, block)),
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


def init_task_params(rng, layout: HeadLayout, num_adapter_slots, hidden_size, adapter_size,
                     adapter_layers=1):
  head_rng, adapter_rng = jax.random.split(rng)
  return {
      "heads": init_heads(head_rng, layout.num_rows, hidden_size, layout.block),
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


def _head(blocks, x):
  """One example's task head on its pooled vector: its K class blocks side by side, [K * b]."""
  return (jnp.einsum("h,khc->kc", x, blocks["kernel"]) + blocks["bias"]).reshape(-1)


def apply_task_layers(task_params, pooled, head_index, adapter_index, adapter_active,
                      max_classes: int, with_features: bool = False):
  """pooled [B, H] -> logits [B, C] through each example's own adapter and head blocks.

  With `with_features`, returns (logits, the head's input [B, H]: pooled after the adapter).

  Args:
    task_params: {"heads": ..., "adapters": ...}, any number of rows each.
    pooled: [B, H] float32.
    head_index: [B, K] int, the example's block rows in `task_params["heads"]`; an out-of-range
      index reads as a zero block.
    adapter_index: [B] int, the example's row in `task_params["adapters"]`.
    adapter_active: [B] bool, False where the example's task maps to slot 0 (identity).
    max_classes: C, the logits' width.
  """
  adapted = jax.vmap(_adapter)(optim.gather_rows(task_params["adapters"], adapter_index), pooled)
  pooled = jnp.where(adapter_active[:, None], adapted, pooled)
  blocks = optim.gather_rows(task_params["heads"], head_index)  # [B, K, H, b], [B, K, b]
  out = jax.vmap(_head)(blocks, pooled)[:, :max_classes]
  return (out, pooled) if with_features else out


def class_mask(num_classes: jax.Array, task_ids: jax.Array, max_classes: int) -> jax.Array:
  """[B, C] bool: True for the classes the example's task has."""
  return jnp.arange(max_classes)[None, :] < num_classes[task_ids][:, None]
