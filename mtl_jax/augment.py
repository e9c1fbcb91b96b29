"""Embedding augmentations: E-Mixup, E-Stitchup and their label-softened forms.

Every function here is pure and jittable (`kind` is static), and vmaps over a leading extra axis.
Mixing only ever happens between two examples of the same task, because the target columns of
different tasks mean different classes.

Decisions the SPEC leaves open:

- **Pairing.** Examples are sorted by (task, random key) and each is paired with its successor in
  that random order, cyclically within its task group (`pair_within_task`). So the partner is a
  uniformly random *other* example of the same task, pairing is a permutation (each example is
  also used as a partner exactly once), and it costs one O(B log B) sort with O(B) memory.
  An example alone in its task in the batch has no partner: it stays unchanged, targets
  included (no label softening either), and is counted in `aug_unpaired`. Examples excluded by
  `example_mask` (batch padding, examples whose label carries no loss) are neither mixed nor
  anyone's partner, and are not counted.
- **lambda.** One lambda ~ Beta(alpha, alpha) per example, used for both the embedding and the
  target. No `max(lambda, 1 - lambda)` folding: by symmetry of Beta(a, a), either parent may
  dominate.
- **alpha -> 0.** Beta(a, a) tends to a fair coin on {0, 1} as a -> 0, but `jax.random.beta`
  returns NaN at a = 0. alpha is clipped to `MIN_ALPHA` (1e-6), where lambda is within ~1e-6 of
  0 or 1, so the output is (numerically) one of the two parents and never NaN. alpha may be a
  traced value (e.g. a schedule).
- **Padding.** For sequence inputs (`[B, P, ...]` with a `[B, P]` mask) a position is mixed only
  where both the example and its partner hold a real element; everywhere else the example keeps
  its own value, and the returned mask is the example's own. So padding is never mixed into a
  real position. With images, an example with more images than its partner keeps its extra images
  unmixed, and one with fewer images ignores the partner's extra images (they are not appended).
  The target is still mixed with the example-level lambda, whatever fraction of positions could
  be mixed: the simple choice, and exact for pooled embeddings and equal-length inputs.
- **Stitchup coordinates.** Every element of the embedding tensor (every position and every
  feature) is drawn independently.
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

KINDS = ("none", "mixup", "stitchup", "soft_mixup", "soft_stitchup")
MIN_ALPHA = 1e-6  # Beta(a, a) sampling gives NaN at a = 0; at 1e-6 lambda is 0 or 1 to ~1e-6.


class AugmentDetails(NamedTuple):
  """What `augment_with_details` drew, per example, so that callers and tests can recompute it.

  Attributes:
    partner_index: [B] int32, the index of the example mixed in (the example itself if unpaired).
    has_partner: [B] bool, False for an example alone in its task in the batch (or excluded).
    lam: [B] float32, the weight of the example itself: 1 where unpaired.
    from_self: embeddings-shaped bool, True where the output coordinate comes from (or, for
      mixup, is kept at) the example itself without mixing: stitchup draws, unpaired examples and
      positions where either side is padding. All False where mixup mixes.
  """
  partner_index: jax.Array
  has_partner: jax.Array
  lam: jax.Array
  from_self: jax.Array


def pair_within_task(
    rng: jax.Array, task_ids: jax.Array, example_mask: Optional[jax.Array] = None
) -> tuple[jax.Array, jax.Array]:
  """Pairs each example with a random other example of the same task.

  Sorts the batch by (task, random key) and takes each example's successor in its task group,
  wrapping around: O(B log B) time, O(B) memory. The result is a permutation whose cycles stay
  inside task groups; the partner of each example is uniform over the other examples of its task.

  Args:
    rng: PRNG key.
    task_ids: [B] int task of each example.
    example_mask: optional [B] bool; an example where it is False (batch padding, an example
      without a trainable label) is neither paired nor anyone's partner.

  Returns:
    partner_index: [B] int32; an unpaired example gets itself.
    has_partner: [B] bool, whether the example has a partner: its task has at least two
      included examples in the batch and it is one of them.
  """
  batch_size = task_ids.shape[0]
  positions = jnp.arange(batch_size, dtype=jnp.int32)
  excluded = jnp.zeros((batch_size,), bool) if example_mask is None else ~example_mask.astype(bool)
  random_rank = jax.random.permutation(rng, batch_size)  # Distinct keys: no ties to break.
  # lexsort's last key is the primary one: excluded examples go last, then by task.
  order = jnp.lexsort((random_rank, task_ids, excluded)).astype(jnp.int32)
  sorted_tasks, sorted_excluded = task_ids[order], excluded[order]
  # Each excluded example is a group of its own, so it stays unpaired.
  new_group = jnp.concatenate([
      jnp.ones((1,), bool),
      (sorted_tasks[1:] != sorted_tasks[:-1]) | sorted_excluded[1:] | sorted_excluded[:-1]])
  group_start = jax.lax.cummax(jnp.where(new_group, positions, 0))
  ends_group = jnp.concatenate([new_group[1:], jnp.ones((1,), bool)])
  group_end = jax.lax.cummin(jnp.where(ends_group, positions, batch_size - 1), reverse=True)
  group_size = group_end - group_start + 1
  partner_sorted = group_start + (positions - group_start + 1) % group_size
  partner_index = jnp.zeros_like(order).at[order].set(order[partner_sorted])
  has_partner = jnp.zeros((batch_size,), bool).at[order].set(group_size > 1)
  return partner_index, has_partner


def sample_lambda(rng: jax.Array, batch_size: int, alpha=0.2) -> jax.Array:
  """[B] float32 lambda ~ Beta(alpha, alpha), alpha clipped to `MIN_ALPHA` (see module doc)."""
  alpha = jnp.maximum(jnp.asarray(alpha, jnp.float32), MIN_ALPHA)
  return jax.random.beta(rng, alpha, alpha, (batch_size,), jnp.float32)


def mix_targets(targets: jax.Array, partner_targets: jax.Array, lam: jax.Array) -> jax.Array:
  """lam * y1 + (1 - lam) * y2 per example; targets [B, C], lam [B]."""
  lam = lam[:, None].astype(targets.dtype)
  return lam * targets + (1.0 - lam) * partner_targets


def smooth_targets(targets: jax.Array, class_mask: jax.Array, label_smoothing=0.1) -> jax.Array:
  """Label softening over the task's own classes: y <- (1 - eps) * y + eps / K_task.

  Masked classes stay exactly 0, so a row that summed to 1 over its task's classes still does.

  Args:
    targets: [B, C] target distributions, zero on masked classes.
    class_mask: [B, C] bool, the example's task classes.
    label_smoothing: eps.

  Returns:
    [B, C] softened targets.
  """
  num_task_classes = jnp.maximum(jnp.sum(class_mask, axis=-1, keepdims=True), 1)
  eps = jnp.asarray(label_smoothing, targets.dtype)
  softened = (1.0 - eps) * targets + eps / num_task_classes.astype(targets.dtype)
  return jnp.where(class_mask, softened, jnp.zeros_like(softened))


def _expand_to(per_example: jax.Array, ndim: int) -> jax.Array:
  """[B, ...] -> [B, ..., 1, 1] with `ndim` dimensions, for broadcasting against embeddings."""
  return per_example.reshape(per_example.shape + (1,) * (ndim - per_example.ndim))


def augment_with_details(
    rng: jax.Array,
    embeddings: jax.Array,
    targets: jax.Array,
    task_ids: jax.Array,
    mask: Optional[jax.Array],
    class_mask: jax.Array,
    kind: str,
    alpha=0.2,
    label_smoothing=0.1,
    example_mask: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array, AugmentDetails]:
  """`augment`, returning the per-example draws instead of summary stats. Same arguments."""
  if kind not in KINDS:
    raise ValueError(f"Unknown augmentation kind {kind!r}; expected one of {KINDS}.")
  batch_size = embeddings.shape[0]
  if targets.shape[0] != batch_size or task_ids.shape != (batch_size,):
    raise ValueError(
        f"Batch sizes differ: embeddings {embeddings.shape}, targets {targets.shape}, "
        f"task_ids {task_ids.shape}.")
  if mask is not None and (embeddings.ndim < 3 or mask.shape != embeddings.shape[:2]):
    raise ValueError(
        f"mask {mask.shape} must be [B, P] for embeddings [B, P, ...], got {embeddings.shape}.")

  if kind == "none":
    details = AugmentDetails(
        partner_index=jnp.arange(batch_size, dtype=jnp.int32),
        has_partner=jnp.zeros((batch_size,), bool),
        lam=jnp.ones((batch_size,), jnp.float32),
        from_self=jnp.ones(embeddings.shape, bool))
    return embeddings, targets, details

  pair_rng, lambda_rng, stitch_rng = jax.random.split(rng, 3)
  partner_index, has_partner = pair_within_task(pair_rng, task_ids, example_mask)
  # Unpaired examples get lambda = 1: their outputs below are exactly their inputs.
  lam = jnp.where(has_partner, sample_lambda(lambda_rng, batch_size, alpha), 1.0)
  partner_embeddings = embeddings[partner_index]

  # Where nothing may be mixed: unpaired examples, and positions where either side is padding.
  keep_self = ~_expand_to(has_partner, embeddings.ndim)
  if mask is not None:
    mask = mask.astype(bool)
    both_real = mask & mask[partner_index]
    keep_self = keep_self | ~_expand_to(both_real, embeddings.ndim)
  keep_self = jnp.broadcast_to(keep_self, embeddings.shape)

  if kind in ("mixup", "soft_mixup"):
    lam_x = _expand_to(lam, embeddings.ndim).astype(embeddings.dtype)
    mixed = lam_x * embeddings + (1.0 - lam_x) * partner_embeddings
    from_self = keep_self
  else:
    draws = jax.random.uniform(stitch_rng, embeddings.shape, jnp.float32)
    from_self = keep_self | (draws < _expand_to(lam, embeddings.ndim))
    mixed = partner_embeddings
  new_embeddings = jnp.where(from_self, embeddings, mixed)

  new_targets = mix_targets(targets, targets[partner_index], lam)
  if kind.startswith("soft_"):
    new_targets = smooth_targets(new_targets, class_mask, label_smoothing)
  # Unpaired examples keep their targets exactly, without softening.
  new_targets = jnp.where(has_partner[:, None], new_targets, targets)

  details = AugmentDetails(partner_index, has_partner, lam, from_self)
  return new_embeddings, new_targets, details


def augment(
    rng: jax.Array,
    embeddings: jax.Array,
    targets: jax.Array,
    task_ids: jax.Array,
    mask: Optional[jax.Array],
    class_mask: jax.Array,
    kind: str,
    alpha=0.2,
    label_smoothing=0.1,
    example_mask: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Applies one embedding augmentation, mixing each example with another of its own task.

  Jit with `kind` static (`jax.jit(augment, static_argnames="kind")`); `alpha` and
  `label_smoothing` may be traced. The same rng gives the same output. See the module docstring
  for pairing, alpha -> 0 and padding.

  The partner and lambda depend only on `rng`, `task_ids` and `example_mask`, not on the
  embeddings: calls that share an rng (e.g. one per augmented input: text, image, pooled) mix
  every input with the same partner and the same lambda, and return the same targets.

  Args:
    rng: PRNG key.
    embeddings: [B, ...] float: pooled [B, H], image embeddings [B, K, D] or token embeddings
      [B, L, H].
    targets: [B, C] target distributions (one-hot labels to start with), zero on masked classes.
    task_ids: [B] int task of each example.
    mask: None, or [B, P] bool/int marking the real positions of a sequence input [B, P, ...].
      The output mask is this mask unchanged.
    class_mask: [B, C] bool, the classes of each example's task.
    kind: "none" | "mixup" | "stitchup" | "soft_mixup" | "soft_stitchup".
    alpha: lambda ~ Beta(alpha, alpha); clipped below at `MIN_ALPHA`.
    label_smoothing: eps of the soft forms.
    example_mask: optional [B] bool; examples where it is False (batch padding, or examples that
      carry no loss) are neither augmented nor used as partners, so that a zero-weight example
      never leaks into a real one, nor an all-zero target row into a mixed target.

  Returns:
    embeddings: same shape and dtype as the input.
    targets: [B, C] mixed (and, for soft forms, softened) targets; rows sum to 1 and are zero on
      masked classes when the input targets are.
    stats: scalars: `aug_paired` and `aug_unpaired` (examples with and without a same-task
      partner, not counting those excluded by `example_mask`; both 0 for "none") and
      `aug_lambda_mean` (mean lambda of the paired examples).
  """
  new_embeddings, new_targets, details = augment_with_details(
      rng, embeddings, targets, task_ids, mask, class_mask, kind, alpha, label_smoothing,
      example_mask)
  if kind == "none":
    num_paired = num_unpaired = jnp.zeros((), jnp.int32)
  else:
    included = (jnp.ones(task_ids.shape, bool) if example_mask is None
                else example_mask.astype(bool))
    num_paired = jnp.sum(details.has_partner, dtype=jnp.int32)
    num_unpaired = jnp.sum(included & ~details.has_partner, dtype=jnp.int32)
  paired_lambda_sum = jnp.sum(jnp.where(details.has_partner, details.lam, 0.0))
  stats = {
      "aug_paired": num_paired,
      "aug_unpaired": num_unpaired,
      "aug_lambda_mean": paired_lambda_sum / jnp.maximum(num_paired, 1),
  }
  return new_embeddings, new_targets, stats
