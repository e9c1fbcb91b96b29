"""Task sampling: the probability of task i at a step is proportional to n_i ** alpha(step).

alpha = 1 samples tasks in proportion to their size, alpha = 0 uniformly. Alpha decay moves alpha
from `alpha_start` to `alpha_end` over `decay_steps` with a linear, cosine or step schedule, so
training starts close to the data distribution and ends giving small tasks more weight. Uniform,
proportional and a fixed alpha (a fixed temperature 1 / alpha) are special cases. Everything here
is a pure function of the step, so a resumed run samples exactly what an uninterrupted one would.
"""
import math

import numpy as np

KINDS = ("uniform", "proportional", "fixed_alpha", "alpha_decay")
SCHEDULES = ("linear", "cosine", "step")


def alpha_at(step: int, cfg, total_steps: int) -> float:
  """The sampling exponent at `step` under config `cfg` (the config's `sampling` block)."""
  if cfg.kind == "uniform":
    return 0.0
  if cfg.kind == "proportional":
    return 1.0
  if cfg.kind == "fixed_alpha":
    return float(cfg.alpha)
  if cfg.kind != "alpha_decay":
    raise ValueError(f"sampling.kind={cfg.kind!r}: use one of {KINDS}.")
  decay_steps = total_steps if cfg.decay_steps < 0 else cfg.decay_steps
  progress = min(max(step / max(decay_steps, 1), 0.0), 1.0)
  if cfg.schedule == "linear":
    fraction = progress
  elif cfg.schedule == "cosine":
    fraction = 0.5 * (1.0 - math.cos(math.pi * progress))
  elif cfg.schedule == "step":
    fraction = 1.0 if progress >= 0.5 else 0.0  # One switch, halfway through the decay.
  else:
    raise ValueError(f"sampling.schedule={cfg.schedule!r}: use one of {SCHEDULES}.")
  return float(cfg.alpha_start + (cfg.alpha_end - cfg.alpha_start) * fraction)


def task_probabilities(task_sizes: np.ndarray, alpha: float) -> np.ndarray:
  """p_i = n_i ** alpha / sum_j n_j ** alpha; tasks with no examples get probability 0."""
  sizes = np.asarray(task_sizes, np.float64)
  weights = np.where(sizes > 0, np.power(np.maximum(sizes, 1.0), alpha), 0.0)
  return weights / weights.sum()
