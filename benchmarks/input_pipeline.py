"""Is the input pipeline the bottleneck? `TrainBatches` alone versus the train step it feeds.

  python benchmarks/input_pipeline.py [--configs demo,mtl100:cpu] [--batches 100] [--steps 20]

The data is the generated 100-task catalogue of `configs/mtl100.py:cpu` (generated, prepared
and tokenized into `--workdir` on the first run, then reused). For each config, with that
config's batch size, text length and model on this catalogue (so the model has the catalogue's
100 tasks, image size and vocabulary):

  pipeline:      `TrainBatches.batch_at(step)` alone on one host thread (sampling, reading,
                 tokenizing, batching): the examples/s one host can produce, no model.
  step:          the jitted train step on batches prepared beforehand: what the model can eat.
  step + input:  the train step fed by `TrainBatches` as `train_and_evaluate` feeds it (its
                 prefetch thread), both sharing this machine's cores.

Times are medians over batches/steps, each step awaited; the last two kinds of step take turns.
Prints a table and writes benchmarks/results/input_pipeline.json.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import load_config  # noqa: E402
from mtl_jax import input_pipeline, prepare, steps  # noqa: E402
from mtl_jax import state as state_lib  # noqa: E402


def measure(name, catalogue, tokenizer, args):
  config = load_config(name)
  # Heads wide enough for this catalogue's widest task (the demo's own data is narrower).
  config.model.max_classes = max(config.model.max_classes,
                                 int(catalogue.task_table.num_classes.max()))
  batches = input_pipeline.TrainBatches(catalogue, tokenizer, config, 0)
  pipeline_s = []
  prepared = []
  for step in range(args.batches + 2):
    start = time.perf_counter()
    prepared.append(batches.batch_at(step))
    if step >= 2:  # The first reads open files and warm caches.
      pipeline_s.append(time.perf_counter() - start)

  table = catalogue.task_table
  spec = state_lib.model_spec(config, table, len(tokenizer))
  model = common.make_model(config, spec, state_lib.trained_num_classes(table.num_classes, 0))
  state = model.create_state(jax.random.key(0))
  step_fn = steps.jitted_train_step(model, 1)
  device_batches = [model.global_batch(b) for b in prepared]
  for b in device_batches[:2]:  # Compile and warm up.
    state, _ = step_fn(state, b)
  jax.block_until_ready(state)

  # Steps on prepared batches take turns with steps fed as the training loop feeds them (the
  # iterator's prefetch thread running beside), so a shared machine's load falls on both.
  fed = input_pipeline.TrainBatches(catalogue, tokenizer, config, len(prepared))
  state, _ = step_fn(state, model.global_batch(next(fed)))  # Starts the thread.
  jax.block_until_ready(state)
  step_s, fed_s = [], []
  try:
    for i in range(args.steps):
      start = time.perf_counter()
      state, _ = step_fn(state, device_batches[i % len(device_batches)])
      jax.block_until_ready(state)
      step_s.append(time.perf_counter() - start)
      start = time.perf_counter()
      state, _ = step_fn(state, model.global_batch(next(fed)))
      jax.block_until_ready(state)
      fed_s.append(time.perf_counter() - start)
  finally:
    fed.close()

  b = config.batch_size
  row = {"config": name, "batch_size": b, "text_len": config.data.max_text_len,
         "hidden": spec.hidden_size, "layers": spec.num_layers,
         "pipeline_ms": 1e3 * float(np.median(pipeline_s)),
         "step_ms": 1e3 * float(np.median(step_s)),
         "fed_step_ms": 1e3 * float(np.median(fed_s))}
  row["pipeline_examples_per_s"] = b / float(np.median(pipeline_s))
  row["step_examples_per_s"] = b / float(np.median(step_s))
  row["fed_examples_per_s"] = b / float(np.median(fed_s))
  row["pipeline_over_step"] = row["pipeline_examples_per_s"] / row["step_examples_per_s"]
  print(f"[{row}]", flush=True)
  return row


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="demo,mtl100:cpu")
  parser.add_argument("--catalogue_config", default="mtl100:cpu",
                      help="The config whose synthetic catalogue is the data.")
  parser.add_argument("--workdir", default="/tmp/mtl_jax_bench/mtl100cpu",
                      help="Catalogue, prepared data and tokenizer; reused when present.")
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "input_pipeline.json"))
  args = parser.parse_args()
  meta = common.run_metadata()
  start = time.perf_counter()
  workdir = epath.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  catalogue, tokenizer = prepare.prepare_data(load_config(args.catalogue_config), workdir)
  prepare_s = time.perf_counter() - start
  rows = [measure(name, catalogue, tokenizer, args) for name in args.configs.split(",")]
  print(f"catalogue: {catalogue.task_table.num_tasks} tasks, "
        f"{len(catalogue.sources['train']):,} train records, vocabulary {len(tokenizer)} "
        f"(ready in {prepare_s:.0f} s)")
  print(f"{'config':<11} {'batch':>5} {'hidden x layers':>15} {'pipeline ex/s':>13} "
        f"{'step ex/s':>9} {'pipeline/step':>13} {'step+input ex/s':>15}")
  for r in rows:
    print(f"{r['config']:<11} {r['batch_size']:>5} "
          f"{str(r['hidden']) + ' x ' + str(r['layers']):>15} "
          f"{r['pipeline_examples_per_s']:>13.0f} {r['step_examples_per_s']:>9.0f} "
          f"{r['pipeline_over_step']:>13.2f} {r['fed_examples_per_s']:>15.0f}")
  common.write_result(args.out, meta, args=vars(args), device=str(jax.devices()[0]),
                      catalogue={"tasks": int(catalogue.task_table.num_tasks),
                                 "train_records": len(catalogue.sources["train"]),
                                 "vocabulary": len(tokenizer), "prepare_s": prepare_s},
                      rows=rows)


if __name__ == "__main__":
  main()
