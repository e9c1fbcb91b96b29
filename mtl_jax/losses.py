"""Losses over each example's own task classes.

A task with K classes owns columns 0..K-1 of the padded head; the other columns are masked out of
the softmax with `jnp.where`, so a masked class gets probability zero and its logit no gradient.
"""
import jax
import jax.numpy as jnp

NEG_INF = -1e9  # Finite: exp underflows to 0, and 0 * NEG_INF stays finite in soft targets.


def mask_logits(logits: jax.Array, class_mask: jax.Array) -> jax.Array:
  """logits [B, C], class_mask [B, C] bool -> logits with masked classes at NEG_INF."""
  return jnp.where(class_mask, logits, jnp.asarray(NEG_INF, logits.dtype))


def masked_log_softmax(logits: jax.Array, class_mask: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(mask_logits(logits.astype(jnp.float32), class_mask), axis=-1)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, class_mask: jax.Array) -> jax.Array:
  """Per-example cross-entropy against a target distribution [B, C] (zero on masked classes)."""
  log_probs = masked_log_softmax(logits, class_mask)
  return -jnp.sum(jnp.where(class_mask, targets * log_probs, 0.0), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array, class_mask: jax.Array) -> jax.Array:
  """Per-example cross-entropy against integer labels [B]."""
  log_probs = masked_log_softmax(logits, class_mask)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
