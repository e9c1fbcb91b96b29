import math

import ml_collections
import numpy as np
import pytest

from mtl_jax import sampling


def cfg(**kw):
  base = dict(kind="alpha_decay", alpha=0.5, alpha_start=1.0, alpha_end=0.5, schedule="linear",
              decay_steps=-1)
  base.update(kw)
  return ml_collections.ConfigDict(base)


SIZES = np.array([10, 100, 1000, 0, 5])


def test_probabilities_follow_the_formula():
  for alpha in (0.0, 0.3, 0.5, 1.0):
    p = sampling.task_probabilities(SIZES, alpha)
    expected = np.array([n ** alpha if n else 0.0 for n in SIZES], np.float64)
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-12)
    assert p[3] == 0.0  # A task with no examples is never drawn.


def test_special_cases():
  assert sampling.alpha_at(123, cfg(kind="uniform"), 1000) == 0.0
  assert sampling.alpha_at(123, cfg(kind="proportional"), 1000) == 1.0
  assert sampling.alpha_at(123, cfg(kind="fixed_alpha", alpha=0.3), 1000) == 0.3
  np.testing.assert_allclose(sampling.task_probabilities(SIZES, 0.0), [0.25, 0.25, 0.25, 0, 0.25])
  np.testing.assert_allclose(sampling.task_probabilities(SIZES, 1.0), SIZES / SIZES.sum())


@pytest.mark.parametrize("schedule", ["linear", "cosine", "step"])
def test_alpha_decay_schedules(schedule):
  c = cfg(schedule=schedule, alpha_start=1.0, alpha_end=0.2)
  total = 1000
  for step in (0, 100, 250, 499, 500, 750, 1000, 2000):
    progress = min(step / total, 1.0)
    fraction = {"linear": progress,
                "cosine": 0.5 * (1 - math.cos(math.pi * progress)),
                "step": float(progress >= 0.5)}[schedule]
    assert sampling.alpha_at(step, c, total) == pytest.approx(1.0 - 0.8 * fraction)
  assert sampling.alpha_at(0, c, total) == 1.0
  assert sampling.alpha_at(total, c, total) == pytest.approx(0.2)


def test_decay_steps_shorter_than_training():
  c = cfg(decay_steps=100)
  assert sampling.alpha_at(50, c, 1000) == pytest.approx(0.75)
  assert sampling.alpha_at(500, c, 1000) == pytest.approx(0.5)


def test_unknown_kind_is_an_error():
  with pytest.raises(ValueError, match="sampling.kind"):
    sampling.alpha_at(0, cfg(kind="temperature"), 10)
