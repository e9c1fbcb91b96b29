"""Stacked heads and adapters against a straightforward per-task reference."""
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import losses, task_layers

T, H, C, A, R = 5, 8, 6, 3, 4


def params(seed=0):
  p = task_layers.init_task_params(jax.random.key(seed), T, A, H, C, R)
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
  logits = task_layers.apply_task_layers(p, pooled, task_ids, slots, slots > 0)
  for i in range(10):
    x = pooled[i]
    if slots[i]:
      a = jax.tree.map(lambda v: v[slots[i]], p["adapters"])
      x = x + jax.nn.gelu(x @ a["down"][0] + a["down_bias"][0], approximate=False) @ a["up"][0] + a["up_bias"][0]
    expected = x @ p["heads"]["kernel"][task_ids[i]] + p["heads"]["bias"][task_ids[i]]
    np.testing.assert_allclose(logits[i], expected, rtol=1e-5, atol=1e-6)


def test_slot_zero_is_the_identity_even_with_nonzero_parameters():
  p = params()
  pooled = np.ones((2, H), np.float32)
  with_slot0 = task_layers.apply_task_layers(p, pooled, np.array([1, 1]), np.array([0, 0]),
                                             np.array([False, False]))
  plain = pooled @ p["heads"]["kernel"][1] + p["heads"]["bias"][1]
  np.testing.assert_allclose(with_slot0, plain, rtol=1e-5, atol=1e-7)


def test_fresh_adapters_are_the_identity():
  p = task_layers.init_task_params(jax.random.key(0), T, A, H, C, R)
  pooled = np.random.default_rng(1).normal(size=(3, H)).astype(np.float32)
  ids = np.array([0, 1, 2])
  on = task_layers.apply_task_layers(p, pooled, ids, np.array([1, 2, 1]), np.ones(3, bool))
  off = task_layers.apply_task_layers(p, pooled, ids, np.zeros(3, int), np.zeros(3, bool))
  np.testing.assert_array_equal(on, off)


def test_masked_class_is_never_predicted_and_gets_no_gradient():
  p = params()
  num_classes = jnp.array([2, 6, 3, 4, 1])
  # Make the masked classes' logits enormous: they must still never win or get gradient.
  p["heads"]["bias"] = p["heads"]["bias"].at[:, 2:].set(1e6)
  rng = np.random.default_rng(2)
  pooled = rng.normal(size=(40, H)).astype(np.float32)
  task_ids = rng.integers(0, T, 40)
  labels = rng.integers(0, 100, 40) % np.asarray(num_classes)[task_ids]
  mask = task_layers.class_mask(num_classes, task_ids, C)
  zeros = np.zeros(40, int)

  def loss(p):
    logits = task_layers.apply_task_layers(p, pooled, task_ids, zeros, zeros > 0)
    return jnp.mean(losses.cross_entropy(logits, labels, mask)), logits

  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(p)
  assert np.isfinite(value)
  predicted = np.argmax(np.asarray(losses.mask_logits(logits, mask)), axis=-1)
  assert np.all(predicted < np.asarray(num_classes)[task_ids])
  probs = jax.nn.softmax(losses.mask_logits(logits, mask))
  assert float(jnp.max(jnp.where(mask, 0.0, probs))) == 0.0
  for t, k in enumerate(np.asarray(num_classes)):
    assert np.all(np.asarray(grads["heads"]["kernel"][t, :, k:]) == 0.0)
    assert np.all(np.asarray(grads["heads"]["bias"][t, k:]) == 0.0)
  # Tasks that are in the batch do get gradient on their real classes.
  present = np.unique(task_ids)
  assert np.abs(np.asarray(grads["heads"]["kernel"][present[0], :, 0])).sum() > 0


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
  draw = lambda seed: {**task_layers.init_heads(np.random.default_rng(seed), 2, H, C),
                       **task_layers.init_adapters(np.random.default_rng(seed), 3, H, R, 2)}
  on_host, in_jax = draw([7, 1]), {
      **task_layers.init_heads(jax.random.key(0), 2, H, C),
      **task_layers.init_adapters(jax.random.key(0), 3, H, R, 2)}
  for name, value in on_host.items():
    assert isinstance(value, np.ndarray), name
    assert (value.shape, value.dtype) == (in_jax[name].shape, in_jax[name].dtype), name
  for name in ("bias", "down_bias", "up", "up_bias"):
    assert not on_host[name].any(), name
  assert 0.01 < on_host["down"].std() < 0.03 and 0.01 < on_host["kernel"].std() < 0.03
  assert all(np.array_equal(v, draw([7, 1])[k]) for k, v in on_host.items())
  assert not np.array_equal(on_host["down"], draw([7, 2])["down"])
