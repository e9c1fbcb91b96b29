"""The HTML report: calibration bins, and a page built from a real tiny run's files."""
import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from mtl_jax import evaluation, metrics, report_html, train
from mtl_jax.catalogue import TaskTable
from tests.helpers import tiny_config

PNG_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
SECTIONS = ("summary", "distribution", "top-bottom", "tasks", "dypa", "config")


def embedded_pngs(page: str) -> list[Image.Image]:
  """Every embedded image, decoded and checked by PIL."""
  images = []
  for data in PNG_URI.findall(page):
    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    image.verify()  # Raises on a truncated or corrupt PNG.
    images.append(image)
  return images


# --- calibration_bins ------------------------------------------------------------------------

def test_calibration_bins_by_hand():
  # Two bins, (0, 0.5] and (0.5, 1]; a confidence of exactly 0 goes to the first.
  calibration = report_html.calibration_bins([0.0, 0.4, 0.5, 0.9, 1.0], [0, 1, 1, 1, 0],
                                             num_bins=2)
  low, high = calibration["bins"]
  assert (low["lower"], low["upper"], high["lower"], high["upper"]) == (0.0, 0.5, 0.5, 1.0)
  assert low["count"] == 3 and high["count"] == 2
  assert low["confidence"] == pytest.approx(0.3) and low["accuracy"] == pytest.approx(2 / 3)
  assert high["confidence"] == pytest.approx(0.95) and high["accuracy"] == pytest.approx(0.5)
  expected_ece = 3 / 5 * abs(2 / 3 - 0.3) + 2 / 5 * abs(0.5 - 0.95)
  assert calibration["ece"] == pytest.approx(expected_ece)
  assert calibration["num_examples"] == 5 and calibration["num_bins"] == 2


def test_calibration_bins_agree_with_the_metric_and_mark_empty_bins():
  rng = np.random.default_rng(0)
  confidence = rng.beta(5, 2, 500)
  correct = rng.random(500) < confidence
  calibration = report_html.calibration_bins(confidence, correct, num_bins=15)
  bins = calibration["bins"]
  assert len(bins) == 15 and sum(b["count"] for b in bins) == 500
  assert calibration["ece"] == pytest.approx(
      metrics.expected_calibration_error(confidence, correct, 15))
  from_bins = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"]) for b in bins
                  if b["count"])
  assert calibration["ece"] == pytest.approx(from_bins)
  empty = [b for b in bins if not b["count"]]
  assert empty and all(b["confidence"] is None and b["accuracy"] is None for b in empty)
  json.dumps(calibration, allow_nan=False)  # The file format: plain JSON, no NaN.


def test_calibration_bins_reject_logits_and_mismatched_lengths():
  with pytest.raises(ValueError, match="logits"):
    report_html.calibration_bins([2.5, 0.1], [1, 0])
  with pytest.raises(ValueError, match="one of each"):
    report_html.calibration_bins([0.5, 0.1], [1])


# --- The page from a tiny real run ------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny demo run with one DyPa allocation, and a calibration file."""
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(**{"total_steps": 6, "eval_every": 4, "dypa.at_steps": "4",
                          "dypa.fraction": 0.5, "dypa.max_new_adapters": 2})
  train.train_and_evaluate(config, str(workdir))
  # Calibration bins of stand-in confidences: this test checks the page, not a model's numbers.
  rng = np.random.default_rng(1)
  confidence = rng.uniform(0.2, 1.0, 200)
  report_html.write_calibration(workdir, report_html.calibration_bins(
      confidence, rng.random(200) < confidence))
  return workdir


def test_report_of_a_real_run_has_every_section_task_and_image(run_dir):
  path = report_html.write_html_report(run_dir)
  assert path == run_dir / "reports" / "report.html"
  page = path.read_text()
  for section in SECTIONS + ("calibration",):
    assert f'<section id="{section}">' in page, section
  test_report = json.loads((run_dir / "reports" / "test.json").read_text())
  assert len(test_report["tasks"]) == 6
  for row in test_report["tasks"]:
    assert f">{row['task']}<" in page, row["task"]
  # Histogram, accuracy vs size, DyPa and reliability plots, all valid PNGs.
  images = embedded_pngs(page)
  assert len(images) == 4
  assert all(image.format == "PNG" and image.size[0] > 300 for image in images)
  # Self-contained: nothing is fetched.
  assert not re.search(r'(src|href)="(https?:|//|file:)', page)
  assert "<link" not in page

  events, config = report_html.read_dypa_events(run_dir)
  assert [e["step"] for e in events] == [4] and len(events[0]["tasks"]) == 2  # The cap.
  dypa = page[page.index('<section id="dypa">'):page.index('<section id="calibration">')]
  for task in events[0]["tasks"]:
    assert f">{task}<" in dypa
  assert config["dypa"]["at_steps"] == "4"
  summary = test_report["summary"]
  assert f"{summary['mean_accuracy']:.3f}" in page and f"{summary['mean_chance']:.3f}" in page


def test_report_without_checkpoints_or_calibration(run_dir, tmp_path):
  shutil.copytree(run_dir / "reports", tmp_path / "reports")
  (tmp_path / "reports" / report_html.CALIBRATION_FILE).unlink()
  page = report_html.write_html_report(tmp_path).read_text()
  assert "DyPa events unknown" in page
  assert '<section id="calibration">' not in page
  assert len(embedded_pngs(page)) == 2


def write_fabricated_report(workdir, names):
  """A test.json through evaluation.py's own functions, from made-up per-task sums."""
  table = TaskTable(names=names, class_names=[[f"c{i}" for i in range(3 + t)]
                                              for t in range(len(names))],
                    image_dim=4, max_images=1)
  count = np.array([10.0] * (len(names) - 1) + [0.0])  # The last task has no test examples.
  sums = {"count": count, "correct": count * 0.6, "correct_top5": count, "loss": count}
  rows = evaluation.task_rows(table, sums, np.arange(len(names)) * 50 + 5)
  evaluation.write_report(workdir, "test", 7, rows, evaluation.summarize(rows))


def test_task_names_are_escaped_and_tasks_without_examples_shown(tmp_path, capsys):
  write_fabricated_report(tmp_path, ["<b>shop & co</b>", "plain", "empty-shop"])
  report_html.main(["--workdir", str(tmp_path)])
  assert capsys.readouterr().out.strip().endswith("report.html")
  page = (tmp_path / "reports" / "report.html").read_text()
  assert "&lt;b&gt;shop &amp; co&lt;/b&gt;" in page and "<b>shop" not in page
  assert ">empty-shop<" in page  # Listed, with "-" for its accuracy.
  assert "No checkpoint in this workdir" in page


def test_missing_reports_name_the_files_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"test\.json.*Train to the end first"):
    report_html.write_html_report(tmp_path)
