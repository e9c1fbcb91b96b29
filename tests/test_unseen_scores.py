"""Unseen-class detection scores (max softmax, max logit, energy, Mahalanobis) against numpy by
hand, the streaming Mahalanobis fit, the "shared" holdout plan, and the report fields."""
import jax
import numpy as np
import pytest

from mtl_jax import state as state_lib
from mtl_jax import steps
from mtl_jax.catalogue import TaskTable
from mtl_jax.evaluation import evaluate_outputs, format_table, metrics
from tests.evaluation_references import reference_auroc, reference_average_precision
from tests.helpers import NUM_CLASSES, random_batch, tiny_config, tiny_model


def test_logit_scores_by_hand():
  logits = np.array([[2.0, 0.0, -np.inf], [1.0, 1.0, 1.0], [-3.0, 5.0, 0.5]])
  scores = metrics.logit_known_scores(logits)
  # Row 0: softmax over (2, 0) = (e^2, 1) / (e^2 + 1).
  np.testing.assert_allclose(scores["msp"], [np.e**2 / (np.e**2 + 1), 1 / 3,
                                             np.exp(5) / (np.exp(-3) + np.exp(5) + np.exp(0.5))])
  np.testing.assert_allclose(scores["max_logit"], [2.0, 1.0, 5.0])
  np.testing.assert_allclose(scores["energy"], [np.log(np.e**2 + 1), 1 + np.log(3),
                                                np.log(np.exp(-3) + np.exp(5) + np.exp(0.5))])


def test_detection_ranks_unseen_by_the_negated_score():
  known = np.array([3.0, 2.0, -1.0, 0.5, 2.0])
  unseen = np.array([False, False, True, True, True])
  auroc, aupr = metrics.grouped_unseen_detection(known, unseen, np.zeros(5, np.int64), 1)
  # Pairs (unseen, seen) with the unseen less known: (-1 vs 3, 2), (0.5 vs 3, 2), (2 vs 3) and
  # one tie (2 vs 2): 5.5 of 6.
  assert auroc[0] == pytest.approx(5.5 / 6)
  assert aupr[0] == pytest.approx(reference_average_precision(list(-known), list(unseen)))
  # Non-finite scores (a task without a fit) leave their examples out.
  with_nan = np.r_[known, np.nan]
  again = metrics.grouped_unseen_detection(with_nan, np.r_[unseen, True],
                                           np.zeros(6, np.int64), 1)
  assert again[0][0] == auroc[0] and again[1][0] == aupr[0]


def _mahalanobis_reference(train_x, train_y, x, num_classes, ridge):
  """Means, tied covariance (+ ridge x mean variance) and min squared distance, plainly."""
  means = np.stack([train_x[train_y == c].mean(0) for c in range(num_classes)])
  centred = train_x - means[train_y]
  cov = centred.T @ centred / len(train_x)
  cov += ridge * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
  precision = np.linalg.inv(cov)
  d = [[(v - m) @ precision @ (v - m) for m in means] for v in x]
  return means, cov, -np.min(d, axis=1)


def test_tied_gaussian_fit_matches_numpy_and_streams():
  rng = np.random.default_rng(0)
  trained = np.array([3, 2])
  n = 60
  task = rng.integers(0, 2, n)
  label = rng.integers(0, 4, n) % (trained[task] + 1)  # Some held-out labels (== trained).
  x = rng.normal(size=(n, 4)) + label[:, None]
  fit = metrics.TiedGaussianFit(trained, 4)
  for part in np.array_split(np.arange(n), 3):  # Streamed in three batches.
    fit.update(x[part], label[part], task[part])
  fit.fit(ridge=1e-2)
  queries = rng.normal(size=(7, 4))
  for t in range(2):
    mine = (task == t) & (label < trained[t])
    means, cov, expected = _mahalanobis_reference(x[mine], label[mine], queries, trained[t], 1e-2)
    np.testing.assert_allclose(fit.means[t, :trained[t]], means, rtol=1e-10)
    whiten = fit.whiten[t]
    np.testing.assert_allclose(np.linalg.inv(whiten @ whiten.T), cov, rtol=1e-8, atol=1e-10)
    got = fit.known_score(queries, np.full(7, t))
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_tied_gaussian_fit_without_data_scores_nan():
  fit = metrics.TiedGaussianFit(np.array([2, 2]), 3)
  fit.update(np.ones((4, 3)), np.array([0, 1, 0, 1]), np.zeros(4, np.int64))
  fit.fit()
  scores = fit.known_score(np.ones((2, 3)), np.array([0, 1]))
  assert np.isfinite(scores[0]) and np.isnan(scores[1])


def test_shared_holdout_leaves_the_name_out_of_every_task():
  names = [["shoes", "bags", "hats"],  # Last class "hats" is held out...
           ["Hats", "belts", "socks", "scarves"],  # ...so here too (case ignored), and "scarves".
           ["scarves", "gloves"],  # Would keep 1 class: holds none out.
           ["rings", "watches", "pens"]]
  trained, order = state_lib.holdout_plan(names, 1, "shared")
  np.testing.assert_array_equal(trained, [2, 2, 2, 2])
  # Known classes first, then the held-out ones, each in catalogue order.
  np.testing.assert_array_equal(order, [[0, 1, 2, -1], [1, 2, 0, 3], [0, 1, -1, -1],
                                        [0, 1, 2, -1]])
  last, no_order = state_lib.holdout_plan(names, 1, "last")
  assert no_order is None
  np.testing.assert_array_equal(last, [2, 3, 2, 2])
  np.testing.assert_array_equal(last, state_lib.trained_num_classes([3, 4, 2, 3], 1))
  with pytest.raises(ValueError, match="holdout_mode"):
    state_lib.holdout_plan(names, 1, "first")


def test_shared_holdout_model_maps_labels_to_head_columns():
  names = [[f"t{t}-c{j}" for j in range(k)] for t, k in enumerate(NUM_CLASSES)]
  names[1][0] = names[0][-1]  # Task 1's first class shares task 0's held-out name.
  trained, order = state_lib.holdout_plan(names, 1, "shared")
  assert trained[1] == NUM_CLASSES[1] - 2
  config = tiny_config()
  base = tiny_model(config, num_classes=trained)
  model = state_lib.Model(config, base.spec, trained, base.mesh, class_order=order)
  table = TaskTable(names=[f"t{t}" for t in range(len(names))], class_names=names, image_dim=8,
                    max_images=2)
  assert model.class_names(table, 1) == tuple(names[1][1:-1])
  batch = random_batch(0)
  batch["task_id"][:2] = 1
  batch["label"][:2] = [0, 1]  # The shared held-out class, then task 1's first known class.
  labels = np.asarray(steps.model_labels(model, batch))
  assert labels[0] >= trained[1] and labels[1] == 0
  np.testing.assert_array_equal(order[batch["task_id"], labels], batch["label"])
  # The eval step returns the head's inputs beside the logits (shapes only: no compilation).
  shapes = model.state_shapes()
  out = jax.eval_shape(lambda p, a: steps.eval_step(
      model, p, a, {**batch, "example_mask": np.ones(16, np.int32)}, with_features=True),
      shapes.params, shapes.adapter_map)
  assert out["features"].shape == (16, model.spec.hidden_size)
  assert out["logits"].shape == (16, config.model.max_classes)


def _report_fixture(seed=0):
  rng = np.random.default_rng(seed)
  full, trained = np.array([4, 3, 5]), np.array([3, 2, 5])  # Task 2 holds nothing out.
  task_id = rng.permutation(np.repeat(np.arange(3), [40, 30, 20]))
  label = rng.integers(0, full[task_id])
  logits = rng.normal(0, 2, (task_id.size, 6)).astype(np.float32)
  features = rng.normal(size=(task_id.size, 3)).astype(np.float32)
  table = TaskTable(names=["a", "b", "c"], class_names=[[f"k{i}" for i in range(k)]
                                                         for k in full], image_dim=2, max_images=1)
  outputs = {"logits": logits, "label": label, "task_id": task_id, "features": features}
  return table, full, trained, outputs


def test_report_has_every_score_per_task_and_pooled():
  table, full, trained, outputs = _report_fixture()
  fit = metrics.TiedGaussianFit(trained, 3)
  fit.update(outputs["features"], outputs["label"], outputs["task_id"])  # Stands in for train.
  fit.fit()
  result = evaluate_outputs(table, outputs, trained, np.ones(3), feature_fit=fit)
  logits, label, task_id = (outputs[k] for k in ("logits", "label", "task_id"))
  masked = np.where(np.arange(6)[None] < trained[task_id][:, None], logits, -np.inf)
  known = metrics.logit_known_scores(masked)
  known["mahalanobis"] = fit.known_score(outputs["features"], task_id)
  pool = trained[task_id] < full[task_id]
  for name in metrics.UNSEEN_SCORES:
    for t in (0, 1):
      mine = task_id == t
      unseen = label[mine] >= trained[t]
      row = result.rows[t]
      assert row[f"unseen_auroc_{name}"] == pytest.approx(
          reference_auroc(list(-known[name][mine]), list(unseen)), rel=1e-9)
      assert row[f"unseen_aupr_{name}"] == pytest.approx(
          reference_average_precision(list(-known[name][mine]), list(unseen)), rel=1e-9)
    assert f"unseen_auroc_{name}" not in result.rows[2]  # Nothing held out there.
    pooled_unseen = label[pool] >= trained[task_id[pool]]
    assert result.summary[f"pooled_unseen_auroc_{name}"] == pytest.approx(
        reference_auroc(list(-known[name][pool]), list(pooled_unseen)), rel=1e-9)
    assert result.summary[f"mean_unseen_auroc_{name}"] == pytest.approx(
        np.mean([result.rows[t][f"unseen_auroc_{name}"] for t in (0, 1)]))
  # max softmax under its name repeats the historical keys.
  assert result.rows[0]["unseen_auroc_msp"] == result.rows[0]["unseen_auroc"]
  assert result.summary["pooled_unseen_aupr_msp"] == result.summary["pooled_unseen_aupr"]
  # The trained classes and their chance are what the reports show.
  assert result.rows[0]["trained_classes"] == 3 and result.rows[0]["chance"] == 1 / 3
  table_text = format_table("test", result.rows, result.summary)
  assert " 3/4 " in table_text and "mahalanobis" in table_text


def test_report_without_features_has_none_for_mahalanobis():
  table, _, trained, outputs = _report_fixture(1)
  del outputs["features"]
  result = evaluate_outputs(table, outputs, trained, np.ones(3))
  assert result.rows[0]["unseen_auroc_mahalanobis"] is None
  assert result.summary["pooled_unseen_auroc_mahalanobis"] is None
  assert result.rows[0]["unseen_auroc_energy"] is not None


@pytest.mark.slow
def test_a_run_with_shared_holdout_reports_every_score(tmp_path):
  """The real path: a tiny run holding classes out ("shared") writes every score per task and
  pooled, Mahalanobis included (fitted on the train split), into JSON, CSV and HTML."""
  import json
  from mtl_jax import synthetic, train
  catalogue = tmp_path / "catalogue"
  config = tiny_config(**{"total_steps": 4, "eval.holdout_classes": 1,
                          "eval.holdout_mode": "shared"})
  synthetic.generate_catalogue(catalogue, config.data.synthetic)
  config.data.catalogue_dir = str(catalogue)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  reports = tmp_path / "run" / "reports"
  report = json.loads((reports / "test.json").read_text())
  for name in metrics.UNSEEN_SCORES:
    assert summary[f"pooled_unseen_auroc_{name}"] is not None, name
    assert any(r.get(f"unseen_auroc_{name}") is not None for r in report["tasks"]), name
  assert "unseen_auroc_mahalanobis" in (reports / "test.csv").read_text().splitlines()[0]
  assert "unseen AUROC Mahalanobis" in (reports / "report.html").read_text()
