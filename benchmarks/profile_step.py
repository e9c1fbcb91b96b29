"""Where our train step's time goes: a `jax.profiler` trace of a benchmark case, its top ops with
the model code each comes from.

  python benchmarks/profile_step.py [--case issue14.6:10] [--steps 10] [--top 20]

The case is one of `vs_pytorch.py`'s (same shapes, batches and config). The step is compiled,
warmed up, then traced for `--steps` awaited steps; `accelerator.summarize_trace` ranks the ops
by time per step, and each op is named with the `op_name` XLA kept from the JAX code (the
Flax module path and primitive: `.../layers/mlp_in/dot_general`, `.../word_embeddings/...`);
a second table sums the time per Flax module, forward and backward together.
On CPU, op times on the two threads overlap, so shares are of summed op time. Run it under the
allocator you want to see (`LD_PRELOAD=...libtcmalloc_minimal.so.4 python ...`; the JSON
records which). Prints a table and writes benchmarks/results/profile_step.json.
"""
import argparse
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import accelerator, common, vs_pytorch  # noqa: E402


def op_sources(hlo_text: str) -> dict:
  """HLO instruction name -> the JAX `op_name` it was lowered from; a fusion without one of its
  own takes the first `op_name` inside the computation it calls."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      current = header.group(1)
    op_name = re.search(r'op_name="([^"]*)"', line)
    if current and op_name:
      computations.setdefault(current, op_name.group(1))
  sources = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", hlo_text, re.M):
    op_name = re.search(r'op_name="([^"]*)"', m.group(2))
    called = re.search(r"calls=%([\w.\-]+)", m.group(2))
    source = op_name.group(1) if op_name else computations.get(called.group(1)) if called else None
    if source:
      sources[m.group(1)] = source
  return sources


def module_of(source: str) -> str:
  """`transpose(jvp(Encoder))/closed_call/layers/mlp_in/dot_general` -> `Encoder/layers/mlp_in`:
  the Flax module an op belongs to, forward and backward together; "(outside the encoder)" for
  the loss, the task rows and the optimiser updates."""
  parts = [p for p in re.sub(r"\b(transpose|jvp)\(|\)", "", source).split("/")[:-1]
           if re.fullmatch(r"[A-Za-z_]\w*", p)
           and p not in ("closed_call", "while", "body", "cond", "checkpoint", "remat")]
  return "/".join(parts) if parts and parts[0] == "Encoder" else "(outside the encoder)"


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--case", default="issue14.6:10")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--top", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "profile_step.json"))
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from mtl_jax import allocator, steps  # pylint: disable=g-import-not-at-top
  meta = common.run_metadata(None if argv is None else ["benchmarks/profile_step.py", *argv])
  config, spec, num_classes, task_probs = vs_pytorch.build_case(args.case, 64)
  batches = common.make_batches(args.steps + 3, spec, config.batch_size, num_classes,
                                task_probs=task_probs)
  model = common.make_model(config, spec, num_classes)
  state = model.create_state(jax.random.key(0))
  device_batches = [model.global_batch(b) for b in batches]
  compiled = steps.jitted_train_step(model, 1).lower(state, device_batches[0]).compile()
  for b in device_batches[:3]:
    state, _ = compiled(state, b)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for b in device_batches[3:]:
        state, _ = compiled(state, b)
        jax.block_until_ready(state)
    summary = accelerator.summarize_trace(log_dir, args.steps, top=1 << 30)
  sources = op_sources(compiled.as_text())
  by_module = {}
  for op in summary["top_ops"]:
    op["source"] = sources.get(op["name"], "")
    module = module_of(op["source"])
    by_module[module] = by_module.get(module, 0.0) + op["ms_per_step"]
  summary["top_ops"] = summary["top_ops"][:args.top]
  summary["ms_per_step_by_module"] = dict(sorted(by_module.items(), key=lambda kv: -kv[1]))
  rows = [[f"{op['ms_per_step']:.2f}", f"{100 * op['share']:.1f}%", op["name"][:40],
           op["source"].removeprefix("jit(train_step)/")[-80:]] for op in summary["top_ops"]]
  print(f"{args.case}: summed op time {summary['busy_ms_per_step']:.1f} ms/step over "
        f"{args.steps} steps; TCMalloc preloaded: {allocator.preloaded()}")
  print(common.fmt_table(["ms/step", "share", "XLA op", "from"], rows))
  busy = summary["busy_ms_per_step"]
  print(common.fmt_table(["ms/step", "share", "module (forward + backward)"], [
      [f"{ms:.2f}", f"{100 * ms / busy:.1f}%", module]
      for module, ms in list(summary["ms_per_step_by_module"].items())[:args.top]]))
  common.write_result(args.out, meta, args=vars(args), tcmalloc=allocator.preloaded(),
                      **summary)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
