"""Tests of the embedding augmentations: mathematics, pairing, padding, jit/vmap, determinism."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import augment as aug

MIXING_KINDS = ("mixup", "stitchup", "soft_mixup", "soft_stitchup")
MAX_CLASSES = 6

# Jitted once per (kind, shape): much quicker on CPU than eager dispatch of every op.
augment_jit = jax.jit(aug.augment, static_argnames="kind")
augment_with_details_jit = jax.jit(aug.augment_with_details, static_argnames="kind")


def make_batch(seed, batch_size=32, num_tasks=4, feature_shape=(3, 8), singleton_tasks=0):
  """A random batch: task t has 2 + t % (MAX_CLASSES - 1) classes; one-hot targets.

  The last `singleton_tasks` examples each get a task of their own (ids >= num_tasks).
  """
  np_rng = np.random.default_rng(seed)
  num_shared = batch_size - singleton_tasks
  task_ids = np.concatenate([
      np_rng.integers(0, num_tasks, num_shared),
      num_tasks + np.arange(singleton_tasks)]).astype(np.int32)
  num_classes = 2 + task_ids % (MAX_CLASSES - 1)
  class_mask = np.arange(MAX_CLASSES)[None, :] < num_classes[:, None]
  labels = np_rng.integers(0, num_classes)
  targets = np.eye(MAX_CLASSES, dtype=np.float32)[labels]
  embeddings = np_rng.normal(size=(batch_size,) + feature_shape).astype(np.float32)
  return (jnp.asarray(embeddings), jnp.asarray(targets), jnp.asarray(task_ids),
          jnp.asarray(class_mask))


def padded_last_position(embeddings):
  """[B, P] mask with the last position padding (the tests share one compiled function)."""
  return jnp.ones(embeddings.shape[:2], bool).at[:, -1].set(False)


def run(kind, seed=0, rng_seed=0, mask=None, alpha=0.2, details=True, **batch_kwargs):
  embeddings, targets, task_ids, class_mask = make_batch(seed, **batch_kwargs)
  fn = augment_with_details_jit if details else augment_jit
  out = fn(jax.random.key(rng_seed), embeddings, targets, task_ids, mask, class_mask, kind,
           alpha=alpha)
  return (embeddings, targets, task_ids, class_mask), out


@jax.jit
def _pair_many(keys, task_ids, example_mask):
  return jax.vmap(aug.pair_within_task)(keys, task_ids, example_mask)


def test_pairs_never_cross_tasks_over_many_batches():
  num_batches, batch_size = 200, 32
  np_rng = np.random.default_rng(0)
  # Vary how many tasks share the batch, from crowded (1 task) to mostly singletons (64).
  num_tasks = np_rng.choice([1, 2, 5, 16, 64], size=(num_batches, 1))
  task_ids = (np_rng.integers(0, 1 << 30, (num_batches, batch_size)) % num_tasks).astype(np.int32)
  included = np_rng.random((num_batches, batch_size)) < 0.9
  keys = jax.random.split(jax.random.key(1), num_batches)
  partner, has_partner = map(np.asarray, _pair_many(keys, jnp.asarray(task_ids), included))
  positions = np.arange(batch_size)
  for b in range(num_batches):
    tasks = task_ids[b]
    np.testing.assert_array_equal(tasks[partner[b]], tasks)
    included_per_task = np.bincount(tasks[included[b]], minlength=tasks.max() + 1)
    np.testing.assert_array_equal(has_partner[b], included[b] & (included_per_task[tasks] > 1))
    # A partner is always another included example; the unpaired point at themselves.
    assert np.all((partner[b] != positions) == has_partner[b])
    assert np.all(included[b][partner[b]][has_partner[b]])
    # Pairing is a permutation: every example is used as a partner exactly once.
    np.testing.assert_array_equal(np.sort(partner[b]), positions)


def test_partner_is_uniform_over_other_examples_of_the_task():
  num_draws = 4000
  task_ids = jnp.asarray(np.tile([7, 7, 7, 7, 2, 2], (num_draws, 1)), jnp.int32)
  keys = jax.random.split(jax.random.key(3), num_draws)
  partner, _ = _pair_many(keys, task_ids, jnp.ones(task_ids.shape, bool))
  partner = np.asarray(partner)
  frequencies = np.bincount(partner[:, 0], minlength=6) / num_draws
  np.testing.assert_allclose(frequencies, [0, 1 / 3, 1 / 3, 1 / 3, 0, 0], atol=0.03)
  np.testing.assert_array_equal(partner[:, 4], 5)


@pytest.mark.parametrize("kind", ["stitchup", "soft_stitchup"])
def test_every_stitchup_coordinate_comes_from_a_parent(kind):
  (x, _, _, _), (out, _, details) = run(kind)
  x, out = np.asarray(x), np.asarray(out)
  partner_x = x[np.asarray(details.partner_index)]
  assert np.all((out == x) | (out == partner_x))
  np.testing.assert_array_equal(out, np.where(details.from_self, x, partner_x))


def test_stitchup_takes_self_with_probability_lambda():
  (_, _, _, _), (_, _, details) = run("stitchup", alpha=1.0, batch_size=32, num_tasks=2,
                                      feature_shape=(4096,))
  fraction_from_self = np.asarray(details.from_self).mean(axis=1)
  # Binomial(4096, lambda): standard deviation <= 0.008.
  np.testing.assert_allclose(fraction_from_self, details.lam, atol=0.04)


@pytest.mark.parametrize("kind", ["mixup", "soft_mixup"])
def test_mixup_is_the_convex_combination(kind):
  (x, y, _, class_mask), (out, out_y, details) = run(kind)
  lam, partner = np.asarray(details.lam), np.asarray(details.partner_index)
  assert np.all((lam >= 0) & (lam <= 1))
  x, y = np.asarray(x), np.asarray(y)
  expected = lam[:, None, None] * x + (1 - lam[:, None, None]) * x[partner]
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  expected_y = lam[:, None] * y + (1 - lam[:, None]) * y[partner]
  if kind == "soft_mixup":
    num_task_classes = np.asarray(class_mask).sum(-1, keepdims=True)
    expected_y = np.where(class_mask, 0.9 * expected_y + 0.1 / num_task_classes, 0.0)
  expected_y = np.where(np.asarray(details.has_partner)[:, None], expected_y, y)
  np.testing.assert_allclose(out_y, expected_y, rtol=1e-6, atol=1e-7)


def test_lambda_follows_beta():
  lam = np.asarray(aug.sample_lambda(jax.random.key(0), 20000, alpha=0.2))
  assert np.all((lam >= 0) & (lam <= 1))
  np.testing.assert_allclose(lam.mean(), 0.5, atol=0.01)
  np.testing.assert_allclose(lam.var(), 1 / (4 * (2 * 0.2 + 1)), atol=0.01)  # Beta(a, a).


@pytest.mark.parametrize("kind", aug.KINDS)
def test_targets_are_distributions_over_the_task_classes(kind):
  for seed in range(3):
    (_, _, _, class_mask), (_, out_y, _) = run(kind, seed=seed, num_tasks=6, singleton_tasks=3)
    out_y, class_mask = np.asarray(out_y), np.asarray(class_mask)
    np.testing.assert_allclose(out_y.sum(-1), 1.0, atol=1e-6)
    assert np.all(out_y[~class_mask] == 0.0)
    assert np.all(out_y >= 0.0)


@pytest.mark.parametrize("kind", ["soft_mixup", "soft_stitchup"])
def test_soft_targets_give_every_task_class_eps_over_k(kind):
  (_, _, _, class_mask), (_, out_y, details) = run(kind, num_tasks=3)
  class_mask = np.asarray(class_mask)
  paired = np.asarray(details.has_partner)
  floor = np.broadcast_to(0.1 / class_mask.sum(-1, keepdims=True), class_mask.shape)
  task_class_of_paired = class_mask & paired[:, None]
  assert np.all(np.asarray(out_y)[task_class_of_paired] >= floor[task_class_of_paired] - 1e-7)


def test_smooth_and_mix_helpers():
  class_mask = jnp.asarray([[True, True, True, False], [True, True, False, False]])
  y = jnp.asarray([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
  smoothed = np.asarray(aug.smooth_targets(y, class_mask, 0.3))
  np.testing.assert_allclose(smoothed, [[0.8, 0.1, 0.1, 0], [0.15, 0.85, 0, 0]], atol=1e-6)
  mixed = np.asarray(aug.mix_targets(y, y[::-1], jnp.asarray([0.25, 1.0])))
  np.testing.assert_allclose(mixed, [[0.25, 0.75, 0, 0], [0, 1, 0, 0]])


@pytest.mark.parametrize("kind", MIXING_KINDS)
def test_unpaired_examples_are_unchanged_and_counted(kind):
  x, y, task_ids, class_mask = make_batch(0, num_tasks=2, singleton_tasks=5)
  mask = padded_last_position(x)
  out, out_y, stats = augment_jit(jax.random.key(0), x, y, task_ids, mask, class_mask, kind)
  assert int(stats["aug_unpaired"]) == 5
  assert int(stats["aug_paired"]) == 27
  np.testing.assert_array_equal(out[-5:], x[-5:])
  np.testing.assert_array_equal(out_y[-5:], y[-5:])
  # The paired ones did change (lambda is never exactly 1 for all of them at alpha=0.2).
  assert not np.array_equal(out[:-5], x[:-5])


def test_batch_of_singletons_is_untouched():
  x, y, task_ids, class_mask = make_batch(0, singleton_tasks=32)
  out, out_y, stats = augment_jit(jax.random.key(0), x, y, task_ids, padded_last_position(x),
                                  class_mask, "soft_mixup")
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(out_y, y)
  assert int(stats["aug_unpaired"]) == 32 and int(stats["aug_paired"]) == 0


def test_excluded_examples_are_neither_mixed_nor_partners():
  x, y, task_ids, class_mask = make_batch(0, num_tasks=2)
  included = np.arange(32) % 4 != 0
  y = y * included[:, None]  # Excluded examples carry no target, as in the train step.
  out, out_y, stats = aug.augment(jax.random.key(0), x, y, task_ids, None, class_mask,
                                  "soft_mixup", example_mask=jnp.asarray(included))
  np.testing.assert_array_equal(out[~included], x[~included])
  np.testing.assert_array_equal(out_y[~included], y[~included])
  # No all-zero target row leaked into a mixed one.
  np.testing.assert_allclose(np.asarray(out_y)[included].sum(-1), 1.0, atol=1e-6)
  assert int(stats["aug_paired"]) == 24 and int(stats["aug_unpaired"]) == 0


def test_a_shared_rng_mixes_every_input_with_the_same_partner_and_lambda():
  x, y, task_ids, class_mask = make_batch(0)
  key = jax.random.key(4)
  _, images_y, images = augment_with_details_jit(key, x, y, task_ids, None, class_mask,
                                                 "stitchup")
  _, pooled_y, pooled = augment_with_details_jit(key, x[:, 0], y, task_ids, None, class_mask,
                                                 "stitchup")
  np.testing.assert_array_equal(images.partner_index, pooled.partner_index)
  np.testing.assert_array_equal(images.lam, pooled.lam)
  np.testing.assert_array_equal(images_y, pooled_y)


@pytest.mark.parametrize("kind", ["mixup", "stitchup"])
@pytest.mark.parametrize("alpha", [0.0, 1e-8, 1e-4])
def test_alpha_near_zero_returns_a_parent_without_nan(kind, alpha):
  # `run` jits with alpha as a traced argument, as a schedule would pass it.
  (x, y, _, _), (out, out_y, details) = run(kind, alpha=alpha, num_tasks=2)
  lam = np.asarray(details.lam)
  assert np.all(np.isfinite(lam)) and np.all(np.isfinite(out)) and np.all(np.isfinite(out_y))
  assert np.all(np.minimum(lam, 1 - lam) < 1e-3)
  x, y = np.asarray(x), np.asarray(y)
  partner = np.asarray(details.partner_index)
  closest_parent = np.where((lam > 0.5)[:, None, None], x, x[partner])
  np.testing.assert_allclose(out, closest_parent, atol=1e-2)
  np.testing.assert_allclose(out_y, np.where((lam > 0.5)[:, None], y, y[partner]), atol=1e-3)
  # Both parents win about half the time: the limit is a fair coin, not a collapse to one side.
  assert 0 < np.sum(lam > 0.5) < lam.size


@pytest.mark.parametrize("kind", MIXING_KINDS)
def test_padding_is_never_mixed_into_real_positions(kind):
  batch_size, num_positions = 32, 3
  x, y, task_ids, class_mask = make_batch(1, num_tasks=2)
  np_rng = np.random.default_rng(0)
  lengths = np_rng.integers(0, num_positions + 1, batch_size)  # 0..P real images.
  mask = np.arange(num_positions)[None, :] < lengths[:, None]
  # NaN padding: any padding value that reached a real position would show up as NaN.
  x = jnp.where(mask[:, :, None], x, jnp.nan)
  out, _, details = augment_with_details_jit(
      jax.random.key(0), x, y, task_ids, jnp.asarray(mask, jnp.int32), class_mask, kind)
  out, x = np.asarray(out), np.asarray(x)
  assert np.all(np.isfinite(out[mask]))
  partner_mask = mask[np.asarray(details.partner_index)]
  # Where either side is padding, the example keeps its own value (NaN padding stays padding).
  keep = ~(mask & partner_mask)
  np.testing.assert_array_equal(out[keep], x[keep])
  # Where both are real, mixing did happen somewhere.
  assert not np.array_equal(out[~keep], x[~keep])


@pytest.mark.parametrize("kind", aug.KINDS)
def test_same_rng_gives_the_same_output(kind):
  x, y, task_ids, class_mask = make_batch(2)
  mask = padded_last_position(x)
  first = augment_jit(jax.random.key(5), x, y, task_ids, mask, class_mask, kind=kind)
  second = augment_jit(jax.random.key(5), x, y, task_ids, mask, class_mask, kind=kind)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)
  assert first[0].shape == x.shape and first[0].dtype == x.dtype
  if kind != "none":
    other = augment_jit(jax.random.key(6), x, y, task_ids, mask, class_mask, kind=kind)
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("kind, feature_shape", [("mixup", (8,)), ("soft_stitchup", (3, 8))])
def test_jit_matches_eager(kind, feature_shape):
  x, y, task_ids, class_mask = make_batch(2, feature_shape=feature_shape)
  mask = None if len(feature_shape) == 1 else padded_last_position(x)
  key = jax.random.key(5)
  jitted = augment_jit(key, x, y, task_ids, mask, class_mask, kind=kind)
  eager = aug.augment(key, x, y, task_ids, mask, class_mask, kind)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixup", "soft_stitchup"])
def test_vmap_over_a_leading_axis(kind):
  num_groups = 3
  batches = [make_batch(s) for s in range(num_groups)]
  x, y, task_ids, class_mask = (jnp.stack(parts) for parts in zip(*batches))
  mask = jnp.ones(x.shape[:3], bool).at[:, :, 2].set(False)
  keys = jax.random.split(jax.random.key(0), num_groups)
  fn = functools.partial(aug.augment, kind=kind)
  out, out_y, stats = jax.jit(jax.vmap(fn))(keys, x, y, task_ids, mask, class_mask)
  assert stats["aug_paired"].shape == (num_groups,)
  for g in range(num_groups):
    ref, ref_y, ref_stats = augment_jit(keys[g], x[g], y[g], task_ids[g], mask[g], class_mask[g],
                                        kind=kind)
    np.testing.assert_allclose(out[g], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out_y[g], ref_y, rtol=1e-6, atol=1e-7)
    assert int(stats["aug_unpaired"][g]) == int(ref_stats["aug_unpaired"])


def test_none_is_the_identity():
  x, y, task_ids, class_mask = make_batch(0, feature_shape=(3, 8))
  mask = jnp.ones(x.shape[:2], bool)
  out, out_y, stats = aug.augment(jax.random.key(0), x, y, task_ids, mask, class_mask, "none")
  assert out is x and out_y is y
  assert int(stats["aug_paired"]) == 0 and int(stats["aug_unpaired"]) == 0


def test_gradient_flows_through_both_parents():
  x, y, task_ids, class_mask = make_batch(0, num_tasks=1, feature_shape=(8,))

  def loss(embeddings):
    out, _, _ = aug.augment(jax.random.key(0), embeddings, y, task_ids, None, class_mask, "mixup")
    return jnp.sum(out ** 2)

  grad = jax.grad(loss)(x)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_bad_arguments_raise():
  x, y, task_ids, class_mask = make_batch(0, feature_shape=(3, 8))
  with pytest.raises(ValueError, match="kind"):
    aug.augment(jax.random.key(0), x, y, task_ids, None, class_mask, "cutmix")
  with pytest.raises(ValueError, match="mask"):
    aug.augment(jax.random.key(0), x, y, task_ids, jnp.ones((16, 4), bool), class_mask, "mixup")
  with pytest.raises(ValueError, match="mask"):
    aug.augment(jax.random.key(0), x[:, 0], y, task_ids, jnp.ones((16, 3), bool), class_mask,
                "mixup")
