"""Data preparation at scale: generate, validate, prepare (TFDS), tokenizer, input pipeline.

  python benchmarks/data_prep.py [--tasks 1000,10000] [--config mtl10k:cpu] [--label after]
                                 [--step]

For each task count, the synthetic catalogue of `--config` (default `configs/mtl10k.py:cpu`:
products per site log-uniform in [20, 2000], 3-48 classes, 3 x 32-wide images at most) with
that many sites goes through every data stage from scratch, in `--workdir/<label>-<tasks>/`:

  generate:   `synthetic.generate_catalogue` (the JSONL catalogue and its embeddings).
  validate:   `catalogue.index_catalogue` alone (every record checked and indexed by task).
  prepare:    `tfds_builder.load_catalogue` from nothing (validation again, then the TFDS
              ArrayRecord build of all three splits).
  tokenizer:  `tokenizer.build_tokenizer` over the train split (read, count, WordPiece).
  pipeline:   `input_pipeline.TrainBatches.batch_at` on one thread (sample, read, tokenize,
              batch) and `eval_batches` over the validation split: batches/s of the config's
              batch sizes.
  step:       (with --step) the config's jitted train step on batches made beforehand, the
              consumption the pipeline must exceed (a failure is recorded, not raised).

Records/s count the records of all three splits (generate, validate, prepare) or the texts
read (tokenizer). Prints a table and merges the rows into benchmarks/results/data_prep.json
under `--label`, so that runs of two versions of the code ("before", "after") sit side by side.
Run the "before" numbers from a checkout of the old code with PYTHONPATH pointing at it.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.environ.get("MTL_JAX_SRC"):  # Another checkout's mtl_jax (the "before" code).
  sys.path.insert(0, os.environ["MTL_JAX_SRC"])

import numpy as np  # noqa: E402

from benchmarks.common import load_config  # noqa: E402
from mtl_jax import catalogue as cat  # noqa: E402
from mtl_jax import input_pipeline, synthetic, tfds_builder  # noqa: E402
from mtl_jax import tokenizer as tokenizer_lib  # noqa: E402


def _cpu_s():
  """CPU seconds of this process and of its finished children (worker processes)."""
  return sum(getattr(resource.getrusage(who), f)
             for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
             for f in ("ru_utime", "ru_stime"))


CPU = {}  # stage -> CPU seconds of the latest _timed call, per stage name.


def _timed(fn, stage=None):
  start, cpu = time.perf_counter(), _cpu_s()
  out = fn()
  if stage:
    CPU[stage] = _cpu_s() - cpu
  return out, time.perf_counter() - start


def _du(path):
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def _step_fn(config, table, vocab_size):
  """(jitted train step, initial state, batch -> device batch) for the config's model."""
  import jax
  try:  # The current API (mtl_jax.state / mtl_jax.steps).
    from mtl_jax import sharding, steps
    from mtl_jax import state as state_lib
    spec = state_lib.model_spec(config, table, vocab_size)
    model = state_lib.Model(config, spec, state_lib.trained_num_classes(table.num_classes, 0),
                            sharding.make_mesh(config.mesh, jax.devices()[:1]))
    return (steps.jitted_train_step(model, 1), model.create_state(jax.random.key(0)),
            model.global_batch)
  except ImportError:  # The API before the train loop's refactoring (mtl_jax.train.Trainer).
    from mtl_jax import sharding, train
    spec = train.model_spec(config, table, vocab_size)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    trainer = train.Trainer(config, spec, train.trained_num_classes(table.num_classes, 0), mesh)
    return (trainer.jitted_train_step(1), trainer.create_state(jax.random.key(0)),
            trainer.global_batch)


def _step_ms(config, catalogue, tokenizer, batches):
  """Median ms of the config's train step on prepared batches, or the error it raised."""
  try:
    import jax
    step_fn, state, to_device = _step_fn(config, catalogue.task_table, len(tokenizer))
    device_batches = [to_device(b) for b in batches]
    for b in device_batches[:2]:
      state, _ = step_fn(state, b)
    jax.block_until_ready(state)
    times = []
    for b in device_batches[2:]:
      start = time.perf_counter()
      state, _ = step_fn(state, b)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), None
  except Exception as e:  # noqa: BLE001  (the train loop is not this benchmark's subject)
    return None, f"{type(e).__name__}: {e}"[:300]


def run(num_tasks, args):
  config = load_config(args.config)
  config.data.synthetic.num_tasks = num_tasks
  root = os.path.join(args.workdir, f"{args.label}-{num_tasks}")
  catalogue_dir, data_dir, tok_dir = (os.path.join(root, d)
                                      for d in ("catalogue", "prepared", "tokenizer"))
  if not args.reuse:
    shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root, exist_ok=True)
  row = {"tasks": num_tasks, "load_average_before": os.getloadavg()[0]}

  stats, row["generate_s"] = _timed(
      lambda: synthetic.generate_catalogue(catalogue_dir, config.data.synthetic), "generate")
  records = sum(stats["products"].values())
  row.update(records=records, train_records=stats["products"]["train"], images=stats["images"],
             catalogue_bytes=_du(catalogue_dir))
  print(f"[{num_tasks}] generate {row['generate_s']:.1f} s", flush=True)

  if not args.skip_validate:
    _, row["validate_s"] = _timed(
        lambda: cat.index_catalogue(catalogue_dir, config.data.on_bad_record), "validate")
    print(f"[{num_tasks}] validate {row['validate_s']:.1f} s", flush=True)

  catalogue, row["prepare_s"] = _timed(lambda: tfds_builder.load_catalogue(
      catalogue_dir, data_dir, on_bad_record=config.data.on_bad_record), "prepare")
  row["prepared_bytes"] = _du(data_dir)
  print(f"[{num_tasks}] prepare {row['prepare_s']:.1f} s", flush=True)

  tokenizer, row["tokenizer_s"] = _timed(lambda: tokenizer_lib.build_tokenizer(
      catalogue, tok_dir, config.data.vocab_size), "tokenizer")
  row["tokenizer_texts"] = min(row["train_records"], tokenizer_lib.MAX_TRAINING_TEXTS)
  row["vocabulary"] = len(tokenizer)
  print(f"[{num_tasks}] tokenizer {row['tokenizer_s']:.1f} s", flush=True)

  for stage in ("generate", "validate", "prepare"):
    if f"{stage}_s" in row:
      row[f"{stage}_records_per_s"] = records / row[f"{stage}_s"]
  row.update({f"{stage}_cpu_s": cpu for stage, cpu in CPU.items()})
  row["tokenizer_texts_per_s"] = row["tokenizer_texts"] / row["tokenizer_s"]

  batches = input_pipeline.TrainBatches(catalogue, tokenizer, config, 0)
  made, times = [], []
  for step in range(args.batches + 2):
    start = time.perf_counter()
    made.append(batches.batch_at(step))
    if step >= 2:  # The first reads open files and warm caches.
      times.append(time.perf_counter() - start)
  row["train_batch_size"] = config.batch_size
  row["train_batch_ms"] = 1e3 * float(np.median(times))
  row["train_batches_per_s"] = 1e3 / row["train_batch_ms"]
  row["train_examples_per_s"] = row["train_batches_per_s"] * config.batch_size
  evals = input_pipeline.eval_batches(catalogue, "validation", tokenizer, config)
  next(evals)
  count, start = 0, time.perf_counter()
  for _ in range(args.eval_batches):
    if next(evals, None) is None:
      break
    count += 1
  row["eval_batch_size"] = config.eval_batch_size
  row["eval_examples_per_s"] = count * config.eval_batch_size / (time.perf_counter() - start)
  print(f"[{num_tasks}] pipeline {row['train_batches_per_s']:.1f} train batches/s, "
        f"{row['eval_examples_per_s']:.0f} eval examples/s", flush=True)

  if args.step:
    row["step_ms"], row["step_error"] = _step_ms(config, catalogue, tokenizer,
                                                 made[:args.steps + 2])
    if row["step_ms"]:
      row["pipeline_over_step"] = row["step_ms"] / row["train_batch_ms"]
    print(f"[{num_tasks}] step {row['step_ms']} ms {row['step_error'] or ''}", flush=True)
  row["load_average_after"] = os.getloadavg()[0]
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)
  return row


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tasks", default="1000,10000")
  parser.add_argument("--config", default="mtl10k:cpu",
                      help="The config whose synthetic catalogue, batch sizes and model are used.")
  parser.add_argument("--label", default="after")
  parser.add_argument("--workdir", default="/tmp/mtl_jax_bench/data_prep")
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--eval_batches", type=int, default=5)
  parser.add_argument("--step", action="store_true", help="Also time the config's train step.")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--skip_validate", action="store_true")
  parser.add_argument("--reuse", action="store_true", help="Keep an existing workdir (timings "
                      "then measure reuse, not preparation).")
  parser.add_argument("--keep", action="store_true", help="Keep the generated data.")
  parser.add_argument("--out", default="benchmarks/results/data_prep.json")
  args = parser.parse_args()

  rows = [run(int(t), args) for t in args.tasks.split(",")]
  results = {"runs": {}}
  if os.path.exists(args.out):
    with open(args.out) as f:
      results = json.load(f)
  run_info = {"args": vars(args), "machine": platform.machine(), "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": {}}
  run_info["rows"] = {**results["runs"].get(args.label, {}).get("rows", {}),
                      **{str(r["tasks"]): r for r in rows}}
  results["runs"][args.label] = run_info
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)

  print_table(results)


def print_table(results):
  print(f"\n{'label':<8} {'tasks':>6} {'records':>9} | {'generate':>15} | {'validate':>15} | "
        f"{'prepare':>15} | {'tokenizer':>14} | {'train b/s':>9} {'eval ex/s':>9}")
  for label, info in results["runs"].items():
    for r in info["rows"].values():
      cells = []
      for stage in ("generate", "validate", "prepare"):
        s = r.get(f"{stage}_s")
        cells.append(f"{s:6.1f} s {r['records'] / s / 1e3:5.1f}k/s" if s else f"{'-':>15}")
      s = r.get("tokenizer_s")
      cells.append(f"{s:5.1f} s {r['tokenizer_texts'] / s / 1e3:5.1f}k/s" if s else f"{'-':>14}")
      train, ev = r.get("train_batches_per_s"), r.get("eval_examples_per_s")
      print(f"{label:<8} {r['tasks']:>6} {r['records']:>9} | " + " | ".join(cells) +
            (f" | {train:>9.1f} {ev:>9.0f}" if train else f" | {'-':>9} {'-':>9}")
            + (f"  step {r['step_ms']:.0f} ms ({r['pipeline_over_step']:.1f}x)"
               if r.get("step_ms") else "") + (f"  [{r['note']}]" if r.get("note") else ""))


if __name__ == "__main__":
  main()
