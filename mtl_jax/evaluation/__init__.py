"""Evaluation: metrics, per-task reports, and the HTML page of a run.

- `metrics`: pure NumPy metrics (accuracy/top-k, AUROC, average precision, calibration,
  unseen-class detection), each implemented once, with grouped (per-task) forms.
- `report`: `evaluate_outputs` (model outputs of one split -> `SplitResult` of per-task rows,
  summary and reliability diagram), `write_report` (JSON, CSV, calibration.json) and
  `format_table` (the printed table).
- `html`: the self-contained report page (`write_html_report`) and the `plot_*` functions that
  notebooks reuse; `python -m mtl_jax.evaluation.html --workdir=...` writes the page.

`html` and its names load on first use (matplotlib is only needed to draw), so that
`python -m mtl_jax.evaluation.html` does not find itself already imported.
"""
import importlib

from mtl_jax.evaluation import metrics
from mtl_jax.evaluation import report
from mtl_jax.evaluation.report import CALIBRATION_FILE
from mtl_jax.evaluation.report import SplitResult
from mtl_jax.evaluation.report import evaluate_outputs
from mtl_jax.evaluation.report import flatten
from mtl_jax.evaluation.report import format_table
from mtl_jax.evaluation.report import skipped_count
from mtl_jax.evaluation.report import summarize
from mtl_jax.evaluation.report import write_calibration
from mtl_jax.evaluation.report import write_report

_HTML_NAMES = ("write_html_report", "read_dypa_events", "render_html", "read_run",
               "plot_accuracy_histogram", "plot_accuracy_vs_size", "plot_reliability",
               "plot_dypa_tasks", "dypa_task_accuracy", "REPORT_FILE")

__all__ = ["metrics", "report", "html", "CALIBRATION_FILE", "SplitResult", "evaluate_outputs",
           "flatten", "format_table", "skipped_count", "summarize", "write_calibration",
           "write_report", *_HTML_NAMES]


def __getattr__(name):
  if name == "html":
    return importlib.import_module("mtl_jax.evaluation.html")
  if name in _HTML_NAMES:
    return getattr(importlib.import_module("mtl_jax.evaluation.html"), name)
  raise AttributeError(f"module 'mtl_jax.evaluation' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
