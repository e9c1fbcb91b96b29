"""Best checkpoint and early stopping on validation (mtl_jax/early_stopping.py, train.py).

The training tests script the watched validation value by step (the real evaluation runs; only
`mean_accuracy` of the validation summary is replaced), so the step at which a run stops, and
the step kept as the best, are known in advance.
"""
import contextlib
import dataclasses
import io
import json
import shutil

import jax.numpy as jnp
import pytest
from etils import epath

from mtl_jax import checkpointing
from mtl_jax import config_base
from mtl_jax import early_stopping
from mtl_jax import predict
from mtl_jax import train
from mtl_jax import workdir as workdir_lib
from tests.helpers import tiny_config

METRIC = "validation/mean_accuracy"


# --- The tracker ------------------------------------------------------------------------------

def tracker_config(**overrides):
  return tiny_config(**{"best_metric": METRIC, **overrides})


def test_improvement_needs_more_than_min_delta_and_patience_counts_evaluations():
  tracker, _ = early_stopping.Tracker.from_config(tracker_config(
      early_stopping_patience=2, early_stopping_min_delta=0.05))
  assert tracker.update(2, {"mean_accuracy": 0.1})  # The first value is the best so far.
  assert tracker.update(4, {"mean_accuracy": 0.3})
  assert not tracker.update(6, {"mean_accuracy": 0.34})  # +0.04: not more than 0.05.
  assert not tracker.should_stop()
  assert not tracker.update(8, {"mean_accuracy": None})  # No scored task: no evaluation.
  assert not tracker.should_stop()
  assert not tracker.update(10, {"mean_accuracy": 0.2})
  assert tracker.should_stop()
  assert (tracker.best_step, tracker.best_value) == (4, 0.3)
  assert tracker.metrics(4) == {METRIC: 0.3} and tracker.metrics(10) == {}
  assert "Early stopping at step 10" in tracker.stop_message(10)


def test_min_mode_and_the_last_evaluation_spends_no_patience():
  tracker, _ = early_stopping.Tracker.from_config(tracker_config(
      best_metric="validation/mean_loss", best_mode="min", early_stopping_patience=1))
  assert tracker.update(2, {"mean_loss": 2.0})
  assert tracker.update(4, {"mean_loss": 1.5})
  assert not tracker.update(6, {"mean_loss": 1.7}, count=False)
  assert not tracker.should_stop() and tracker.best_step == 4


def test_saved_state_is_kept_unless_the_metric_changes():
  saved = {"metric": METRIC, "mode": "max", "value": 0.5, "step": 40,
           "evals_without_improvement": 3}
  tracker, note = early_stopping.Tracker.from_config(
      tracker_config(early_stopping_patience=5), saved)
  assert note is None
  assert (tracker.best_value, tracker.best_step, tracker.evals_without_improvement) == (0.5, 40, 3)
  assert tracker.patience == 5  # The config's patience, not the saved one.
  fresh, note = early_stopping.Tracker.from_config(
      tracker_config(best_metric="validation/weighted_accuracy"), saved)
  assert fresh.best_step is None and "starts afresh" in note


def test_an_unknown_metric_names_the_known_ones():
  tracker, _ = early_stopping.Tracker.from_config(tracker_config(
      best_metric="validation/mean_acuracy"))
  with pytest.raises(config_base.ConfigError, match=r"no 'mean_acuracy'.*"
                     r"'validation/mean_accuracy'"):
    tracker.update(2, {"mean_accuracy": 0.5, "tasks_total": 3})


@pytest.mark.parametrize("overrides,message", [
    ({"best_metric": "mean_accuracy"}, "config.best_metric: 'mean_accuracy' is not a validation"),
    ({"best_metric": "validation/"}, "config.best_metric: 'validation/' is not a validation"),
    ({"best_mode": "maximum"}, "config.best_mode: unknown 'maximum'"),
    ({"best_metric": "", "early_stopping_patience": 3},
     "config.early_stopping_patience: 3 needs a metric to watch"),
])
def test_bad_fields_are_refused(overrides, message):
  with pytest.raises(config_base.ConfigError) as error:
    config_base.validate_config(tiny_config(**overrides), 1)
  assert str(error.value).startswith(message), str(error.value)


def test_new_fields_may_change_on_resume():
  for field in ("best_metric", "best_mode", "eval_on_best", "early_stopping_patience",
                "early_stopping_min_delta"):
    assert workdir_lib._safe(field), field


# --- Keeping the best checkpoint --------------------------------------------------------------

@pytest.mark.parametrize("mode,values,best", [
    ("max", [0.1, 0.6, 0.4, 0.5, 0.55, 0.3], 2),
    ("min", [0.9, 0.8, 0.85, 0.2, 0.7, 0.95], 4),
])
def test_the_best_step_survives_rotation_with_max_to_keep_1(tmp_path, mode, values, best):
  config = tracker_config(best_mode=mode)
  tracker, _ = early_stopping.Tracker.from_config(config)
  mngr = workdir_lib.checkpoint_manager(epath.Path(tmp_path), 1, create=True,
                                        best_metric=METRIC, best_mode=mode)
  for step, value in enumerate(values, start=1):
    tracker.update(step, {"mean_accuracy": value})
    checkpointing.save(mngr, step, {"x": jnp.full((2,), step)},
                       {early_stopping.META_KEY: tracker.to_meta()}, force=True,
                       metrics=tracker.metrics(step))
    mngr.wait_until_finished()
    assert mngr.all_steps() == sorted({tracker.best_step, step})
  assert tracker.best_step == best
  mngr.close()
  # A reader (no max_to_keep) finds the same best step, and deletes nothing.
  reader = workdir_lib.checkpoint_manager(epath.Path(tmp_path))
  assert workdir_lib._resolve_step(reader, tmp_path, reader.all_steps(), "best") == best
  reader.close()


def test_step_flag_values():
  assert workdir_lib.parse_step(None) is None
  assert workdir_lib.parse_step("latest") is None
  assert workdir_lib.parse_step("best") == "best"
  assert workdir_lib.parse_step("12") == 12
  with pytest.raises(workdir_lib.RunDirError, match="--step='last'.*'latest' or 'best'"):
    workdir_lib.parse_step("last")


def test_step_best_without_a_recorded_best_is_refused(tmp_path):
  mngr = workdir_lib.checkpoint_manager(epath.Path(tmp_path), 2, create=True)
  checkpointing.save(mngr, 5, {"x": jnp.zeros(2)}, {"config": "{}"}, force=True)
  mngr.wait_until_finished()
  mngr.close()
  with pytest.raises(workdir_lib.RunDirError, match=r"no best checkpoint recorded.*\[5\]"):
    workdir_lib.open_run(tmp_path, "best")


# --- Training ---------------------------------------------------------------------------------

def run_config(catalogue_dir, **overrides):
  return tiny_config(**{
      "data.catalogue_dir": str(catalogue_dir), "total_steps": 20, "eval_every": 2,
      "checkpoint_every": 3, "log_every": 2, "max_to_keep": 1, "best_metric": METRIC,
      "early_stopping_patience": 2, "early_stopping_min_delta": 0.05, **overrides})


def script_validation(patch, values: dict) -> dict:
  """Replaces the validation mean accuracy by `values[step]` where the step has a value."""
  evaluate = train.evaluate_split

  def scripted(model, state, catalogue, split, *args, **kwargs):
    result = evaluate(model, state, catalogue, split, *args, **kwargs)
    step = int(state.step)
    if split != "validation" or step not in values:
      return result
    return dataclasses.replace(result, summary={**result.summary, "mean_accuracy": values[step]})

  patch.setattr(train, "evaluate_split", scripted)
  return values


@pytest.fixture
def scripted(monkeypatch):
  return script_validation(monkeypatch, {})


# Improvements at 2 and 4; +0.04 at 6 is not more than min_delta 0.05; 8 is worse: stop at 8.
SCRIPT = {2: 0.1, 4: 0.3, 6: 0.34, 8: 0.2}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, catalogue_dir):
  """A run stopped early at step 8 with the best at step 4, and its printed log; read-only
  (copy it to change it)."""
  workdir = tmp_path_factory.mktemp("stopped") / "run"
  out = io.StringIO()
  with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
    script_validation(patch, dict(SCRIPT))
    train.train_and_evaluate(run_config(catalogue_dir), str(workdir))
  return {"workdir": workdir, "out": out.getvalue()}


def steps_of(workdir):
  mngr = workdir_lib.checkpoint_manager(epath.Path(workdir))
  try:
    return mngr.all_steps(), checkpointing.read_meta(mngr, mngr.latest_step())
  finally:
    mngr.close()


def test_training_stops_early_keeps_the_best_and_reports_it(stopped_run):
  out = stopped_run["out"]
  assert ("Early stopping at step 8: validation/mean_accuracy has not improved by more than "
          "0.05 for 2 validation evaluations (patience 2; best validation/mean_accuracy 0.3000 "
          "at step 4).") in out, out
  assert "step 10/" not in out  # No step after the stop.
  steps, meta = steps_of(stopped_run["workdir"])
  assert steps == [4, 8]  # max_to_keep=1 rotated out 2, 3 and 6, but not the best.
  best = meta[early_stopping.META_KEY]
  assert (best["step"], best["value"], best["evals_without_improvement"]) == (4, 0.3, 2)
  assert "Final evaluation on the best checkpoint: validation/mean_accuracy 0.3000 at step 4" \
      in out
  for split in ("validation", "test"):
    report = json.loads((stopped_run["workdir"] / "reports" / f"{split}.json").read_text())
    assert report["step"] == 4


def test_predict_step_best_restores_the_best_checkpoint(stopped_run, catalogue_dir, tmp_path,
                                                        capsys):
  predictor = predict.Predictor.from_workdir(stopped_run["workdir"], step="best")
  assert predictor.step == 4
  predictor.close()
  assert predict.Predictor.from_workdir(stopped_run["workdir"]).step == 8  # Latest by default.
  record = json.loads((catalogue_dir / "test.jsonl").read_text().splitlines()[0])
  source = tmp_path / "in.jsonl"
  source.write_text(json.dumps({"task": record["task"], "title": record.get("title", ""),
                                "description": record.get("description", "")}) + "\n")
  capsys.readouterr()
  assert predict.main([f"--workdir={stopped_run['workdir']}", f"--input={source}",
                       f"--output={tmp_path / 'out.jsonl'}", "--step=best"]) == 0
  assert "(checkpoint step 4 of" in capsys.readouterr().out


def test_the_same_command_after_an_early_stop_trains_nothing(stopped_run, catalogue_dir,
                                                             tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_run["workdir"], workdir)
  capsys.readouterr()
  train.train_and_evaluate(run_config(catalogue_dir), str(workdir))
  out = capsys.readouterr().out
  assert "Stopped early at step 8 (2 validation evaluations without improvement, patience 2)" \
      in out, out
  assert "step 9/" not in out and steps_of(workdir)[0] == [4, 8]
  assert json.loads((workdir / "reports" / "test.json").read_text())["step"] == 4


def test_resume_keeps_the_best_and_the_patience_spent(stopped_run, catalogue_dir, tmp_path,
                                                      scripted, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_run["workdir"], workdir)
  # More patience (a safe change) trains on; 0.32 at step 10 is no improvement on 0.3 by more
  # than 0.05, the third in a row. A fresh tracker would call it the best and stop at 14.
  scripted.update({10: 0.32, 12: 0.9})
  capsys.readouterr()
  train.train_and_evaluate(run_config(catalogue_dir, early_stopping_patience=3), str(workdir))
  out = capsys.readouterr().out
  assert "Resumed from step 8" in out
  assert "Early stopping at step 10:" in out, out
  steps, meta = steps_of(workdir)
  assert steps == [4, 10]
  assert meta[early_stopping.META_KEY]["step"] == 4
  assert json.loads((workdir / "reports" / "test.json").read_text())["step"] == 4
