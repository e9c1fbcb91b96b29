"""Our whole train step versus the same model written the usual PyTorch way, on the same CPUs.

  python benchmarks/vs_pytorch.py [--cases mtl100:cpu,mtl100,issue14.6:10,...] [--steps 30]
                                  [--repeats 3] [--cpus 0,1] [--torch_variants default,passive]
                                  [--allocators glibc,tcmalloc]
                                  [--xla_flag_variants 'name=--xla_cpu_flag=value;...']

Cases (same sizes, same batches, same optimiser hyper-parameters on both sides):

  mtl100:cpu, mtl100  each config's encoder (2 x 64 and the MiniLM-sized 6 x 384; random init,
                      CLS pooling), its 100 tasks with long-tailed class counts (2..64), 64 text
                      tokens + 4 images of 64, batch 64 (`--batch_size`), tasks drawn uniformly.
  issue14.6:T         the shapes of issue 14.6: 2 layers x 128 hidden (2 attention heads, MLP
                      512), text 32 + 2 image tokens (images of 64), batch 64, vocabulary 30,522,
                      T tasks with long-tailed class counts up to 64, a Zipf task mix (task t
                      drawn with probability ~ 1/(t+1)), AdamW with clipping, dropout 0.1.

  ours:     `steps.jitted_train_step` (stacked heads, row-wise AdamW on the head rows of the
            tasks in the batch, optax AdamW on the encoder), JAX's CPU backend.
  PyTorch:  benchmarks/torch_model.py: `transformers.BertModel` + `nn.ModuleList` of per-task
            `nn.Linear` heads looped over the tasks in the batch, fused `torch.optim.AdamW`
            (CPU fused AdamW; foreach where unavailable), gradient clipping.

Fairness: each side runs in its own subprocess pinned to the same CPU set (`--cpus`, default
every CPU this process may use) with `os.sched_setaffinity` as its first statement, before
numpy, JAX or torch start any thread (what `taskset -c` does). JAX/XLA sizes its CPU thread
pools from the affinity mask (checked: the worker records how many `tf_XLAEigen` threads it
has); with a one-CPU set `--xla_cpu_multi_thread_eigen=false`
is added to XLA_FLAGS (XLA has no intra-op thread-count flag: TF's `intra_op_parallelism_threads`
is not an XLA flag). PyTorch gets `torch.set_num_threads(len(cpus))` (and OMP_NUM_THREADS,
MKL_NUM_THREADS). Torch variants (`--torch_variants`): `default` (the OpenMP wait policy torch
ships with) and `passive` (`OMP_WAIT_POLICY=PASSIVE`: idle OpenMP threads sleep instead of
spinning; on a shared, loaded machine spinning threads can wait for cores other jobs hold).
Allocators (`--allocators`): every side runs once with glibc's malloc and once with TCMalloc
preloaded (`mtl_jax.allocator.with_tcmalloc`, what `python -m mtl_jax.main` does where it is
installed); "best" on each side is its fastest variant, and each allocator's ratio is also given.
"best torch" is the fastest torch variant. `--xla_flag_variants` adds sides of ours run with
other XLA flags (`ours_<name>`; the JSON records each side's XLA_FLAGS), to try XLA's CPU
options beside the default in the same rounds.

The sides take turns: `--repeats` rounds of ours (`--steps` steps), torch, torch-passive, ours,
...; both sides are built and warmed up (compilation, `--warmup` steps) before the first round
and idle (blocked on a pipe) while the other runs. A side's time is the median over rounds of
each round's median step time; every step is awaited. The load average is recorded before and
after each case. Prints a table and writes benchmarks/results/vs_pytorch.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

if os.environ.get("VS_PYTORCH_CPUS"):  # A worker: pinned before numpy, JAX or torch start.
  os.sched_setaffinity(0, {int(c) for c in os.environ["VS_PYTORCH_CPUS"].split(",")})

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

DEFAULT_CASES = "mtl100:cpu,mtl100,issue14.6:10,issue14.6:1000,issue14.6:3000"
ISSUE_14_6 = {"hidden": 128, "layers": 2, "heads": 2, "mlp": 512, "text_len": 32,
              "max_images": 2, "image_dim": 64, "vocab": 30522, "max_classes": 64,
              "batch_size": 64, "dropout": 0.1, "zipf_exponent": 1.0}
PREFIX = "@@"


def build_case(name: str, batch_size: int):
  """(config, spec, num_classes, task_probs or None) of a case name."""
  if name.startswith("issue14.6:"):
    s = ISSUE_14_6
    num_tasks = int(name.split(":")[1])
    config = common.set_fields(common.load_config("demo"), {
        "model.hidden_size": s["hidden"], "model.num_layers": s["layers"],
        "model.num_heads": s["heads"], "model.mlp_size": s["mlp"],
        "model.dropout": s["dropout"], "model.max_classes": s["max_classes"],
        "data.max_text_len": s["text_len"], "data.vocab_size": s["vocab"],
        "data.synthetic.num_tasks": num_tasks, "data.synthetic.image_dim": s["image_dim"],
        "data.synthetic.max_images": s["max_images"], "batch_size": s["batch_size"]})
    task_probs = common.zipf_task_probs(num_tasks, s["zipf_exponent"])
  else:
    config = common.load_config(name)
    config.model.pooling = "cls"  # BertModel's pooler; the spec below is random-init anyway.
    if batch_size:
      config.batch_size = batch_size
    task_probs = None
  spec = common.spec_from_config(config)
  num_classes = common.long_tailed_classes(config.data.synthetic.num_tasks,
                                           config.model.max_classes)
  return config, spec, num_classes, task_probs


# --- Workers: one side each, in its own pinned process ---------------------------------------

def _ours(config, spec, num_classes, batches):
  import jax  # pylint: disable=g-import-not-at-top
  from mtl_jax import steps  # pylint: disable=g-import-not-at-top
  model = common.make_model(config, spec, num_classes)
  state = model.create_state(jax.random.key(0))
  device_batches = [model.global_batch(b) for b in batches]
  start = time.perf_counter()
  step = steps.jitted_train_step(model, 1).lower(state, device_batches[0]).compile()
  info = {"compile_s": time.perf_counter() - start, "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "encoder_params": int(sum(x.size for x in jax.tree.leaves(state.params["encoder"]))),
          "head_params": int(sum(x.size for x in jax.tree.leaves(
              state.params["tasks"]["heads"])))}
  holder = [state]

  def run(i):
    holder[0], metrics = step(holder[0], device_batches[i])
    jax.block_until_ready(holder[0])
    return float(metrics["loss"])

  return run, info


def _torch(config, spec, num_classes, batches, threads):
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_model  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = torch_model.TorchMultiTask(spec, num_classes)
  model.train()
  optimizer, kind = torch_model.make_optimizer(model, config.optimizer)
  step = torch_model.train_step_fn(model, optimizer, config.optimizer.clip_norm)
  torch_batches = [torch_model.as_torch(b) for b in batches]
  info = {**model.param_counts(), "optimizer": f"torch.optim.AdamW ({kind})",
          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}
  return (lambda i: float(step(torch_batches[i]))), info


def _thread_counts() -> dict:
  counts = {}
  for tid in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{tid}/comm") as f:
        name = f.read().strip().split("/")[0]
    except OSError:
      continue
    counts[name] = counts.get(name, 0) + 1
  return counts


def worker(args):
  config, spec, num_classes, task_probs = build_case(args.case, args.batch_size)
  batches = common.make_batches(args.num_batches, spec, config.batch_size, num_classes,
                                task_probs=task_probs)
  start = time.perf_counter()
  if args.worker == "ours":
    run, info = _ours(config, spec, num_classes, batches)
  else:
    run, info = _torch(config, spec, num_classes, batches, len(os.sched_getaffinity(0)))
  for i in range(args.warmup):
    run(i)
  info.update(build_and_warmup_s=time.perf_counter() - start,
              affinity=sorted(os.sched_getaffinity(0)), threads=_thread_counts())
  print(PREFIX + json.dumps(info), flush=True)
  for line in sys.stdin:
    command = line.split()
    if not command or command[0] == "quit":
      return
    first, last = int(command[1]), int(command[2])
    times, loss = [], None
    for i in range(first, last):
      start = time.perf_counter()
      loss = run(i)
      times.append(time.perf_counter() - start)
    print(PREFIX + json.dumps({"times": times, "loss": loss}), flush=True)


# --- The parent: starts the pinned workers and makes them take turns ---------------------------

class Side:
  def __init__(self, name, kind, case, cpus, env, args):
    self.name = name
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={kind}", f"--case={case}",
           f"--batch_size={args.batch_size}", f"--warmup={args.warmup}",
           f"--num_batches={args.warmup + args.repeats * args.steps}"]
    env = dict(env, VS_PYTORCH_CPUS=",".join(map(str, sorted(cpus))))
    self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    self.info = self._read()
    self.round_ms, self.times, self.loss = [], [], None

  def _read(self):
    for line in self.proc.stdout:
      if line.startswith(PREFIX):
        return json.loads(line[len(PREFIX):])
      sys.stderr.write(line)
    raise RuntimeError(f"{self.name} worker exited with {self.proc.wait()} (its stderr above)")

  def run(self, first, last):
    self.proc.stdin.write(f"run {first} {last}\n")
    self.proc.stdin.flush()
    out = self._read()
    self.times.append(out["times"])
    self.round_ms.append(1e3 * float(np.median(out["times"])))
    self.loss = out["loss"]

  def close(self):
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
    except (BrokenPipeError, ValueError):
      pass
    self.proc.wait(timeout=120)


def parse_flag_variants(text: str) -> dict:
  """`name=--flag=value --flag2=value;name2=...` -> {name: XLA flags}."""
  variants = {}
  for item in filter(None, text.split(";")):
    name, sep, flags = item.partition("=")
    if not sep or not name.isidentifier() or not flags.strip().startswith("--"):
      raise ValueError(f"--xla_flag_variants: {item!r} is not NAME=--xla_flag=value ...; "
                       "Fix: e.g. --xla_flag_variants='no_xnnpack=--xla_cpu_use_xnnpack=false'")
    variants[name] = flags.strip()
  return variants


def side_envs(cpus, variants, allocators=("glibc",), xla_flag_variants=None):
  """(name, worker kind, environment) of every side, under each allocator. Each of
  `xla_flag_variants` ({name: flags}) adds a side `ours_<name>`: ours with those XLA flags."""
  base = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  base.pop("OMP_WAIT_POLICY", None)
  ours = dict(base)
  if len(cpus) == 1:
    ours["XLA_FLAGS"] = (ours.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  threads = str(len(cpus))
  torch_env = dict(base, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
  sides = [("ours", "ours", ours)] + [
      (f"ours_{name}", "ours", dict(ours, XLA_FLAGS=f"{ours.get('XLA_FLAGS', '')} {flags}".strip()))
      for name, flags in (xla_flag_variants or {}).items()]
  for v in variants:
    if v == "default":
      sides.append(("torch", "torch", torch_env))
    elif v == "passive":
      sides.append(("torch_passive", "torch", dict(torch_env, OMP_WAIT_POLICY="PASSIVE")))
    else:
      raise ValueError(f"--torch_variants: unknown variant {v!r}; use default, passive")
  from mtl_jax import allocator  # pylint: disable=g-import-not-at-top
  out = []
  for name_allocator in allocators:
    if name_allocator == "glibc":
      out += sides
    elif name_allocator == "tcmalloc":
      if allocator.tcmalloc_path() is None:
        raise ValueError("--allocators: no TCMalloc installed (apt-get install "
                         "libtcmalloc-minimal4), or use --allocators=glibc")
      out += [(f"{name}_tcmalloc", kind, allocator.with_tcmalloc(env))
              for name, kind, env in sides]
    else:
      raise ValueError(f"--allocators: unknown {name_allocator!r}; use glibc, tcmalloc")
  return out


def _best(sides: dict, kind: str, tcmalloc: bool | None = None) -> str:
  """The fastest side of `kind` ("ours" or "torch"); with `tcmalloc`, of that allocator only."""
  names = [k for k in sides if k.startswith(kind) and (
      tcmalloc is None or k.endswith("_tcmalloc") == tcmalloc)]
  return max(names, key=lambda k: sides[k]["examples_per_s"])


def measure(case, cpus, args):
  config, spec, num_classes, _ = build_case(case, args.batch_size)
  load_before = common.load_average()
  sides = []
  try:
    for name, kind, env in side_envs(cpus, args.torch_variants.split(","),
                                     args.allocators.split(","),
                                     parse_flag_variants(args.xla_flag_variants)):
      sides.append(Side(name, kind, case, cpus, env, args))  # Built one after the other.
      print(f"  {case}: {name} ready ({sides[-1].info['build_and_warmup_s']:.0f} s)", flush=True)
    for r in range(args.repeats):
      first = args.warmup + r * args.steps
      for side in sides:
        side.run(first, first + args.steps)
      print(f"  {case}: round {r + 1}/{args.repeats}: " + ", ".join(
          f"{side.name} {side.round_ms[-1]:.0f} ms" for side in sides), flush=True)
  finally:
    for side in sides:
      side.close()
  load_after = common.load_average()
  row = {"case": case, "tasks": len(num_classes), "batch_size": config.batch_size,
         "hidden": spec.hidden_size, "layers": spec.num_layers,
         "tokens": spec.max_positions + spec.max_images, "vocab": spec.vocab_size,
         "max_classes": int(config.model.max_classes),
         "task_mix": "zipf" if case.startswith("issue14.6") else "uniform",
         "cpus": sorted(cpus), "load_average_before_after": [load_before, load_after],
         "sides": {}}
  for side in sides:
    step_s = float(np.median(side.round_ms)) / 1e3
    row["sides"][side.name] = {**side.info, "step_ms": 1e3 * step_s,
                               "round_ms": side.round_ms,
                               "examples_per_s": config.batch_size / step_s,
                               "last_loss": side.loss, "step_s": side.times}
  s = row["sides"]
  if any(k.startswith("torch") for k in s):
    row["best_ours"], row["best_torch"] = _best(s, "ours"), _best(s, "torch")
    row["ours_over_best_torch"] = (s[row["best_ours"]]["examples_per_s"]
                                   / s[row["best_torch"]]["examples_per_s"])
    # Each allocator alone: ours against the best torch under the same allocator.
    for name in [k for k in s if k.startswith("ours")]:
      same = _best(s, "torch", tcmalloc=name.endswith("_tcmalloc"))
      s[name]["over_best_torch_same_allocator"] = (
          s[name]["examples_per_s"] / s[same]["examples_per_s"])
  print(f"[{case}: " + ", ".join(f"{k} {v['examples_per_s']:.1f} ex/s"
                                 for k, v in row["sides"].items())
        + f"; load {load_before[0]} -> {load_after[0]}]", flush=True)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default=DEFAULT_CASES)
  parser.add_argument("--batch_size", type=int, default=64,
                      help="Batch of the config cases (0: each config's own).")
  parser.add_argument("--steps", type=int, default=30, help="Timed steps per side per round.")
  parser.add_argument("--repeats", type=int, default=3, help="Rounds of every side in turn.")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--cpus", default="",
                      help="Comma-separated CPU ids both sides are pinned to (default: all "
                           "CPUs this process may use).")
  parser.add_argument("--torch_variants", default="default,passive")
  parser.add_argument("--allocators", default="glibc,tcmalloc",
                      help="glibc and/or tcmalloc (preloaded); every side runs under each.")
  parser.add_argument("--xla_flag_variants", default="",
                      help="Extra sides of ours with other XLA flags: "
                           "'name=--xla_flag=value ...;name2=...' (side ours_<name>).")
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "vs_pytorch.json"))
  parser.add_argument("--worker", default="", help="Internal: ours | torch.")
  parser.add_argument("--case", default="", help="Internal: the worker's case.")
  parser.add_argument("--num_batches", type=int, default=0, help="Internal.")
  args = parser.parse_args(argv)
  if args.worker:
    worker(args)
    return

  cpus = ({int(c) for c in args.cpus.split(",")} if args.cpus
          else set(os.sched_getaffinity(0)))
  meta = common.run_metadata(None if argv is None else ["benchmarks/vs_pytorch.py", *argv])
  rows = []
  for case in args.cases.split(","):
    rows.append(measure(case, cpus, args))
    # Written after every case: a run cut short keeps the cases it finished.
    common.write_result(args.out, meta, args=vars(args), cpus=sorted(cpus),
                        issue_14_6_shapes=ISSUE_14_6, complete=False, rows=rows)
  side_names = list(rows[0]["sides"])
  table = []
  for r in rows:
    for name in side_names:
      s = r["sides"][name]
      table.append([r["case"], r["tasks"], r["batch_size"], f"{r['hidden']} x {r['layers']}",
                    r["tokens"], ",".join(map(str, r["cpus"])), name,
                    s["threads"].get("tf_XLAEigen", "?") if name.startswith("ours")
                    else s.get("torch_threads", "-"),
                    f"{s['step_ms']:.1f}",
                    f"{min(s['round_ms']):.0f}-{max(s['round_ms']):.0f}",
                    f"{s['examples_per_s']:.1f}",
                    f"{s['over_best_torch_same_allocator']:.2f}"
                    if "over_best_torch_same_allocator" in s else "",
                    f"{r['ours_over_best_torch']:.2f}" if name == r.get("best_ours") else ""])
  print(common.fmt_table(["case", "tasks", "batch", "hidden x layers", "tokens", "cpus", "side",
                          "threads", "step ms", "rounds ms", "ex/s",
                          "/ best torch, same allocator", "best ours / best torch"], table))
  common.write_result(args.out, meta, args=vars(args), cpus=sorted(cpus),
                      issue_14_6_shapes=ISSUE_14_6, complete=True, rows=rows)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
