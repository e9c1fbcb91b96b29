"""Host time of one DyPa expansion (`dypa.expand`) versus the number of tasks.

  python benchmarks/dypa_expand.py [--tasks 1000,10000] [--expansions 3] [--fraction 0.05]

A 2-layer x 256-hidden encoder and heads of up to 128 classes (the SPEC's head-cost shape), the
default adapter (1 block of width 32). Each expansion selects `fraction` of the tasks without an
adapter (by lowest validation accuracy, random here), grows the adapter array and its optimiser
state (`state.grow`), and places it with the config's shardings; it is timed to the moment the
grown arrays are ready. The first expansion at a given size includes compiling the growth
function; later ones grow a different adapter count, so they compile too (a small function of
the adapter arrays only: the heads and the encoder are passed through untouched). After the
expansions the train step runs once on the grown state, and the outputs of a fixed batch are
compared before and after the expansions (they must be identical). Prints a table and writes
benchmarks/results/dypa_expand.json.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import demo  # noqa: E402
from mtl_jax import dypa, sharding, state as state_lib, steps  # noqa: E402
from mtl_jax.model import ModelSpec  # noqa: E402


def measure(num_tasks: int, expansions: int, fraction: float, seed: int = 0) -> dict:
  config = demo.get_config()
  config.model.max_classes = 128
  config.dypa.fraction = fraction
  spec = ModelSpec(vocab_size=1024, max_positions=32, image_dim=32, max_images=2,
                   hidden_size=256, num_layers=2, num_heads=4, mlp_size=512, dropout=0.0)
  num_classes = common.long_tailed_classes(num_tasks, 128, seed)
  model = state_lib.Model(config, spec, num_classes, sharding.make_mesh(config.mesh))
  state = model.create_state(jax.random.key(seed))
  batch = common.make_batches(1, spec, 64, num_classes, seed)[0]
  probs = lambda s: np.asarray(steps.jitted_predict_step(model, state_lib.num_adapter_slots(s))(
      s.params, s.adapter_map, s.num_classes, model.global_batch(batch)))
  before = probs(state)
  rng = np.random.default_rng(seed)
  names = [f"t{t}" for t in range(num_tasks)]
  times = []
  for e in range(expansions):
    rows = [{"task": n, "accuracy": float(a), "loss": 1.0}
            for n, a in zip(names, rng.random(num_tasks))]
    start = time.perf_counter()
    state, event = dypa.expand(model, state, rows, step=e)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
    print(f"  {num_tasks} tasks, expansion {e + 1}: +{len(event['tasks'])} adapters in "
          f"{times[-1]:.3f} s", flush=True)
  identical = bool(np.array_equal(probs(state), before))
  train = steps.jitted_train_step(model, state_lib.num_adapter_slots(state))
  state, metrics = train(state, model.global_batch(batch))
  head_params = int(np.prod(state.params["tasks"]["heads"]["kernel"].shape))
  return {"tasks": num_tasks, "head_parameters": head_params, "seconds": times,
          "first_seconds": times[0], "later_median_seconds": float(np.median(times[1:]))
          if len(times) > 1 else None,
          "adapters_after": int(state_lib.num_adapter_slots(state) - 1),
          "outputs_identical": identical, "loss_after": float(metrics["loss"])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", default="1000,10000")
  parser.add_argument("--expansions", type=int, default=3)
  parser.add_argument("--fraction", type=float, default=0.05)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "dypa_expand.json"))
  args = parser.parse_args()
  metadata = common.run_metadata()
  results = [measure(int(t), args.expansions, args.fraction) for t in args.tasks.split(",")]
  print(f"{'tasks':>7} {'head params':>12} {'first s':>8} {'later s (median)':>17} "
        f"{'adapters':>9} {'outputs identical':>18}")
  for r in results:
    later = "-" if r["later_median_seconds"] is None else f"{r['later_median_seconds']:.3f}"
    print(f"{r['tasks']:>7} {r['head_parameters']:>12,} {r['first_seconds']:>8.3f} "
          f"{later:>17} {r['adapters_after']:>9} {str(r['outputs_identical']):>18}")
  common.write_result(args.out, metadata, args=vars(args), results=results)


if __name__ == "__main__":
  main()
