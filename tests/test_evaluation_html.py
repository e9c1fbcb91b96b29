"""The HTML report page, built from report files that evaluate_outputs and write_report wrote."""
import base64
import io
import json
import re
import sys
import types

import numpy as np
import pytest
from PIL import Image

import mtl_jax
from mtl_jax import evaluation
from mtl_jax.catalogue import TaskTable
from mtl_jax.evaluation import html as report_page

PNG_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
SECTIONS = ("summary", "distribution", "top-bottom", "tasks", "dypa", "config")
NAMES = ["<b>shop & co</b>", "plain", "boots", "kettles", "seeds", "empty-shop"]
FULL = np.array([3, 5, 7, 4, 9, 3])
TRAINED = np.array([3, 4, 6, 3, 8, 3])  # Tasks 1-4 hold their last class out of training.
EVENTS = [{"step": 4, "select": "lowest_accuracy", "tasks": ["boots", "kettles"],
           "scores": [-0.25, -0.3], "validation_accuracy": [0.25, 0.3], "adapters_before": 1,
           "adapters_after": 3, "parameters_before": 10_000, "parameters_after": 10_400,
           "task_specific_share_after": 0.04}]
CONFIG = {"total_steps": 6, "seed": 3, "dypa": {"at_steps": "4", "fraction": 0.5},
          "model": {"hidden_size": 32}}


def embedded_pngs(page: str) -> list[Image.Image]:
  """Every embedded image, decoded and checked by PIL."""
  images = []
  for data in PNG_URI.findall(page):
    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    image.verify()  # Raises on a truncated or corrupt PNG.
    images.append(image)
  return images


def write_run(workdir, seed=0):
  """reports/{validation,test}.* of made-up outputs, through the package's own functions."""
  table = TaskTable(names=NAMES, class_names=[[f"c{i}" for i in range(k)] for k in FULL],
                    image_dim=4, max_images=1)
  results = {}
  for i, split in enumerate(("validation", "test")):
    rng = np.random.default_rng(seed + i)
    task_id = rng.integers(0, len(NAMES) - 1, 300)  # The last task has no examples.
    label = rng.integers(0, FULL[task_id])
    logits = rng.normal(size=(300, 10)) + 2.0 * (np.arange(10)[None, :] == label[:, None])
    results[split] = evaluation.evaluate_outputs(
        table, {"logits": logits, "label": label, "task_id": task_id}, TRAINED,
        np.array([500, 40, 300, 120, 80, 5]), skipped={"plain": {"bad_label": 1}},
        train_skipped={"boots": {"missing_title": 3}})
    evaluation.write_report(workdir, split, 6, results[split])
  return results


def test_page_has_every_section_task_metric_and_image(tmp_path):
  results = write_run(tmp_path)
  path = evaluation.write_html_report(tmp_path, EVENTS, CONFIG)
  assert path == tmp_path / "reports" / "report.html"
  page = path.read_text()
  for section in SECTIONS + ("calibration",):
    assert f'<section id="{section}">' in page, section
  for name in NAMES[1:]:
    assert f">{name}<" in page, name
  # Histogram, accuracy vs size, DyPa and reliability plots, all valid PNGs.
  images = embedded_pngs(page)
  assert len(images) == 4
  assert all(image.format == "PNG" and image.size[0] > 300 for image in images)
  # Self-contained: nothing is fetched.
  assert not re.search(r'(src|href)="(https?:|//|file:)', page)
  assert "<link" not in page

  summary = results["test"].summary
  for key in ("mean_accuracy", "mean_chance", "mean_macro_auroc", "ece", "mean_ece",
              "mean_unseen_auroc", "mean_unseen_aupr", "pooled_unseen_auroc",
              "pooled_unseen_aupr"):
    assert f"{summary[key]:.3f}" in page, key
  assert "Skipped training records" in page and "Mean macro AUROC" in page
  assert "Unseen classes: AUROC / AUPR" in page
  table = page[page.index('<section id="tasks">'):page.index('<section id="dypa">')]
  for column in ("macro AUROC", "ECE", "unseen AUROC", "unseen AUPR", "skipped train"):
    assert f"<th>{column}</th>" in table, column
  boots = results["test"].rows[2]
  for key in ("macro_auroc", "ece", "unseen_auroc", "unseen_aupr"):
    assert f'data-v="{boots[key]}">{boots[key]:.3f}<' in table, key
  assert 'data-v="3">3<' in table  # Its skipped train records.
  dypa = page[page.index('<section id="dypa">'):page.index('<section id="calibration">')]
  assert ">boots<" in dypa and ">kettles<" in dypa and "1 &rarr; 3" in dypa
  config = page[page.index('<section id="config">'):]
  assert "dypa.at_steps" in config and "of 6 configured" in page


def test_page_without_events_config_or_calibration(tmp_path):
  write_run(tmp_path)
  (tmp_path / "reports" / evaluation.CALIBRATION_FILE).unlink()
  page = evaluation.write_html_report(tmp_path).read_text()
  assert "DyPa events unknown" in page
  assert '<section id="calibration">' not in page and '<section id="config">' not in page
  assert len(embedded_pngs(page)) == 2
  page = evaluation.write_html_report(tmp_path, dypa_events=[]).read_text()
  assert "No allocation in this run" in page


def test_page_opens_no_checkpoint(tmp_path, monkeypatch):
  write_run(tmp_path)
  for name in ("orbax", "orbax.checkpoint", "mtl_jax.workdir"):
    monkeypatch.setitem(sys.modules, name, None)  # Importing any of them now fails.
  monkeypatch.delattr(mtl_jax, "workdir", raising=False)
  page = evaluation.write_html_report(tmp_path, EVENTS, CONFIG).read_text()
  assert ">boots<" in page


def fake_workdir_module(monkeypatch, meta):
  module = types.ModuleType("mtl_jax.workdir")
  module.latest_meta = lambda workdir: meta
  monkeypatch.setitem(sys.modules, "mtl_jax.workdir", module)
  monkeypatch.setattr(mtl_jax, "workdir", module, raising=False)


def test_command_line_takes_events_and_config_from_the_latest_meta(tmp_path, monkeypatch,
                                                                    capsys):
  write_run(tmp_path)
  fake_workdir_module(monkeypatch, {"dypa_events": EVENTS, "config": json.dumps(CONFIG)})
  assert evaluation.read_dypa_events(tmp_path) == (EVENTS, CONFIG)
  report_page.main(["--workdir", str(tmp_path)])
  assert capsys.readouterr().out.strip().endswith("report.html")
  page = (tmp_path / "reports" / "report.html").read_text()
  dypa = page[page.index('<section id="dypa">'):page.index('<section id="calibration">')]
  assert ">boots<" in dypa and "dypa.at_steps" in page
  # Escaped task names; a task without examples listed with "-".
  assert "&lt;b&gt;shop &amp; co&lt;/b&gt;" in page and "<b>shop" not in page
  assert ">empty-shop<" in page

  fake_workdir_module(monkeypatch, None)  # No checkpoint.
  assert evaluation.read_dypa_events(tmp_path) == (None, None)
  report_page.main(["--workdir", str(tmp_path)])
  assert "DyPa events unknown" in (tmp_path / "reports" / "report.html").read_text()


def test_page_of_a_report_written_before_the_new_metrics(tmp_path):
  """Rows and summaries of older runs (no AUROC, ECE or trained classes) still render."""
  rows = [{"task": f"shop-{t}", "num_classes": 3 + t, "train_examples": 10 * t + 5,
           "eval_examples": 10, "accuracy": 0.5, "top5_accuracy": None, "loss": 1.0,
           "chance": 1 / (3 + t), "skipped_records": 0, "skipped_train_records": 0}
          for t in range(3)]
  summary = {"tasks_evaluated": 3, "tasks_total": 3, "mean_accuracy": 0.5,
             "weighted_accuracy": 0.5, "mean_top5_accuracy": None, "mean_chance": 0.26,
             "mean_loss": 1.0, "min_accuracy": 0.5, "median_accuracy": 0.5,
             "skipped_records": 0, "skipped_train_records": 0}
  (tmp_path / "reports").mkdir()
  (tmp_path / "reports" / "test.json").write_text(json.dumps(
      {"split": "test", "step": 3, "summary": summary, "tasks": rows}))
  page = evaluation.write_html_report(tmp_path).read_text()
  assert ">shop-2<" in page and "macro AUROC" not in page


def test_missing_reports_name_the_files_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"test\.json.*Train to the end first"):
    evaluation.write_html_report(tmp_path)


def test_notebook_names_are_reachable():
  for name in ("plot_accuracy_vs_size", "plot_accuracy_histogram", "plot_reliability",
               "plot_dypa_tasks", "write_html_report", "read_dypa_events"):
    assert getattr(evaluation, name) is getattr(evaluation.html, name)
  assert evaluation.write_calibration is evaluation.report.write_calibration
