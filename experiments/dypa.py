"""DyPa on a catalogue: MTL with and without dynamic parameter allocation, and its controls.

  python experiments/dypa.py [--seeds 0,1,2] [--steps 800] [--fraction 0.25] [--expand_tasks 0]
  python experiments/dypa.py --dataset gs1 --expand_tasks 0   # real product texts
  python experiments/dypa.py --smoke   # a check that the script runs (~minutes on a CPU)

`--dataset synthetic` (the default) trains `configs/demo.py` on a synthetic catalogue (below),
800 steps; `--dataset gs1` trains `configs/embeddings.py` on the real-embeddings benchmark of
`experiments/real_embeddings.py` (19 GS1 segments, MiniLM embeddings of real product texts),
1500 steps. For each seed (`config.seed`; the catalogue stays fixed) four runs with the same
steps, data order and initialisation:

- `mtl`: plain MTL;
- `mtl+dypa`: one DyPa allocation at half of training (`dypa.at_steps`, selector
  `lowest_accuracy` on validation) of adapters of width `--adapter_size` to `--fraction` of the
  tasks;
- `mtl+dypa(random)`, the control: the same allocation (same step, count and adapter width) to
  tasks drawn at random (`dypa.select="random"`, seeded by `config.seed` and the step);
- `mtl+widen`: the same added budget spread over every task: at the same step every task gets
  an adapter (`dypa.fraction=1.0`) of width `--adapter_size x --fraction` (rounded), so the
  adapter weights match `mtl+dypa`'s (only the up-projection biases, one per task and hidden
  unit, differ; the table gives the exact counts).

Every run's reports read its last step (`eval_on_best=False`): a best checkpoint from before
the allocation would be the same in every variant. Up to the allocation all runs are the same
computation, so the comparison is paired (the script checks that the validation accuracy
before the allocation is the same in all four). The tasks
the `lowest_accuracy` run selected are read from its checkpoint meta (`dypa_events`, through
`workdir.open_run`); every run is scored on those tasks, on the others and on all, from its test
report, and paired against `mtl`. The task-specific and adapter parameters of each final
checkpoint come from `dypa.allocation_summary`.

The synthetic catalogue (16 tasks, generator seed 1) has several "fine" sites whose classes are
sibling leaves, the hard tasks DyPa should find. Then the script times one host-side
`dypa.expand` at 1000 tasks with hidden 768 (`--expand_tasks 0` skips it): a cold call (trace
and compile of the growth function for these shapes) and warm calls on the same input, with the
XLA compile time inside each call read from `jax.monitoring`.

`--smoke` shrinks everything (4-task catalogue, a 1-layer 32-wide model, 6 steps, one seed, the
timing at 16 tasks) and writes to `<workdir>/smoke.json` instead of the result file: it checks
that the script runs, its numbers mean nothing.

Prints a table and writes experiments/results/dypa.json (dypa_gs1.json for `--dataset gs1`):
command, date, hardware, every run.
"""
import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import demo, embeddings  # noqa: E402
from experiments import common, real_embeddings  # noqa: E402
from mtl_jax import dypa  # noqa: E402

# Synthetic catalogue: 16 sites, six of them "fine" (sibling-leaf classes), 300-2000 products.
CATALOGUE = {"num_tasks": 16, "seed": 1, "min_products": 300, "max_products": 2000}
SMOKE_CATALOGUE = {"num_tasks": 4, "seed": 1, "min_products": 60, "max_products": 120}
SMOKE_MODEL = {"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
               "model.mlp_size": 64, "data.max_text_len": 24, "eval_batch_size": 64}
# Each dataset's config and default steps.
DATASETS = {"synthetic": (demo, 800), "gs1": (embeddings, 1500)}
# The variants, in table order; `gain (paired)` is `mtl+dypa` - `mtl`, as before the controls.
VARIANTS = ("mtl", "mtl+dypa", "mtl+dypa(random)", "mtl+widen")
# Paired differences per seed (a - b), in table order, with their row labels.
PAIRS = {"gain (paired)": ("mtl+dypa", "mtl"),
         "random - mtl (paired)": ("mtl+dypa(random)", "mtl"),
         "widen - mtl (paired)": ("mtl+widen", "mtl"),
         "dypa - random (paired)": ("mtl+dypa", "mtl+dypa(random)"),
         "dypa - widen (paired)": ("mtl+dypa", "mtl+widen")}
PARTS = ("selected", "unselected", "all")
# jax.monitoring events that make up a compilation.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def base_config(args):
  config = DATASETS[args.dataset][0].get_config()
  common.set_fields(config, {
      "total_steps": args.steps, "eval_every": args.dypa_at, "checkpoint_every": args.steps,
      "eval_on_best": False,
      "log_every": 100, "dypa.fraction": args.fraction, "dypa.select": "lowest_accuracy",
      "model.adapter_size": args.adapter_size, "model.adapter_layers": args.adapter_layers})
  if args.smoke:
    common.set_fields(config, SMOKE_MODEL)
  return config


def widen_size(args) -> int:
  """The `mtl+widen` adapter width: the DyPa adapter width x the DyPa fraction (at least 1)."""
  return max(1, round(args.adapter_size * args.fraction))


def variant_fields(args, variant: str) -> dict:
  """The config overrides that make `variant` out of `base_config`."""
  allocate = {"dypa.at_steps": str(args.dypa_at)}
  return {"mtl": {},
          "mtl+dypa": allocate,
          "mtl+dypa(random)": allocate | {"dypa.select": "random"},
          "mtl+widen": allocate | {"dypa.fraction": 1.0,
                                   "model.adapter_size": widen_size(args)}}[variant]


def git_state() -> dict:
  """The commit the script runs from and the files changed since (None outside a checkout)."""
  def git(*argv):
    return subprocess.run(["git", *argv], cwd=common.REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
  try:
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "changed_files": git("status", "--porcelain", "--untracked-files=no").splitlines()}
  except (OSError, subprocess.CalledProcessError):
    return {"commit": None, "changed_files": None}


def task_means(rows: list[dict], selected: set[str]) -> dict:
  """Mean test accuracy over the selected tasks, the unselected ones and all tasks."""
  accuracy = {r["task"]: r["accuracy"] for r in rows if r["accuracy"] is not None}
  mean = lambda names: float(np.mean([accuracy[n] for n in names])) if names else float("nan")
  return {"selected": mean([n for n in accuracy if n in selected]),
          "unselected": mean([n for n in accuracy if n not in selected]),
          "all": mean(list(accuracy))}


def one_seed(args, root, seed):
  runs = {}
  for variant in VARIANTS:
    config = base_config(args)
    config.seed = seed
    config.data.catalogue_dir = os.path.join(root, "catalogue")
    common.set_fields(config, variant_fields(args, variant))
    name = re.sub(r"\W+", "_", variant).strip("_")  # mtl, mtl_dypa, mtl_dypa_random, mtl_widen
    workdir = common.fresh_workdir(root, f"{name}-seed{seed}")
    result = common.train_run(config, workdir)
    run, arrays = common.read_run(workdir)  # The final checkpoint, verified.
    allocation = dypa.allocation_summary(arrays, list(run.task_table.names))
    runs[variant] = {"workdir": workdir, "seconds": result["seconds"],
                     "overrides": variant_fields(args, variant),
                     "validation_curve": result["validation_curve"],
                     "test_summary": result["test"], "rows": common.report_rows(workdir),
                     "dypa_events": run.meta.get("dypa_events", []), "allocation": allocation}
    print(f"  seed {seed} {variant:<16} mean test accuracy "
          f"{result['test']['mean_accuracy']:.3f}, {allocation['adapter_slots']} adapters, "
          f"{allocation['adapter_parameters']:,} adapter params ({result['seconds']:.0f} s)",
          flush=True)
  for variant in VARIANTS[1:]:
    events = runs[variant]["dypa_events"]
    if len(events) != 1:
      raise RuntimeError(f"expected one DyPa event in {runs[variant]['workdir']}, got {events}")
  # Pairing check: before the allocation every variant is the same computation.
  before = {v: [a for step, a in r["validation_curve"] if step <= args.dypa_at][-1:]
            for v, r in runs.items()}
  same_before = len({tuple(a) for a in before.values()}) == 1
  if not same_before:
    print(f"  WARNING seed {seed}: validation accuracy at step {args.dypa_at} differs between "
          f"variants {before}: the runs are not paired", flush=True)
  event = runs["mtl+dypa"]["dypa_events"][0]
  selected = set(event["tasks"])
  for run in runs.values():
    run["means"] = task_means(run["rows"], selected)
  random_selected = set(runs["mtl+dypa(random)"]["dypa_events"][0]["tasks"])
  # The random control on the tasks it drew itself, for the question "does any adapter help".
  random_own = {v: task_means(runs[v]["rows"], random_selected)["selected"]
                for v in ("mtl", "mtl+dypa(random)")}
  return {"seed": seed, "selected": sorted(selected),
          "selected_scores": dict(zip(event["tasks"], event["scores"])),
          "random_selected": sorted(random_selected),
          "random_own_selected": random_own,
          "validation_before_allocation": before, "paired_before_allocation": same_before,
          "runs": runs}


def time_expand(num_tasks, hidden, max_classes, fraction, repeats):
  """Seconds of `dypa.expand` at `num_tasks` tasks: a cold call, then warm calls."""
  from tests.helpers import tiny_config, tiny_model  # The tests' tiny model, grown wide.
  config = tiny_config(**{
      "model.hidden_size": hidden, "model.num_heads": 12 if hidden % 12 == 0 else 2,
      "model.mlp_size": hidden,
      "model.num_layers": 1, "model.max_classes": max_classes, "dypa.fraction": fraction})
  rng = np.random.default_rng(0)
  # Long-tailed class counts, the widest task at max_classes.
  num_classes = np.clip(rng.zipf(1.6, num_tasks) + 1, 2, max_classes).astype(np.int32)
  num_classes[0] = max_classes
  model = tiny_model(config, num_classes)
  state = model.create_state(jax.random.key(0))
  jax.block_until_ready(state)
  rows = [{"task": f"task{t:04d}", "accuracy": float(a), "loss": float(1 - a)}
          for t, a in enumerate(rng.uniform(0.2, 0.95, num_tasks))]
  compile_seconds = []
  listener = lambda event, seconds, **_: (
      compile_seconds.append(seconds) if event in COMPILE_EVENTS else None)
  jax.monitoring.register_event_duration_secs_listener(listener)
  calls = []
  try:
    for _ in range(repeats):
      compile_seconds.clear()
      start = time.perf_counter()
      grown, event = dypa.expand(model, state, rows, step=1000)
      jax.block_until_ready(grown)
      calls.append({"seconds": time.perf_counter() - start,
                    "compile_seconds": float(sum(compile_seconds)),
                    "new_adapters": len(event["tasks"])})
      del grown
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
  return {"num_tasks": num_tasks, "hidden_size": hidden, "max_classes": max_classes,
          "fraction": fraction, "state_mb": state_mb,
          "parameters": dypa.allocation_summary(state, [r["task"] for r in rows]),
          "calls": calls, "cold_seconds": calls[0]["seconds"],
          "warm_seconds_median": float(np.median([c["seconds"] for c in calls[1:]]))
          if len(calls) > 1 else None}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2", help="config.seed values, comma-separated")
  parser.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic")
  parser.add_argument("--steps", type=int, default=0, help="0: 800 (synthetic), 1500 (gs1)")
  parser.add_argument("--dypa_at", type=int, default=0, help="allocation step (0: steps // 2)")
  parser.add_argument("--fraction", type=float, default=0.25)
  parser.add_argument("--adapter_size", type=int, default=32)
  parser.add_argument("--adapter_layers", type=int, default=1)
  parser.add_argument("--expand_tasks", type=int, default=1000, help="0: skip the timing")
  parser.add_argument("--expand_hidden", type=int, default=768)
  parser.add_argument("--expand_max_classes", type=int, default=128)
  parser.add_argument("--expand_repeats", type=int, default=4)
  parser.add_argument("--workdir", default=None,
                      help="default: runs/experiments/dypa[_gs1] (runs/experiments/dypa-smoke)")
  parser.add_argument("--out", default=None,
                      help="default: experiments/results/dypa[_gs1].json (<workdir>/smoke.json)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny catalogue, model and timing, one seed, a few steps: checks that "
                      "the script runs; writes <workdir>/smoke.json")
  args = parser.parse_args()
  args.steps = args.steps or DATASETS[args.dataset][1]
  name = "dypa" if args.dataset == "synthetic" else f"dypa_{args.dataset}"
  if args.smoke:
    args.seeds, args.steps = "0", 6
    args.expand_tasks = min(args.expand_tasks, 16) if args.expand_tasks else 0
    args.expand_hidden, args.expand_max_classes, args.expand_repeats = 32, 8, 2
  args.workdir = args.workdir or f"runs/experiments/{name}{'-smoke' if args.smoke else ''}"
  args.out = args.out or (os.path.join(args.workdir, "smoke.json") if args.smoke
                          else common.default_out(name))
  args.dypa_at = args.dypa_at or args.steps // 2
  seeds = [int(s) for s in args.seeds.split(",")]
  meta = common.run_metadata()
  git = git_state()  # At the start: the code this run imported.
  started = time.perf_counter()

  root = os.path.abspath(args.workdir)
  config = base_config(args)
  if args.dataset == "gs1":
    catalogue_fields = real_embeddings.make_catalogue(os.path.join(root, "catalogue"))
  else:
    catalogue_fields = SMOKE_CATALOGUE if args.smoke else CATALOGUE
    common.make_catalogue(root, catalogue_fields, config)
  config.data.catalogue_dir = os.path.join(root, "catalogue")
  common.prepare_shared(config, root)
  print(f"DyPa experiment: {len(seeds)} seeds x ({', '.join(VARIANTS)}; allocation at step "
        f"{args.dypa_at}) x {args.steps} steps; fraction {args.fraction} of adapters of width "
        f"{args.adapter_size}; widen: every task, width {widen_size(args)}", flush=True)
  per_seed = [one_seed(args, root, seed) for seed in seeds]
  training_seconds = time.perf_counter() - started

  summary = {}
  for variant in VARIANTS:
    summary[variant] = {
        part: common.mean_std([s["runs"][variant]["means"][part] for s in per_seed])
        for part in PARTS}
    for key in ("task_specific_share", "adapter_share", "adapter_parameters", "adapter_slots"):
      summary[variant][key] = common.mean_std(
          [s["runs"][variant]["allocation"][key] for s in per_seed])
  paired = {label: {part: common.mean_std([s["runs"][a]["means"][part]
                                           - s["runs"][b]["means"][part] for s in per_seed])
                    for part in PARTS}
            for label, (a, b) in PAIRS.items()}
  summary["gain"] = paired["gain (paired)"]  # mtl+dypa - mtl (the schema before the controls).
  summary["paired"] = paired
  summary["random_own_selected_gain"] = common.mean_std(
      [s["random_own_selected"]["mtl+dypa(random)"] - s["random_own_selected"]["mtl"]
       for s in per_seed])

  def count(stat):  # Exact when every seed has the same count (the allocation sizes are fixed).
    if stat["std"] == 0:
      return f"{stat['mean']:,.0f}"
    return f"{stat['mean']:,.1f} ± {stat['std']:.1f}"

  headers = ["variant", "selected tasks", "unselected tasks", "all tasks",
             "task-specific params", "adapter params", "adapters", "adapter param count"]
  table_rows = [[v, common.fmt(summary[v]["selected"]), common.fmt(summary[v]["unselected"]),
                 common.fmt(summary[v]["all"]),
                 f"{100 * summary[v]['task_specific_share']['mean']:.2f}%",
                 f"{100 * summary[v]['adapter_share']['mean']:.2f}%",
                 count(summary[v]["adapter_slots"]), count(summary[v]["adapter_parameters"])]
                for v in VARIANTS]
  table_rows += [[label, *(common.fmt(paired[label][part]) for part in PARTS), "", "", "", ""]
                 for label in PAIRS]
  table = common.format_table(headers, table_rows)
  print(f"\nMean per-task test accuracy, mean ± std over seeds {seeds}; 'selected' = the tasks "
        "mtl+dypa (lowest_accuracy) selected:")
  print(table)
  for s in per_seed:
    overlap = len(set(s["selected"]) & set(s["random_selected"]))
    own = s["random_own_selected"]
    print(f"  seed {s['seed']}: DyPa selected {', '.join(s['selected'])}; random selected "
          f"{', '.join(s['random_selected'])} ({overlap} in common; on them random - mtl "
          f"{own['mtl+dypa(random)'] - own['mtl']:+.3f})"
          + ("" if s["paired_before_allocation"] else " NOT PAIRED"))

  expand_timing = None
  if args.expand_tasks:
    expand_timing = time_expand(args.expand_tasks, args.expand_hidden, args.expand_max_classes,
                                args.fraction, args.expand_repeats)
    calls = expand_timing["calls"]
    print(f"\ndypa.expand at {args.expand_tasks} tasks, hidden {args.expand_hidden}, "
          f"max_classes {args.expand_max_classes} (state {expand_timing['state_mb']:.0f} MB, "
          f"+{calls[0]['new_adapters']} adapters):")
    for i, c in enumerate(calls):
      print(f"  call {i} ({'cold' if i == 0 else 'warm'}): {c['seconds']:.3f} s, of which "
            f"{c['compile_seconds']:.3f} s tracing/lowering/compiling")

  total_seconds = time.perf_counter() - started
  common.write_json(args.out, {
      **meta, "git": git, "experiment": "dypa", "args": vars(args),
      "catalogue": catalogue_fields,
      "base_config": f"configs/{DATASETS[args.dataset][0].__name__.rsplit('.', 1)[-1]}.py",
      "seeds": seeds, "summary": summary, "table": table,
      "per_seed": [{**s, "runs": {v: {k: r[k] for k in r if k != "rows"} | {"test_rows": r["rows"]}
                                  for v, r in s["runs"].items()}} for s in per_seed],
      "expand_timing": expand_timing, "training_seconds": training_seconds,
      "total_seconds": total_seconds})
  print(f"\nTotal {total_seconds:.0f} s; wrote {args.out}")


if __name__ == "__main__":
  main()
