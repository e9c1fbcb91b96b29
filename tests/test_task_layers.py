"""Stacked head blocks and adapters against a straightforward per-task reference."""
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import losses, task_layers

T, H, C, A, R = 5, 8, 6, 3, 4
NUM_CLASSES = np.array([2, 6, 3, 4, 1])
LAYOUT = task_layers.HeadLayout.for_classes(NUM_CLASSES, 4, C)  # Task 1 holds two blocks.


def params(seed=0):
  p = task_layers.init_task_params(jax.random.key(seed), LAYOUT, A, H, R)
  # Non-zero adapter outputs so that adapters do something in these tests.
  p["adapters"]["up"] = 0.1 * jax.random.normal(jax.random.key(seed + 1), (A, 1, R, H))
  return p


def test_vmapped_heads_match_a_per_task_loop():
  p = params()
  rng = np.random.default_rng(0)
  pooled = rng.normal(size=(10, H)).astype(np.float32)
  task_ids = rng.integers(0, T, 10)
  adapter_map = np.array([0, 2, 0, 1, 2])
  slots = adapter_map[task_ids]
  logits = task_layers.apply_task_layers(p, pooled, LAYOUT.example_rows(task_ids), slots,
                                         slots > 0, C)
  assert logits.shape == (10, C)
  for i in range(10):
    x = pooled[i]
    if slots[i]:
      a = jax.tree.map(lambda v: v[slots[i]], p["adapters"])
      x = x + jax.nn.gelu(x @ a["down"][0] + a["down_bias"][0], approximate=False) @ a["up"][0] + a["up_bias"][0]
    head = LAYOUT.task_head(p["heads"], task_ids[i])
    expected = (x @ head["kernel"] + head["bias"])[:C]
    np.testing.assert_allclose(logits[i, :expected.size], expected, rtol=1e-5, atol=1e-6)
    # Columns past the task's blocks read zero blocks.
    assert not np.any(np.asarray(logits[i, expected.size:]))


def test_the_layout_gives_each_task_its_own_blocks():
  assert LAYOUT.num_blocks.tolist() == [1, 2, 1, 1, 1]
  assert LAYOUT.first_block.tolist() == [0, 1, 3, 4, 5]
  assert LAYOUT.num_rows == task_layers.ROW_MULTIPLE  # 6 used, rounded up.
  rows = np.asarray(LAYOUT.example_rows(np.array([1, 0, 4])))
  np.testing.assert_array_equal(rows, [[1, 2], [0, LAYOUT.num_rows], [5, LAYOUT.num_rows]])
  blocks = np.concatenate([LAYOUT.task_rows(t) for t in range(T)])
  assert np.unique(blocks).size == blocks.size  # No block is shared.


def test_head_memory_follows_the_class_counts():
  """1000 long-tailed tasks (3 to 128 classes, log-uniform): block rows hold within 1.5x of
  sum C_t classes, where per-task rows padded to the widest task held 3.5x or more."""
  rng = np.random.default_rng(0)
  counts = np.exp(rng.uniform(np.log(3), np.log(129), 1000)).astype(int)
  layout = task_layers.HeadLayout.for_classes(counts, 8, 128)
  stored = layout.num_rows * layout.block
  assert stored <= 1.5 * counts.sum(), stored / counts.sum()
  assert len(counts) * 128 >= 3.5 * counts.sum()


def test_slot_zero_is_the_identity_even_with_nonzero_parameters():
  p = params()
  pooled = np.ones((2, H), np.float32)
  with_slot0 = task_layers.apply_task_layers(p, pooled, LAYOUT.example_rows(np.array([1, 1])),
                                             np.array([0, 0]), np.array([False, False]), C)
  head = LAYOUT.task_head(p["heads"], 1)
  plain = (pooled @ head["kernel"] + head["bias"])[:, :C]
  np.testing.assert_allclose(with_slot0, plain, rtol=1e-5, atol=1e-7)


def test_fresh_adapters_are_the_identity():
  p = task_layers.init_task_params(jax.random.key(0), LAYOUT, A, H, R)
  pooled = np.random.default_rng(1).normal(size=(3, H)).astype(np.float32)
  rows = LAYOUT.example_rows(np.array([0, 1, 2]))
  on = task_layers.apply_task_layers(p, pooled, rows, np.array([1, 2, 1]), np.ones(3, bool), C)
  off = task_layers.apply_task_layers(p, pooled, rows, np.zeros(3, int), np.zeros(3, bool), C)
  np.testing.assert_array_equal(on, off)


def test_masked_class_is_never_predicted_and_gets_no_gradient():
  p = params()
  num_classes = jnp.asarray(NUM_CLASSES)
  # Make every bias enormous but the first class of each block: the masked classes must still
  # never win or get gradient.
  p["heads"]["bias"] = p["heads"]["bias"].at[:, 1:].set(1e6)
  rng = np.random.default_rng(2)
  pooled = rng.normal(size=(40, H)).astype(np.float32)
  task_ids = rng.integers(0, T, 40)
  labels = rng.integers(0, 100, 40) % np.asarray(num_classes)[task_ids]
  mask = task_layers.class_mask(num_classes, task_ids, C)
  zeros = np.zeros(40, int)

  def loss(p):
    logits = task_layers.apply_task_layers(p, pooled, LAYOUT.example_rows(task_ids), zeros,
                                           zeros > 0, C)
    return jnp.mean(losses.cross_entropy(logits, labels, mask)), logits

  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(p)
  assert np.isfinite(value)
  predicted = np.argmax(np.asarray(losses.mask_logits(logits, mask)), axis=-1)
  assert np.all(predicted < np.asarray(num_classes)[task_ids])
  probs = jax.nn.softmax(losses.mask_logits(logits, mask))
  assert float(jnp.max(jnp.where(mask, 0.0, probs))) == 0.0
  used = np.concatenate([LAYOUT.task_rows(t) for t in range(T)])
  for t, k in enumerate(NUM_CLASSES):
    assert np.all(LAYOUT.task_head(grads["heads"], t)["kernel"][:, k:] == 0.0)
    assert np.all(LAYOUT.task_head(grads["heads"], t)["bias"][k:] == 0.0)
  assert not np.any(np.delete(np.asarray(grads["heads"]["kernel"]), used, axis=0))
  # Tasks that are in the batch do get gradient on their real classes.
  present = np.unique(task_ids)
  assert np.abs(LAYOUT.task_head(grads["heads"], present[0])["kernel"][:, 0]).sum() > 0


def test_soft_cross_entropy_equals_hard_for_one_hot_targets():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, C)).astype(np.float32)
  labels = np.array([0, 1, 2, 0])
  mask = np.arange(C)[None] < np.array([[3], [4], [6], [1]])
  hard = losses.cross_entropy(logits, labels, mask)
  soft = losses.soft_cross_entropy(logits, jax.nn.one_hot(labels, C), mask)
  np.testing.assert_allclose(hard, soft, rtol=1e-6)
  assert float(hard[3]) == 0.0  # A one-class task has nothing to learn.


def test_host_initialisers_match_the_jax_ones_in_shape_and_kind():
  """Rows grown between steps come from a NumPy generator (no compiled initialiser): same
  shapes and dtypes as the jitted initial state, zero output projections, and the same rows
  for the same seed."""
  draw = lambda seed: {**task_layers.init_heads(np.random.default_rng(seed), 2, H, 4),
                       **task_layers.init_adapters(np.random.default_rng(seed), 3, H, R, 2)}
  on_host, in_jax = draw([7, 1]), {
      **task_layers.init_heads(jax.random.key(0), 2, H, 4),
      **task_layers.init_adapters(jax.random.key(0), 3, H, R, 2)}
  for name, value in on_host.items():
    assert isinstance(value, np.ndarray), name
    assert (value.shape, value.dtype) == (in_jax[name].shape, in_jax[name].dtype), name
  for name in ("bias", "down_bias", "up", "up_bias"):
    assert not on_host[name].any(), name
  assert 0.01 < on_host["down"].std() < 0.03 and 0.01 < on_host["kernel"].std() < 0.03
  assert all(np.array_equal(v, draw([7, 1])[k]) for k, v in on_host.items())
  assert not np.array_equal(on_host["down"], draw([7, 2])["down"])


def test_set_task_head_is_the_inverse_of_task_head():
  heads = {k: np.array(v) for k, v in task_layers.init_heads(
      jax.random.key(3), LAYOUT.num_rows, H, LAYOUT.block).items()}
  before = {k: v.copy() for k, v in heads.items()}
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(H, 10)).astype(np.float32)
  bias = rng.normal(size=10).astype(np.float32)
  LAYOUT.set_task_head(heads, 1, kernel, bias)  # Task 1 holds two blocks of 4: 8 of 10 columns.
  head = LAYOUT.task_head(heads, 1)
  np.testing.assert_array_equal(head["kernel"], kernel[:, :8])
  np.testing.assert_array_equal(head["bias"], bias[:8])
  others = np.setdiff1d(np.arange(LAYOUT.num_rows), LAYOUT.task_rows(1))
  np.testing.assert_array_equal(heads["kernel"][others], before["kernel"][others])
  narrow = kernel[:, :5]  # Narrower than the blocks: the rest is zero.
  LAYOUT.set_task_head(heads, 1, narrow, bias[:5])
  head = LAYOUT.task_head(heads, 1)
  np.testing.assert_array_equal(head["kernel"][:, :5], narrow)
  assert np.all(head["kernel"][:, 5:] == 0) and np.all(head["bias"][5:] == 0)
