"""The best checkpoint and early stopping, both judged on one validation metric.

`config.best_metric` names a value of the validation summary as it is logged
("validation/mean_accuracy"); `config.best_mode` says whether higher ("max") or lower ("min") is
better. After every validation evaluation the `Tracker` decides whether the run improved: the
first value always does, a later one when it beats the best so far by more than
`config.early_stopping_min_delta`. The loop saves the step of every improvement (also when it is
not a checkpoint step), with the value as Orbax metrics, and the checkpoint manager keeps the
checkpoint holding the best value besides the latest `max_to_keep` (`preservation_policy`).
Only improvements carry metrics, so Orbax's best and the tracker's best are the same step.

Early stopping: after `config.early_stopping_patience` evaluations in a row without an
improvement, training saves and ends; the reports then follow as at the end of training.

The tracker's state (best value and step, evaluations without improvement) travels in every
checkpoint's meta under "best", so a resumed run keeps both. A resume with another metric or
mode starts the tracking afresh; one with another patience or min_delta keeps the saved state
(a run stopped early continues when its patience is raised).
"""
from __future__ import annotations

import dataclasses
import math

from orbax.checkpoint import checkpoint_managers

from mtl_jax import config_base

META_KEY = "best"
SPLIT = "validation"


class MetricError(config_base.ConfigError):
  """`config.best_metric` names a value the validation summary does not have."""


def _worst(mode: str) -> float:
  return -math.inf if mode == "max" else math.inf


def preservation_policy(metric: str, mode: str, max_to_keep: int):
  """Keeps the latest `max_to_keep` checkpoints and the one whose metrics hold the best
  `metric`; checkpoints saved under another metric rank last."""
  get = lambda metrics: float(metrics.get(metric, _worst(mode)))
  return checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=max_to_keep),
      checkpoint_managers.BestN(get_metric_fn=get, reverse=mode == "min", n=1,
                                keep_checkpoints_without_metrics=False),
  ]), get


@dataclasses.dataclass
class Tracker:
  """The best value of one validation metric so far, and the patience spent.

  Attributes:
    metric: the watched name ("validation/<summary key>"); "" tracks nothing.
    mode: "max" or "min".
    patience: evaluations without improvement that stop training (0: never).
    min_delta: the smallest change that counts as an improvement.
    best_value: the best value so far (None before the first scored evaluation).
    best_step: the step it was measured at (and saved at).
    evals_without_improvement: evaluations since the last improvement.
  """
  metric: str
  mode: str = "max"
  patience: int = 0
  min_delta: float = 0.0
  best_value: float | None = None
  best_step: int | None = None
  evals_without_improvement: int = 0

  @classmethod
  def from_config(cls, config, saved: dict | None = None) -> tuple[Tracker, str | None]:
    """The tracker of a run, continued from a checkpoint's `meta["best"]` where it watched the
    same metric the same way. Returns (tracker, a note to print when the saved one is dropped)."""
    tracker = cls(metric=config.best_metric, mode=config.best_mode,
                  patience=config.early_stopping_patience,
                  min_delta=float(config.early_stopping_min_delta))
    if not saved or not tracker.metric:
      return tracker, None
    if (saved.get("metric"), saved.get("mode")) != (tracker.metric, tracker.mode):
      return tracker, (f"best checkpoint: now watching {tracker.metric} ({tracker.mode}); the "
                       f"checkpoint tracked {saved.get('metric')} ({saved.get('mode')}), so the "
                       "best so far starts afresh.")
    tracker.best_value = saved.get("value")
    tracker.best_step = saved.get("step")
    tracker.evals_without_improvement = int(saved.get("evals_without_improvement", 0))
    return tracker, None

  @property
  def enabled(self) -> bool:
    return bool(self.metric)

  @property
  def key(self) -> str:
    """The key of the metric in the validation summary."""
    return self.metric.split("/", 1)[1]

  def value(self, summary: dict) -> float | None:
    """The watched value of a validation summary (None where it has no data).

    Raises:
      MetricError: the summary has no such key.
    """
    if self.key not in summary:
      numeric = sorted(k for k, v in summary.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool))
      raise MetricError(
          f"config.best_metric: the validation summary has no {self.key!r}. Fix: use one of "
          f"{[f'{SPLIT}/{k}' for k in numeric]}, or '' for no best checkpoint")
    value = summary[self.key]
    return None if value is None or not math.isfinite(value) else float(value)

  def update(self, step: int, summary: dict, count: bool = True) -> bool:
    """Records one validation evaluation; returns whether it improved on the best.

    `count`: whether an evaluation without improvement spends patience (the evaluation at the
    end of training does not: nothing follows it). One without a value (no scored task) neither
    improves nor spends patience.
    """
    if not self.enabled:
      return False
    value = self.value(summary)
    if value is None:
      return False
    sign = 1.0 if self.mode == "max" else -1.0
    if self.best_value is None or sign * (value - self.best_value) > self.min_delta:
      self.best_value, self.best_step = value, int(step)
      self.evals_without_improvement = 0
      return True
    if count:
      self.evals_without_improvement += 1
    return False

  def should_stop(self) -> bool:
    return (self.enabled and self.patience > 0
            and self.evals_without_improvement >= self.patience)

  def metrics(self, step: int) -> dict | None:
    """The Orbax metrics of a checkpoint at `step`: the best value where `step` is the best,
    else none (an empty dict, which ranks last: Orbax warns of a save without metrics)."""
    if not self.enabled:
      return None
    return {self.metric: self.best_value} if self.best_step == step else {}

  def to_meta(self) -> dict:
    return {"metric": self.metric, "mode": self.mode, "value": self.best_value,
            "step": self.best_step, "evals_without_improvement": self.evals_without_improvement,
            "patience": self.patience, "min_delta": self.min_delta}

  def describe_best(self) -> str:
    return f"{self.metric} {self.best_value:.4f} at step {self.best_step}"

  def stop_message(self, step: int) -> str:
    return (f"Early stopping at step {step}: {self.metric} has not improved by more than "
            f"{self.min_delta:g} for {self.evals_without_improvement} validation evaluations "
            f"(patience {self.patience}; best {self.describe_best()}).")
