"""Pretrained (all-MiniLM-L6-v2) versus random initialisation of the text encoder, equal steps.

  python experiments/pretrained_init.py [--seeds 0,1,2] [--steps 200] [--eval_every 25]
  python experiments/pretrained_init.py --smoke   # a check that the script runs

Both variants build the same architecture, MiniLM's (hidden 384, 6 layers, 12 heads, MLP 1536),
and read the same tokens: the `minilm` variant sets `model.text_init="minilm"` (weights and
tokenizer from the checkpoint); the `random` variant keeps `text_init=""` and reads MiniLM's
tokenizer through `data.tokenizer_dir`, so only the initial weights differ. Everything else
(seed, data order, learning rate and schedule, heads, image side) is the same.

Data: an 8-task synthetic catalogue (generator seed 0, 200-800 products per task), whose text
is real English words. `train_and_evaluate` evaluates the validation split every
`--eval_every` steps; the curve of mean per-task validation accuracy gives the steps each run
needs to reach `--targets` (the first evaluation at or above the target). At the end: mean
per-task test accuracy.

The MiniLM-size model is slow on a CPU, so before training the script times the train step
(`steps.jitted_train_step` of a `state.Model` on real batches, after a warm-up) and prints the
expected total.

`--smoke` keeps the MiniLM architecture (the checkpoint fixes it) but shrinks the rest (a
4-task catalogue, one seed, 4 steps of batch 4 with 16 text tokens, one timed step) and writes
to `<workdir>/smoke.json` instead of the result file: it checks that the script runs, its
numbers mean nothing.

Prints a table and writes experiments/results/pretrained_init.json (command, date, hardware,
step time, every run's validation curve and test summary).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import demo  # noqa: E402
from experiments import common  # noqa: E402
from mtl_jax import input_pipeline, pretrained, sharding  # noqa: E402
from mtl_jax import steps as steps_lib  # noqa: E402
from mtl_jax import state as state_lib  # noqa: E402

CATALOGUE = {"num_tasks": 8, "seed": 0, "min_products": 200, "max_products": 800}
SMOKE_CATALOGUE = {"num_tasks": 4, "seed": 0, "min_products": 60, "max_products": 120}
MINILM_SIZES = {"model.hidden_size": 384, "model.num_layers": 6, "model.num_heads": 12,
                "model.mlp_size": 1536}
VARIANTS = ("minilm", "random")


def variant_config(args, variant: str, catalogue_dir: str):
  config = demo.get_config()
  common.set_fields(config, {
      **MINILM_SIZES, "data.catalogue_dir": catalogue_dir, "data.max_text_len": args.max_text_len,
      "batch_size": args.batch_size, "total_steps": args.steps, "eval_every": args.eval_every,
      "checkpoint_every": args.steps, "log_every": args.eval_every, "max_to_keep": 1,
      "optimizer.learning_rate": args.learning_rate,
      "optimizer.warmup_steps": args.warmup_steps})
  if variant == "minilm":
    config.model.text_init = pretrained.MINILM_ALIAS
  else:
    config.data.tokenizer_dir = pretrained.minilm_path()
  return config


def check_same_tokens(configs: dict, root: str) -> None:
  """Both variants must turn the same text into the same ids."""
  texts = ["Leather ankle boots", "Stainless steel kitchen knife set, 5 pieces"]
  ids = {}
  for variant, config in configs.items():
    _, tokenizer = common.prepare_data(config, common.fresh_workdir(root, f"tokens-{variant}"))
    ids[variant] = input_pipeline.make_batch(
        [{"title": t, "description": t, "num_images": 0, "images": np.zeros((3, 32)),
          "task": 0, "label": 0} for t in texts], tokenizer, config.data.max_text_len,
        3)["token_ids"]
  if not np.array_equal(ids["minilm"], ids["random"]):
    raise AssertionError(f"the variants tokenize differently: {ids}")


def time_train_step(config, root: str, warmup: int, steps: int) -> dict:
  """Median seconds of one train step at these sizes, on real batches after `warmup` steps."""
  workdir = common.fresh_workdir(root, "step-time")
  catalogue, tokenizer = common.prepare_data(config, workdir)
  spec = state_lib.model_spec(config, catalogue.task_table, len(tokenizer))
  model = state_lib.Model(config, spec, state_lib.trained_num_classes(
      catalogue.task_table.num_classes, config.eval.holdout_classes),
                          sharding.make_mesh(config.mesh))
  state = model.create_state(jax.random.key(config.seed))
  step = steps_lib.jitted_train_step(model, 1)
  batches = input_pipeline.TrainBatches(catalogue, tokenizer, config, 0)
  times = []
  try:
    start = time.perf_counter()
    for i in range(warmup + steps):
      batch = model.global_batch(next(batches))
      begin = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - begin)
      if i == 0:
        first = time.perf_counter() - start
  finally:
    batches.close()
  return {"first_step_seconds": first, "step_seconds_median": float(np.median(times)),
          "step_seconds_p90": float(np.percentile(times, 90)), "measured_steps": steps}


def steps_to(curve: list, target: float):
  """The first evaluated step whose validation accuracy reaches `target`; None if none does."""
  return next((step for step, accuracy in curve if accuracy >= target), None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2", help="config.seed values, comma-separated")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--eval_every", type=int, default=25)
  parser.add_argument("--targets", default="0.4,0.5,0.6",
                      help="validation accuracies; the first is the headline one")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--max_text_len", type=int, default=32)
  parser.add_argument("--learning_rate", type=float, default=2e-4)
  parser.add_argument("--warmup_steps", type=int, default=20)
  parser.add_argument("--time_steps", type=int, default=8, help="0: skip the step timing")
  parser.add_argument("--workdir", default=None, help="default: runs/experiments/pretrained_init "
                      "(runs/experiments/pretrained_init-smoke with --smoke)")
  parser.add_argument("--out", default=None, help="default: experiments/results/"
                      "pretrained_init.json (<workdir>/smoke.json with --smoke)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny catalogue, one seed, 4 steps of batch 4, one timed step: checks "
                      "that the script runs; writes <workdir>/smoke.json")
  args = parser.parse_args()
  if args.smoke:
    args.seeds, args.steps, args.eval_every = "0", 4, 2
    args.batch_size, args.max_text_len, args.warmup_steps, args.time_steps = 4, 16, 1, 1
  args.workdir = args.workdir or ("runs/experiments/pretrained_init-smoke" if args.smoke
                                  else "runs/experiments/pretrained_init")
  args.out = args.out or (os.path.join(args.workdir, "smoke.json") if args.smoke
                          else common.default_out("pretrained_init"))
  seeds = [int(s) for s in args.seeds.split(",")]
  targets = [float(t) for t in args.targets.split(",")]
  meta = common.run_metadata()
  started = time.perf_counter()
  root = os.path.abspath(args.workdir)
  catalogue_fields = SMOKE_CATALOGUE if args.smoke else CATALOGUE
  catalogue_dir = common.make_catalogue(root, catalogue_fields, demo.get_config())
  configs = {v: variant_config(args, v, catalogue_dir) for v in VARIANTS}
  # Same catalogue, same tokenizer: one prepared dataset for both variants.
  common.prepare_shared(configs["random"], root)
  check_same_tokens(configs, root)

  step_time = None
  if args.time_steps:
    step_time = time_train_step(configs["random"], root, warmup=2, steps=args.time_steps)
    evals = args.steps // args.eval_every + 1
    num_runs = len(seeds) * len(VARIANTS)
    minutes = num_runs * args.steps * step_time["step_seconds_median"] / 60
    print(f"Train step (batch {args.batch_size}, {args.max_text_len} text tokens): median "
          f"{step_time['step_seconds_median']:.2f} s (first, with compilation, "
          f"{step_time['first_step_seconds']:.0f} s); {num_runs} runs x {args.steps} steps ~ "
          f"{minutes:.0f} min of steps, plus {evals} validation evaluations per run", flush=True)

  runs = []
  for seed in seeds:
    for variant in VARIANTS:
      config = variant_config(args, variant, catalogue_dir)
      config.seed = seed
      workdir = common.fresh_workdir(root, f"{variant}-seed{seed}")
      result = common.train_run(config, workdir)
      curve = result["validation_curve"]
      run = {"variant": variant, "seed": seed, "workdir": workdir, "seconds": result["seconds"],
             "test_accuracy": result["test"]["mean_accuracy"], "test_summary": result["test"],
             "validation_curve": curve,
             "steps_to_target": {str(t): steps_to(curve, t) for t in targets}}
      runs.append(run)
      print(f"  seed {seed} {variant:<6}: test {run['test_accuracy']:.3f}, validation curve "
            + " ".join(f"{s}:{a:.2f}" for s, a in curve) + f" ({result['seconds']:.0f} s)",
            flush=True)

  summary = {}
  for variant in VARIANTS:
    mine = [r for r in runs if r["variant"] == variant]
    summary[variant] = {
        "test_accuracy": common.mean_std([r["test_accuracy"] for r in mine]),
        "final_validation_accuracy": common.mean_std([r["validation_curve"][-1][1]
                                                      for r in mine]),
        "steps_to_target": {
            str(t): {"per_seed": [r["steps_to_target"][str(t)] for r in mine],
                     "reached": sum(r["steps_to_target"][str(t)] is not None for r in mine),
                     **common.mean_std([r["steps_to_target"][str(t)] for r in mine])}
            for t in targets}}

  def steps_cell(stat):
    reached = stat["reached"]
    if reached == 0:
      return f"not reached (> {args.steps})"
    cell = f"{stat['mean']:.0f} ± {stat['std']:.0f}"
    return cell if reached == len(seeds) else f"{cell} ({reached}/{len(seeds)} seeds reached)"

  headers = ["init", "test accuracy", "final val accuracy",
             *(f"steps to val {t:g}" for t in targets)]
  rows = [[v, common.fmt(summary[v]["test_accuracy"]),
           common.fmt(summary[v]["final_validation_accuracy"]),
           *(steps_cell(summary[v]["steps_to_target"][str(t)]) for t in targets)]
          for v in VARIANTS]
  table = common.format_table(headers, rows)
  print(f"\nMean per-task accuracy after {args.steps} steps, mean ± std over seeds {seeds} "
        f"(validation evaluated every {args.eval_every} steps):")
  print(table)
  total_seconds = time.perf_counter() - started
  common.write_json(args.out, {
      **meta, "experiment": "pretrained_init", "args": vars(args), "catalogue": catalogue_fields,
      "base_config": "configs/demo.py", "model_sizes": MINILM_SIZES, "seeds": seeds,
      "step_time": step_time, "summary": summary, "table": table, "runs": runs,
      "total_seconds": total_seconds})
  print(f"\nTotal {total_seconds:.0f} s; wrote {args.out}")


if __name__ == "__main__":
  main()
