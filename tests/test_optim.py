"""Row-wise AdamW: absent rows untouched; present rows follow AdamW; dense mode is plain AdamW."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import optim
from tests.helpers import tiny_config

CFG = tiny_config(**{"optimizer.weight_decay": 0.1})


def rows_tree(seed=0, n=6):
  rng = np.random.default_rng(seed)
  return {"kernel": jnp.asarray(rng.normal(size=(n, 3, 4)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)}


def test_absent_rows_are_untouched_bit_for_bit():
  params = rows_tree()
  state = optim.row_adam_init(params)
  index = jnp.array([4, 1, 4, 1, 1])
  rows, inverse = optim.unique_rows(index, 6, size=5)
  np.testing.assert_array_equal(rows, [1, 4, 6, 6, 6])
  np.testing.assert_array_equal(np.asarray(rows)[np.asarray(inverse)], index)
  for step in range(3):
    grads = jax.tree.map(lambda x: jnp.ones((5,) + x.shape[1:]) * (step + 1),
                         optim.gather_rows(params, rows))
    new, state = optim.row_adam_update(params, state, rows, grads, 0.1, CFG)
    for k in params:
      for absent in (0, 2, 3, 5):
        np.testing.assert_array_equal(new[k][absent], params[k][absent])
        np.testing.assert_array_equal(state.mu[k][absent], 0.0)
      assert not np.allclose(new[k][1], params[k][1])
    params = new
  np.testing.assert_array_equal(state.count, [0, 3, 0, 0, 3, 0])


def test_present_rows_follow_adamw_with_their_own_step_count():
  params = rows_tree(1, n=2)
  state = optim.row_adam_init(params)
  tx = optax.adamw(0.05, b1=CFG.optimizer.b1, b2=CFG.optimizer.b2, eps=CFG.optimizer.eps,
                   weight_decay=0.1, mask={"kernel": True, "bias": False})
  reference = jax.tree.map(lambda x: x[1], params)
  ref_state = tx.init(reference)
  rng = np.random.default_rng(2)
  # Row 1 is updated on steps 0, 2, 3; row 0 only on step 1. Row 1 must match AdamW run on
  # its own three gradients (its own count for bias correction).
  for step, present in enumerate([[1], [0], [1], [1]]):
    rows = jnp.array(present + [2])
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(2,) + x.shape[1:]), jnp.float32),
                         params)
    params, state = optim.row_adam_update(params, state, rows, grads, 0.05, CFG)
    if present == [1]:
      updates, ref_state = tx.update(jax.tree.map(lambda g: g[0], grads), ref_state, reference)
      reference = optax.apply_updates(reference, updates)
  for k in params:
    np.testing.assert_allclose(params[k][1], reference[k], rtol=1e-5, atol=1e-6)
