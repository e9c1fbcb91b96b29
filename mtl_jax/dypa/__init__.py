"""DyPa: dynamic parameter allocation, a host-side step between train steps.

At configured points (`dypa.at_steps`, or after every k-th validation evaluation) it

1. scores every task on validation data (`lowest_accuracy`, the default; `highest_loss`;
   `baseline_gap`: single-task accuracy minus MTL accuracy; or an `explicit` task list;
   `random`, the control: no scores, a uniform draw seeded by `config.seed` and the step);
2. selects the neediest `fraction` of the tasks that have no adapter yet (a task never gets
   two), capped by `max_new_adapters`/`max_adapters` and by parameter budgets;
3. grows the stacked adapter array `[A, ...]` by one slot per selected task, with zero output
   projections so that every task's outputs are unchanged at that moment, points the selected
   tasks at their slots, and grows the adapters' optimiser state to match (fresh moments and
   step counts for new slots; existing ones untouched);
4. places the grown state with the same sharding rules (`state.grow`, the one growth function,
   which `new_task` uses too). The train step is compiled once per
   adapter count, so training recompiles once per expansion and never per step.

Each allocation is an event (step, tasks, their scores, adapter and parameter counts before and
after) written to the metric writer and kept in the checkpoint's metadata.

  python -m mtl_jax.dypa --workdir=runs/demo [--step=N]   # a run's allocation (__main__.py)
"""
import json

import jax
import numpy as np

from mtl_jax import state as state_lib
from mtl_jax import task_layers

SELECTORS = ("lowest_accuracy", "highest_loss", "baseline_gap", "explicit", "random")


def scheduled_steps(config) -> set[int]:
  return {int(s) for s in config.dypa.at_steps.split(",") if s.strip()}


def is_due(config, step: int, evaluations_done: int, evaluated_now: bool) -> bool:
  """Whether an allocation runs after `step` (after the evaluation, if one ran at this step)."""
  every = config.dypa.every_evals
  after_eval = evaluated_now and every > 0 and evaluations_done % every == 0
  return step in scheduled_steps(config) or after_eval


def _baseline(path: str) -> dict[str, float]:
  with open(path) as f:
    data = json.load(f)
  if isinstance(data, dict) and "tasks" in data:  # A report written by evaluation.write_report.
    return {r["task"]: r["accuracy"] for r in data["tasks"] if r["accuracy"] is not None}
  return {str(k): float(v) for k, v in data.items()}


def task_scores(config, rows: list[dict]) -> np.ndarray:
  """Need for capacity per task (higher: needier), from validation report rows."""
  kind = config.dypa.select
  nan = float("nan")
  if kind == "lowest_accuracy":
    return np.array([-r["accuracy"] if r["accuracy"] is not None else nan for r in rows])
  if kind == "highest_loss":
    return np.array([r["loss"] if r["loss"] is not None else nan for r in rows])
  if kind == "baseline_gap":
    baseline = _baseline(config.dypa.baseline)
    return np.array([baseline[r["task"]] - r["accuracy"]
                     if r["task"] in baseline and r["accuracy"] is not None else nan
                     for r in rows])
  if kind == "explicit":
    wanted = {t.strip() for t in config.dypa.tasks.split(",") if t.strip()}
    unknown = wanted - {r["task"] for r in rows}
    if unknown:
      raise ValueError(f"config.dypa.tasks names unknown tasks {sorted(unknown)}; use names "
                       "from the catalogue's tasks.json.")
    return np.array([1.0 if r["task"] in wanted else nan for r in rows])
  if kind == "random":  # No need signal: every evaluated task is a candidate, drawn uniformly.
    return np.array([0.0 if r["accuracy"] is not None else nan for r in rows])
  raise ValueError(f"config.dypa.select={kind!r}: use one of {SELECTORS}.")


def select_tasks(config, scores: np.ndarray, adapter_map: np.ndarray, num_slots: int,
                 params_per_slot: int, *, step: int = 0) -> np.ndarray:
  """Task indices to give an adapter now, neediest first, within every configured budget.

  With `dypa.select="random"` the same count is drawn uniformly from the candidates instead,
  from `np.random.default_rng([config.seed, step])`: the same tasks on every process.
  """
  d = config.dypa
  candidates = np.flatnonzero((adapter_map == 0) & np.isfinite(scores))
  if d.select == "explicit":
    count = len(candidates)
  else:
    count = int(np.ceil(d.fraction * np.count_nonzero(adapter_map == 0)))
  caps = [count, len(candidates)]
  if d.max_new_adapters:
    caps.append(d.max_new_adapters)
  if d.max_adapters:
    caps.append(d.max_adapters - (num_slots - 1))
  if d.max_new_params:
    caps.append(d.max_new_params // params_per_slot)
  if d.max_total_params:
    caps.append(d.max_total_params // params_per_slot - (num_slots - 1))
  count = max(min(caps), 0)
  if d.select == "random":
    order = np.random.default_rng([config.seed, step]).permutation(candidates)
  else:
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
  return np.sort(order[:count])


def allocation_summary(state, task_names) -> dict:
  """Which tasks have adapters, and task-specific parameters in total and as a share."""
  adapter_map = np.asarray(jax.device_get(state.adapter_map))
  tasks = state.params["tasks"]
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  num_slots = tasks["adapters"]["up"].shape[0]
  adapter_params = count(tasks["adapters"]) // num_slots * (num_slots - 1)  # Slot 0 is unused.
  task_specific = count(tasks["heads"]) + adapter_params
  total = count(state.params["encoder"]) + task_specific
  return {
      "tasks_with_adapters": [task_names[t] for t in np.flatnonzero(adapter_map)],
      "adapter_slots": int(num_slots - 1),
      "adapter_parameters": adapter_params,
      "task_specific_parameters": task_specific,
      "total_parameters": total,
      "task_specific_share": task_specific / total,
      "adapter_share": adapter_params / total,
  }


def expand(model, state, rows: list[dict], step: int):
  """Runs one allocation. Returns (new state, event dict); the state is unchanged (and the
  event says so) when no task is selected."""
  config = model.config
  adapters = state.params["tasks"]["adapters"]
  num_slots = adapters["up"].shape[0]
  m = config.model
  per_slot = task_layers.adapter_params_per_slot(adapters["up"].shape[-1], m.adapter_size,
                                                 m.adapter_layers)
  scores = task_scores(config, rows)
  adapter_map = np.asarray(jax.device_get(state.adapter_map))
  selected = select_tasks(config, scores, adapter_map, num_slots, per_slot, step=step)
  names = [r["task"] for r in rows]
  before = allocation_summary(state, names)
  if len(selected):
    state = state_lib.grow(model, state, (config.seed, 1, step), adapter_tasks=selected)
  after = allocation_summary(state, names)
  event = {
      "step": int(step),
      "select": config.dypa.select,
      "tasks": [names[t] for t in selected],
      "scores": [float(scores[t]) for t in selected],  # Need: higher is needier.
      "validation_accuracy": [rows[t]["accuracy"] for t in selected],
      "adapters_before": before["adapter_slots"],
      "adapters_after": after["adapter_slots"],
      "parameters_before": before["total_parameters"],
      "parameters_after": after["total_parameters"],
      "task_specific_share_after": after["task_specific_share"],
  }
  return state, event
