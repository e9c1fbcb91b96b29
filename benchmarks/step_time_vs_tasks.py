"""Step time and memory of the whole train step versus the number of tasks.

  python benchmarks/step_time_vs_tasks.py [--tasks 10,100,1000,3000] [--steps 30]

Fixed model and batch; only the number of tasks (and so of stacked head rows) changes. Runs the
"sparse" task update (only the heads of tasks in the batch are updated) beside the "dense" one
(every head every step, plain AdamW), in one process. Prints a table and writes
benchmarks/results/step_time_vs_tasks.json.
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import long_tailed_classes  # noqa: E402
from tests.helpers import random_batch, tiny_config, tiny_trainer  # noqa: E402


def measure(num_tasks, mode, steps, batch_size, hidden, max_classes):
  config = tiny_config(**{"optimizer.task_update": mode, "model.hidden_size": hidden,
                          "model.mlp_size": 4 * hidden, "model.num_layers": 2,
                          "model.num_heads": 4, "model.max_classes": max_classes,
                          "batch_size": batch_size, "data.max_text_len": 32})
  num_classes = long_tailed_classes(num_tasks, max_classes)
  trainer = tiny_trainer(config, num_classes)
  state = trainer.create_state(jax.random.key(0))
  step = trainer.jitted_train_step(1)
  batches = [trainer.global_batch(random_batch(i, batch_size, num_classes, text_len=32))
             for i in range(steps)]
  compiled = step.lower(state, batches[0]).compile()
  memory = compiled.memory_analysis()
  for b in batches[:3]:  # Warm-up.
    state, metrics = step(state, b)
  jax.block_until_ready(state)
  times = []
  for b in batches:
    start = time.perf_counter()
    state, metrics = step(state, b)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  head_params = int(np.prod(state.params["tasks"]["heads"]["kernel"].shape)
                    + np.prod(state.params["tasks"]["heads"]["bias"].shape))
  encoder_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params["encoder"]))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  return {"tasks": num_tasks, "mode": mode, "step_ms_median": 1e3 * float(np.median(times)),
          "step_ms_p90": 1e3 * float(np.percentile(times, 90)), "head_params": head_params,
          "encoder_params": encoder_params, "state_mb": state_bytes / 2**20,
          "temp_mb": (memory.temp_size_in_bytes / 2**20) if memory else None}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tasks", default="10,100,1000,3000")
  parser.add_argument("--modes", default="sparse,dense")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--max_classes", type=int, default=128)
  parser.add_argument("--out", default="benchmarks/results/step_time_vs_tasks.json")
  args = parser.parse_args()
  rows = [measure(int(t), mode, args.steps, args.batch_size, args.hidden, args.max_classes)
          for t in args.tasks.split(",") for mode in args.modes.split(",")]
  base = {r["mode"]: r["step_ms_median"] for r in rows if r["tasks"] == rows[0]["tasks"]}
  print(f"{'tasks':>6} {'mode':>7} {'step ms':>8} {'p90 ms':>7} {'x vs first':>10} "
        f"{'head params':>12} {'encoder params':>14} {'state MB':>9} {'temp MB':>8}")
  for r in rows:
    r["ratio_to_fewest_tasks"] = r["step_ms_median"] / base[r["mode"]]
    print(f"{r['tasks']:>6} {r['mode']:>7} {r['step_ms_median']:>8.2f} {r['step_ms_p90']:>7.2f} "
          f"{r['ratio_to_fewest_tasks']:>10.2f} {r['head_params']:>12,} "
          f"{r['encoder_params']:>14,} {r['state_mb']:>9.1f} {r['temp_mb'] or 0:>8.1f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"args": vars(args), "device": str(jax.devices()[0]), "backend": jax.default_backend(),
               "machine": platform.machine(), "cpus": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
