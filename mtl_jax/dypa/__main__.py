"""Prints the DyPa allocation of a trained run and its history, read from the checkpoint.

  python -m mtl_jax.dypa --workdir=runs/demo [--step=N|latest|best]
"""
import types

import jax
import numpy as np
from absl import flags

from mtl_jax import cli
from mtl_jax import workdir as workdir_lib
from mtl_jax.dypa import allocation_summary


def describe(workdir: str, step: int | str | None = None) -> str:
  """The allocation of a run's checkpoint (verified), and its DyPa history, as text."""
  run = workdir_lib.open_run(workdir, step)
  try:
    arrays = run.restore_inference()
  finally:
    run.close()
  names = run.task_table.names
  summary = allocation_summary(types.SimpleNamespace(**arrays), names)
  lines = [f"{run.workdir} at step {run.step}: {summary['adapter_slots']} adapters, "
           f"{summary['task_specific_parameters']:,} task-specific parameters "
           f"({100 * summary['task_specific_share']:.2f}% of {summary['total_parameters']:,}; "
           f"adapters {100 * summary['adapter_share']:.2f}%)"]
  adapter_map = np.asarray(jax.device_get(arrays["adapter_map"]))
  for t in np.flatnonzero(adapter_map):
    lines.append(f"  {names[t]}: adapter slot {int(adapter_map[t])}")
  for event in run.meta.get("dypa_events", []):
    lines.append(f"  step {event['step']}: +{len(event['tasks'])} adapters ({event['select']}): "
                 f"{', '.join(event['tasks'])}")
  return "\n".join(lines)


def main(argv=None):
  """Prints the allocation of a workdir's latest (or given) checkpoint."""
  flag_values = cli.flag_values()
  flags.DEFINE_string("workdir", None, "The run's directory.", flag_values=flag_values,
                      required=True)
  flags.DEFINE_string("step", None, workdir_lib.STEP_HELP, flag_values=flag_values)
  cli.parse(flag_values, argv, "python -m mtl_jax.dypa")
  print(describe(flag_values.workdir, flag_values.step))


if __name__ == "__main__":
  cli.run(main)
