"""experiments/probe_gap.py: the run's own accuracy and the probe it refits read the same numbers
as the run's reports and the built-in linear probe."""
import json

import pytest

from experiments import probe_gap
from mtl_jax import linear_probe
from tests.helpers import tiny_config
from tests.trained_run import tiny_run


@pytest.mark.slow  # Three probe fits on the tiny run: about a minute.
def test_probe_gap_agrees_with_the_reports_and_the_built_in_probe(tmp_path_factory):
  workdir = tiny_run(tmp_path_factory)
  report = json.loads((workdir / "reports" / "validation.json").read_text())
  result = probe_gap.measure(str(workdir), "validation", step=report["step"])

  rows = {r["task"]: r for r in result["rows"]}
  assert result["step"] == report["step"] and len(rows) == len(report["tasks"])
  for task in report["tasks"]:  # The run's column is its own report's accuracy.
    assert rows[task["task"]]["run"] == pytest.approx(task["accuracy"], abs=1e-6), task["task"]

  # The "probe" column is the built-in probe on the same catalogue (image embeddings only).
  probe_dir = tmp_path_factory.mktemp("probe_gap_probe")
  linear_probe.run_linear_probe(tiny_config(), probe_dir, text_features_kind="none")
  probe = json.loads((probe_dir / "reports" / "validation.json").read_text())
  for task in probe["tasks"]:
    assert rows[task["task"]]["probe"] == pytest.approx(task["accuracy"], abs=1e-6), task["task"]
  for row in rows.values():
    for name in probe_gap.FEATURE_SETS:
      assert 0.0 <= row[name] <= 1.0 and row[f"{name}_l2"] in linear_probe.DEFAULT_L2_GRID
