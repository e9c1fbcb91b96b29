"""The 8-fake-device CPU mesh versus one device: the same losses, and what the mesh costs.

  python benchmarks/mesh_overhead.py [--configs demo,mtl100:cpu] [--steps 20]

Runs itself in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=8` (the flag
must be set before JAX starts; a collective that hangs fails after
`--xla_cpu_collective_call_terminate_timeout_seconds`). There, for each config (its model, task
count, batch size; random batches of its shapes), the same initial state and batches go through
the train step on three layouts:

  1 device          mesh data=1 x model=1 on the first CPU device
  data=8            data parallelism over all 8 devices
  data=4 x model=2  data parallelism x tensor parallelism (config's sharding rules)

The layouts take turns batch by batch and every step is awaited (one collective program in
flight: fake-device collectives on few cores deadlock otherwise). Reported: the largest absolute
loss difference from one device over all steps, the largest parameter difference after the last
step, and the median step time. The 8 "devices" share this machine's cores, so the mesh columns
measure partitioning and collective overhead, not a speed-up. Prints a table and writes
benchmarks/results/mesh_overhead.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from benchmarks.common import load_config, make_batches  # noqa: E402

LAYOUTS = (("1 device", 1, 1), ("data=8", 8, 1), ("data=4 x model=2", 4, 2))


def worker(names, steps):
  """In the 8-device process: every layout of every config; returns the rows."""
  import jax
  import numpy as np
  from mtl_jax import steps as steps_lib
  assert jax.device_count() == 8, jax.devices()
  rows = []
  for name in names:
    config = load_config(name)
    m, d = config.model, config.data
    spec = common.spec_from_config(config)
    rng = np.random.default_rng(0)
    num_classes = rng.integers(2, m.max_classes + 1, d.synthetic.num_tasks).astype(np.int32)
    batches = make_batches(steps + 2, spec, config.batch_size, num_classes)
    runs = []
    for layout, data, model in LAYOUTS:
      config.mesh.data, config.mesh.model = data, model
      devices = jax.devices()[:data * model]
      model = common.make_model(config, spec, num_classes, devices)
      state = model.create_state(jax.random.key(0))
      step = steps_lib.jitted_train_step(model, 1)
      runs.append({"layout": layout, "model": model, "state": state, "step": step,
                   "losses": [], "times": []})
    for i, batch in enumerate(batches):
      for run in runs:
        global_batch = run["model"].global_batch(batch)
        start = time.perf_counter()
        run["state"], metrics = run["step"](run["state"], global_batch)
        jax.block_until_ready(run["state"])  # One collective program in flight.
        if i >= 2:  # Compile and warm-up first.
          run["times"].append(time.perf_counter() - start)
        run["losses"].append(float(metrics["loss"]))
    reference = runs[0]
    reference_params = jax.tree.leaves(jax.device_get(reference["state"].params))
    for run in runs:
      params = jax.tree.leaves(jax.device_get(run["state"].params))
      kernel = run["state"].params["encoder"]["layers"]["mlp_in"]["kernel"]
      rows.append({
          "config": name, "layout": run["layout"], "batch_size": config.batch_size,
          "hidden": spec.hidden_size, "layers": spec.num_layers,
          "tasks": int(len(num_classes)),
          "mlp_in_sharding": str(kernel.sharding.spec),
          "step_ms": 1e3 * float(np.median(run["times"])),
          "step_ms_p90": 1e3 * float(np.percentile(run["times"], 90)),
          "losses": run["losses"],
          "max_abs_loss_diff": float(np.max(np.abs(np.subtract(run["losses"],
                                                               reference["losses"])))),
          "max_abs_param_diff": float(max(np.max(np.abs(a - b)) for a, b in
                                          zip(params, reference_params))),
      })
  for row in rows:
    base = [r for r in rows if r["config"] == row["config"]][0]
    row["overhead_vs_one_device"] = row["step_ms"] / base["step_ms"]
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="demo,mtl100:cpu")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "mesh_overhead.json"))
  parser.add_argument("--worker", default="", help="Internal: write the rows to this file.")
  args = parser.parse_args()
  names = args.configs.split(",")
  if args.worker:
    with open(args.worker, "w") as f:
      json.dump(worker(names, args.steps), f)
    return

  meta = common.run_metadata()
  rows_file = args.out + ".rows.tmp"
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=60")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--configs={args.configs}",
                         f"--steps={args.steps}", f"--worker={rows_file}"], env=env,
                        cwd=ROOT, timeout=3600)
  if proc.returncode:
    sys.exit(f"the 8-device worker exited with {proc.returncode}")
  with open(rows_file) as f:
    rows = json.load(f)
  os.remove(rows_file)
  print(f"{'config':<11} {'layout':<17} {'batch':>5} {'step ms':>8} {'x 1 device':>10} "
        f"{'max |loss diff|':>15} {'max |param diff|':>16}")
  for r in rows:
    print(f"{r['config']:<11} {r['layout']:<17} {r['batch_size']:>5} {r['step_ms']:>8.1f} "
          f"{r['overhead_vs_one_device']:>10.2f} {r['max_abs_loss_diff']:>15.2e} "
          f"{r['max_abs_param_diff']:>16.2e}")
  common.write_result(args.out, meta, args=vars(args),
                      device="8 fake CPU devices (--xla_force_host_platform_device_count=8)",
                      xla_flags=env["XLA_FLAGS"], rows=rows)


if __name__ == "__main__":
  main()
