"""End to end through the real path: synthetic catalogue -> TFDS -> tokenizer -> train ->
checkpoint -> resume -> evaluate -> report."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from experiments import common as experiments_common
from mtl_jax import train
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(catalogue_dir, **overrides):
  config = tiny_config(**{"data.catalogue_dir": str(catalogue_dir), "total_steps": 6, **overrides})
  return config


def final_params(workdir, step):
  mngr = ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", item_names=("state", "meta"))
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return restored.state["params"]


def test_trains_evaluates_every_task_and_writes_the_report(catalogue_dir, tmp_path, capsys):
  summary = train.train_and_evaluate(
      run_config(catalogue_dir, eval_every=3, log_every=2, eval_on_best=False), str(tmp_path))
  out = capsys.readouterr().out
  # Each evaluation names its step (3 is not a logged step); the experiments parse the lines.
  assert re.search(r"^validation at step 3: 6 tasks, mean accuracy ", out, re.M)
  assert re.search(r"^test at step 6: 6 tasks, mean accuracy ", out, re.M)
  assert [step for step, _ in experiments_common.validation_curve(out)] == [3, 6]
  report = json.loads((tmp_path / "reports" / "test.json").read_text())
  assert report["summary"] == summary
  assert summary["tasks_evaluated"] == summary["tasks_total"] == 6
  assert len(report["tasks"]) == 6
  for row in report["tasks"]:
    assert 0.0 <= row["accuracy"] <= 1.0
    assert (row["top5_accuracy"] is None) == (row["num_classes"] <= 5)
  csv_lines = (tmp_path / "reports" / "test.csv").read_text().splitlines()
  assert csv_lines[0].startswith("task,num_classes") and len(csv_lines) == 7
  assert (tmp_path / "reports" / "validation.json").exists()
  assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(
    catalogue_dir, tmp_path, capsys):
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  train.train_and_evaluate(run_config(catalogue_dir), str(straight))
  train.train_and_evaluate(run_config(catalogue_dir), str(interrupted), stop_at_step=3)
  assert sorted(int(p.name) for p in (interrupted / "checkpoints").iterdir()
                if p.name.isdigit()) == [3]
  capsys.readouterr()
  train.train_and_evaluate(run_config(catalogue_dir), str(interrupted))
  out = capsys.readouterr().out
  assert "Resumed from step 3" in out and "training is complete" not in out
  # Run again once finished: it says so, evaluates again and trains nothing more.
  train.train_and_evaluate(run_config(catalogue_dir), str(interrupted))
  assert "training is complete; evaluating again" in capsys.readouterr().out
  a, b = final_params(straight, 6), final_params(interrupted, 6)
  flat_a, flat_b = dict(_leaves(a)), dict(_leaves(b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, f"{prefix}/{k}")
  else:
    yield prefix, np.asarray(tree)


def test_non_finite_loss_stops_with_step_tasks_and_checkpoint(catalogue_dir, tmp_path):
  config = run_config(catalogue_dir, **{"optimizer.learning_rate": 1e30,
                                        "optimizer.warmup_steps": 0, "total_steps": 20,
                                        "checkpoint_every": 1})
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert "at step" in message and "tasks in that batch: site" in message
  assert "Last good checkpoint:" in message and "learning_rate" in message


def test_misspelt_config_field_fails_naming_it(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "mtl_jax.main", "--config=configs/demo.py:tiny",
       "--config.optimizer.learnig_rate=0.1", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "learnig_rate" in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_the_budget_line_counts_passes_and_warns_under_one():
  config = tiny_config(total_steps=10, batch_size=8)
  assert train.training_budget(config, np.array([30, 10])) == (
      "Budget: 10 steps x batch 8 = 80 examples, 2.00 passes over the 40 training products")
  line = train.training_budget(config, np.array([100, 60]))
  assert "0.50 passes over the 160 training products" in line
  assert "under one pass" in line and "--config.total_steps" in line
