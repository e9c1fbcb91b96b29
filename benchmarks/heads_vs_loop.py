"""Stacked task heads (the real train step) versus the per-task head loop people usually write.

  python benchmarks/heads_vs_loop.py [--tasks 10,100,1000] [--steps 20]

Both steps share the encoder (`mtl_jax.model.Encoder`, same sizes, same initial parameters), the
batch, dropout, gradient clipping and AdamW hyper-parameters. They differ in the heads:

  stacked: `steps.train_step` (the real one, `steps.jitted_train_step`): one [T, H, C] head
           array applied per example by gather, and the row-wise AdamW that updates only the
           heads of tasks in the batch.
  loop:    one `nn.Dense(num_classes[t])` per task in a dict, a Python loop over ALL tasks in
           the loss (each head scores every example; examples of other tasks are masked out of
           its cross-entropy), and `optax.adamw` over every parameter. The loop is unrolled
           when traced, so the program, and its compile time, grows with the number of tasks.

Compile time is `lower(...).compile()`; step time is the median over `--steps` steps, each
awaited, the two steps taking turns batch by batch (so a shared machine's load falls on both).
Prints a table and writes benchmarks/results/heads_vs_loop.json.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import long_tailed_classes, make_batches  # noqa: E402
from mtl_jax import optim, steps  # noqa: E402
from mtl_jax.model import Encoder, ModelSpec  # noqa: E402

IMAGE_DIM, MAX_IMAGES, VOCAB = 32, 3, 1000


def make_config(args):
  return common.set_fields(common.load_config("demo:tiny"), {
      "total_steps": 50, "model.hidden_size": args.hidden, "model.mlp_size": 4 * args.hidden,
      "model.num_layers": args.layers, "model.num_heads": 4,
      "model.max_classes": args.max_classes, "batch_size": args.batch_size,
      "data.max_text_len": args.text_len})


def make_spec(config):
  m = config.model
  return ModelSpec(vocab_size=VOCAB, max_positions=config.data.max_text_len,
                   image_dim=IMAGE_DIM, max_images=MAX_IMAGES, hidden_size=m.hidden_size,
                   num_layers=m.num_layers, num_heads=m.num_heads, mlp_size=m.mlp_size,
                   dropout=m.dropout)


class LoopHeads(nn.Module):
  """One Dense per task, each of its own width: what a per-task `ModuleDict` becomes in Flax."""
  num_classes: tuple

  @nn.compact
  def __call__(self, pooled, task_ids, labels):
    total = 0.0
    for t, k in enumerate(self.num_classes):
      logits = nn.Dense(k, kernel_init=nn.initializers.normal(0.02), name=f"task_{t}")(pooled)
      mine = task_ids == t
      log_probs = jax.nn.log_softmax(logits)
      picked = jnp.take_along_axis(log_probs, jnp.where(mine, labels, 0)[:, None], axis=-1)[:, 0]
      total = total - jnp.sum(jnp.where(mine, picked, 0.0))
    return total / pooled.shape[0]


def loop_train_step_fn(config, spec, num_classes):
  """The straightforward step: encoder + per-task loop, optax AdamW over everything."""
  encoder = Encoder(spec)
  heads = LoopHeads(tuple(int(k) for k in num_classes))
  opt = config.optimizer
  schedule = optim.learning_rate_schedule(config, config.total_steps)
  tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm),
                   optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                               weight_decay=opt.weight_decay))

  def init(encoder_params, rng):
    pooled = jnp.zeros((1, spec.hidden_size))
    params = {"encoder": encoder_params,
              "heads": heads.init(rng, pooled, jnp.zeros((1,), jnp.int32),
                                  jnp.zeros((1,), jnp.int32))["params"]}
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])

    def loss_fn(params):
      pooled, _ = encoder.apply({"params": params["encoder"]}, batch, deterministic=False,
                                rngs={"dropout": rng})
      return heads.apply({"params": params["heads"]}, pooled, batch["task_id"], batch["label"])

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return ({"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
             "opt_state": opt_state}, {"loss": loss})

  return init, step


def compile_step(step, state, batch):
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return compiled, time.perf_counter() - start


def time_interleaved(steps_and_states, batches, steps):
  """Runs the compiled steps in turn on each batch, each awaited, so that the load of a shared
  machine falls on all of them alike. Returns each one's step times and last loss."""
  states = [state for _, state in steps_and_states]
  times = [[] for _ in states]
  losses = [None] * len(states)
  for i, b in enumerate(batches[:2 + steps]):
    for j, (step, _) in enumerate(steps_and_states):
      start = time.perf_counter()
      states[j], metrics = step(states[j], b)
      jax.block_until_ready(states[j])
      if i >= 2:  # The first two are warm-up.
        times[j].append(time.perf_counter() - start)
      losses[j] = metrics["loss"]
  return times, [float(l) for l in losses]


def measure(num_tasks, args):
  config = make_config(args)
  spec = make_spec(config)
  num_classes = long_tailed_classes(num_tasks, args.max_classes)
  model = common.make_model(config, spec, num_classes)
  batches = [model.global_batch(b) for b in make_batches(
      args.steps + 2, spec, args.batch_size, num_classes)]

  state = model.create_state(jax.random.key(0))
  head_params = int(sum(x.size for x in jax.tree.leaves(state.params["tasks"]["heads"])))
  encoder_params = jax.tree.map(jnp.copy, state.params["encoder"])  # The loop starts alike.
  stacked_step, stacked_compile = compile_step(steps.jitted_train_step(model, 1), state,
                                               batches[0])
  init, loop_step = loop_train_step_fn(config, spec, num_classes)
  loop_state = jax.jit(init)(encoder_params, jax.random.key(1))
  loop_step, loop_compile = compile_step(jax.jit(loop_step, donate_argnums=0), loop_state,
                                         batches[0])
  (stacked_times, loop_times), (stacked_loss, loop_loss) = time_interleaved(
      [(stacked_step, state), (loop_step, loop_state)], batches, args.steps)

  row = {"tasks": num_tasks,
         "head_params_stacked": head_params,
         "head_params_loop": int(sum(spec.hidden_size * k + k for k in num_classes))}
  for name, compile_s, times, loss in (("stacked", stacked_compile, stacked_times, stacked_loss),
                                       ("loop", loop_compile, loop_times, loop_loss)):
    row[f"{name}_compile_s"] = compile_s
    row[f"{name}_step_ms"] = 1e3 * float(np.median(times))
    row[f"{name}_step_ms_p90"] = 1e3 * float(np.percentile(times, 90))
    row[f"{name}_last_loss"] = loss
  row["loop_over_stacked_step"] = row["loop_step_ms"] / row["stacked_step_ms"]
  row["loop_over_stacked_compile"] = row["loop_compile_s"] / row["stacked_compile_s"]
  print(f"[{num_tasks} tasks done: {row}]", flush=True)
  return row


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tasks", default="10,100,1000")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--text_len", type=int, default=32)
  parser.add_argument("--max_classes", type=int, default=128)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "heads_vs_loop.json"))
  args = parser.parse_args()
  meta = common.run_metadata()
  rows = [measure(int(t), args) for t in args.tasks.split(",")]
  print(f"{'tasks':>6} {'stacked ms':>10} {'loop ms':>9} {'loop/stacked':>12} "
        f"{'stacked compile s':>17} {'loop compile s':>14} {'loop/stacked':>12}")
  for r in rows:
    print(f"{r['tasks']:>6} {r['stacked_step_ms']:>10.1f} {r['loop_step_ms']:>9.1f} "
          f"{r['loop_over_stacked_step']:>12.2f} {r['stacked_compile_s']:>17.1f} "
          f"{r['loop_compile_s']:>14.1f} {r['loop_over_stacked_compile']:>12.1f}")
  common.write_result(args.out, meta, args=vars(args), device=str(jax.devices()[0]), rows=rows)


if __name__ == "__main__":
  main()
