"""Step time and memory of the whole train step versus the number of tasks, per task update.

  python benchmarks/step_time_vs_tasks.py [--tasks 10,1000,10000,30000] [--modes sparse,optax_adamw]
      [--steps 10] [--repeats 5]

Fixed model and batch (2-layer x 128-hidden encoder, batch 32, text 32 tokens + 2 images, heads
128 classes wide with long-tailed class counts, tasks drawn uniformly); only the number of tasks
(stacked head blocks) changes. Three ways to update the task parameters, all on the same model
(`steps.forward`), the same encoder update (`model.tx`), the same clipping, initial state and
batches:

  sparse         `steps.train_step` with `optimizer.task_update="sparse"` (the default): row-wise
                 AdamW on the head blocks of the tasks in the batch only (mtl_jax/optim.py).
  dense_rowwise  `steps.train_step` with `task_update="dense"`: the same row-wise code passed
                 every row (gather all, update, scatter all back).
  optax_adamw    a variant of the train step written here: the gradient with respect to the
                 whole stacked task parameters, and real `optax.adamw` over them (the encoder's
                 optimiser, `optim.encoder_optimizer`: same hyper-parameters and weight-decay
                 mask rule `optim.decays`). This is what "plain dense AdamW" costs. It computes
                 the same update as dense_rowwise (checked: `max_abs_param_diff_vs_dense_rowwise`
                 after the run, and tests/test_benchmarks.py).

Every (task count, mode) is built and warmed up first; then they take turns: `--repeats` rounds
of (10 tasks, mode A) (`--steps` steps), (10, B), ..., (3000, C), (10, A), ..., each step
awaited, so that a change of machine load hits every task count alike and the ratios to the
fewest tasks hold. A time is the median over rounds of each round's median step time (the spread
is the min and max of those). The load average is recorded at the start and the end. Heads are
stored in blocks of `model.classes_per_block` classes (task_layers.py): "/ sum C_t" is their
parameter count over what exactly C_t classes per task would hold, "padded / sum C_t" that of
one row per task padded to the widest task. Prints a table and writes
benchmarks/results/step_time_vs_tasks.json.
"""
import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from mtl_jax import losses, optim, steps, task_layers  # noqa: E402
from mtl_jax.model import ModelSpec  # noqa: E402

MODES = ("sparse", "dense_rowwise", "optax_adamw")
# The shapes the earlier (2026-11-25) numbers were measured on: tests/helpers.py's tiny model.
VOCAB, IMAGE_DIM, MAX_IMAGES = 50, 8, 2


def make_config(args, task_update):
  config = common.load_config("demo:tiny")
  return common.set_fields(config, {
      "total_steps": 50, "optimizer.task_update": task_update,
      "model.hidden_size": args.hidden, "model.mlp_size": 4 * args.hidden,
      "model.num_layers": 2, "model.num_heads": 4, "model.max_classes": args.max_classes,
      "batch_size": args.batch_size, "data.max_text_len": args.text_len})


def make_spec(config):
  m = config.model
  return ModelSpec(vocab_size=VOCAB, max_positions=config.data.max_text_len,
                   image_dim=IMAGE_DIM, max_images=MAX_IMAGES, hidden_size=m.hidden_size,
                   num_layers=m.num_layers, num_heads=m.num_heads, mlp_size=m.mlp_size,
                   dropout=m.dropout, dtype=m.dtype)


def optax_train_step(model, task_tx, state, batch):
  """`steps.train_step` with every task row updated by `task_tx` (optax) instead of row-wise.

  Same forward (`steps.forward` on the whole stacked rows, indexed by task), loss, held-out
  weighting, gradient clipping and encoder update; `state.task_opt_state` holds `task_tx`'s
  state of the whole task tree. No augmentation (the benchmark's config has none).
  """
  config = model.config
  assert config.augment.kind == "none"
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  task_ids = batch["task_id"]
  slots = state.adapter_map[task_ids]
  class_mask = task_layers.class_mask(state.num_classes, task_ids, config.model.max_classes)
  weight = (batch["label"] < state.num_classes[task_ids]).astype(jnp.float32)
  targets = jax.nn.one_hot(batch["label"], config.model.max_classes) * class_mask

  def loss_fn(encoder_params, task_params):
    out = steps.forward(model, encoder_params, task_params, batch,
                        model.head_layout.example_rows(task_ids), slots, slots > 0, rng=rng)
    per_example = losses.soft_cross_entropy(out, targets, class_mask)
    return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0)

  loss, (encoder_grads, task_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
      state.params["encoder"], state.params["tasks"])
  grad_norm = optax.global_norm((encoder_grads, task_grads))
  clip = jnp.minimum(1.0, config.optimizer.clip_norm / (grad_norm + 1e-6))
  encoder_grads, task_grads = jax.tree.map(lambda g: g * clip, (encoder_grads, task_grads))
  updates, opt_state = model.tx.update(encoder_grads, state.opt_state, state.params["encoder"])
  encoder = optax.apply_updates(state.params["encoder"], updates)
  task_updates, task_opt_state = task_tx.update(task_grads, state.task_opt_state,
                                                state.params["tasks"])
  tasks = optax.apply_updates(state.params["tasks"], task_updates)
  return (state.replace(step=state.step + 1, params={"encoder": encoder, "tasks": tasks},
                        opt_state=opt_state, task_opt_state=task_opt_state),
          {"loss": loss, "grad_norm": grad_norm})


def build(mode, args, num_classes, batch):
  """(compiled step, state, model) of one mode; every mode starts from the same state."""
  config = make_config(args, "dense" if mode == "dense_rowwise" else "sparse")
  model = common.make_model(config, make_spec(config), num_classes)
  state = model.create_state(jax.random.key(0))
  if mode == "optax_adamw":
    # The same rule as the encoder's (optim.decays by leaf name), over the whole task tree.
    task_tx = optim.encoder_optimizer(config, model.schedule)
    state = state.replace(task_opt_state=jax.jit(task_tx.init)(state.params["tasks"]))
    step = jax.jit(functools.partial(optax_train_step, model, task_tx), donate_argnums=0)
  else:
    step = steps.jitted_train_step(model, 1)
  batch = model.global_batch(batch)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  info = {"compile_s": compile_s,
          "temp_mb": memory.temp_size_in_bytes / 2**20 if memory else None,
          "state_mb": sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20}
  return compiled, state, model, info


def measure(task_counts, args):
  """Rows of every (task count, mode), timed in turns: round r runs each of them in order."""
  load_before = common.load_average()
  runs = {}
  for num_tasks in task_counts:
    num_classes = common.long_tailed_classes(num_tasks, args.max_classes)
    spec = make_spec(make_config(args, "sparse"))
    count = args.warmup + args.repeats * args.steps
    batches = common.make_batches(count, spec, args.batch_size, num_classes)
    for mode in args.modes.split(","):
      compiled, state, model, info = build(mode, args, num_classes, batches[0])
      run = {"step": compiled, "state": state, "info": info, "round_ms": [], "times": [],
             "batches": [model.global_batch(b) for b in batches], "num_classes": num_classes,
             "hidden": model.spec.hidden_size}
      for b in run["batches"][:args.warmup]:
        run["state"], _ = run["step"](run["state"], b)
      jax.block_until_ready(run["state"])
      runs[num_tasks, mode] = run
  for r in range(args.repeats):  # Rounds: every (task count, mode) in turn.
    for run in runs.values():
      times = []
      for b in run["batches"][args.warmup + r * args.steps:args.warmup + (r + 1) * args.steps]:
        start = time.perf_counter()
        run["state"], metrics = run["step"](run["state"], b)
        jax.block_until_ready(run["state"])
        times.append(time.perf_counter() - start)
      run["times"].append(times)
      run["round_ms"].append(1e3 * float(np.median(times)))
      run["last_loss"] = float(metrics["loss"])
  load_after = common.load_average()

  rows = []
  for (num_tasks, mode), run in runs.items():
    state = run["state"]
    row = {"tasks": num_tasks, "mode": mode,
           "step_ms": float(np.median(run["round_ms"])),
           "round_ms": run["round_ms"], "step_ms_min_round": min(run["round_ms"]),
           "step_ms_max_round": max(run["round_ms"]),
           "head_params": int(sum(x.size for x in jax.tree.leaves(
               state.params["tasks"]["heads"]))),
           # What the heads would hold with exactly C_t classes per task, and padded to C_max.
           "head_params_exact": int(run["num_classes"].sum() * (run["hidden"] + 1)),
           "head_params_padded": int(num_tasks * args.max_classes * (run["hidden"] + 1)),
           "encoder_params": int(sum(x.size for x in jax.tree.leaves(state.params["encoder"]))),
           **run["info"], "last_loss": run["last_loss"],
           "step_s": run["times"], "load_average_before_after": [load_before, load_after]}
    reference = runs.get((num_tasks, "dense_rowwise"))
    if reference is not None and mode != "sparse":
      # Both are plain AdamW over every row from one state on the same batches: the same update.
      row["max_abs_param_diff_vs_dense_rowwise"] = float(max(
          np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in zip(
              jax.tree.leaves(state.params), jax.tree.leaves(reference["state"].params))))
    rows.append(row)
  print(", ".join(f"{r['tasks']} tasks {r['mode']} {r['step_ms']:.1f} ms" for r in rows)
        + f"; load {load_before[0]} -> {load_after[0]}", flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--tasks", default="10,1000,10000,30000")
  # dense_rowwise: exact comparisons at small task counts (its temporaries grow with the tasks).
  parser.add_argument("--modes", default="sparse,optax_adamw")
  parser.add_argument("--steps", type=int, default=10, help="Timed steps per mode per round.")
  parser.add_argument("--repeats", type=int, default=5, help="Rounds of every mode in turn.")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--text_len", type=int, default=32)
  parser.add_argument("--max_classes", type=int, default=128)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR,
                                                    "step_time_vs_tasks.json"))
  args = parser.parse_args(argv)
  task_counts = [int(t) for t in args.tasks.split(",")]
  if len(set(task_counts)) < len(task_counts):
    parser.error(f"--tasks: {args.tasks} names a task count twice; every count is interleaved "
                 "with the others already")
  for mode in args.modes.split(","):
    if mode not in MODES:
      parser.error(f"--modes: unknown mode {mode!r}; use some of {MODES}")
  meta = common.run_metadata(None if argv is None else ["benchmarks/step_time_vs_tasks.py",
                                                        *argv])
  rows = measure(task_counts, args)
  fewest = min(r["tasks"] for r in rows)
  base = {r["mode"]: r["step_ms"] for r in rows if r["tasks"] == fewest}
  table = []
  for r in rows:
    r["ratio_to_fewest_tasks"] = r["step_ms"] / base[r["mode"]]
    diff = r.get("max_abs_param_diff_vs_dense_rowwise")
    diff = None if r["mode"] == "dense_rowwise" else diff  # Not against itself.
    table.append([r["tasks"], r["mode"], f"{r['step_ms']:.1f}",
                  f"{r['step_ms_min_round']:.0f}-{r['step_ms_max_round']:.0f}",
                  f"{r['ratio_to_fewest_tasks']:.2f}", f"{r['head_params']:,}",
                  f"{r['head_params'] / r['head_params_exact']:.2f}",
                  f"{r['head_params_padded'] / r['head_params_exact']:.2f}",
                  f"{r['state_mb']:.1f}", f"{r['temp_mb'] or 0:.1f}", f"{r['compile_s']:.1f}",
                  "-" if diff is None else f"{diff:.1e}"])
  print(common.fmt_table(["tasks", "mode", "step ms", "rounds ms", f"x {fewest} tasks",
                          "head params", "/ sum C_t", "padded / sum C_t", "state MB", "temp MB", "compile s",
                          "|dparam| vs dense_rowwise"], table))
  common.write_result(args.out, meta, args=vars(args), device=str(jax.devices()[0]),
                      rows=rows)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
