"""Issue 14.5: the accelerator numbers, in one short prepared script (one NVIDIA GPU, < 8 min).

  python benchmarks/accelerator.py [--out benchmarks/results/accelerator.json]   # on the GPU
  python benchmarks/accelerator.py --smoke --out /tmp/accelerator_smoke.json   # CPU, tiny sizes

Sections, in this order; each is timed, prints its progress, and records its result or its error
in the JSON (written again after every section, so a run cut short keeps what it measured):

  device       JAX backend, devices and device kind.
  peak_matmul  the measured peak: a large square bfloat16 matmul (n = 8192 and 16384 on a GPU),
               jitted, run back to back; TFLOP/s = 2 n^3 / time, best size. MFU divides by this.
  jax_step     the `configs/mtl1000.py` model (BERT-base sizes: 12 layers x 768, MLP 3072,
               12 attention heads, bfloat16 compute, float32 parameters; text 64 + 4 image
               tokens; heads 128 classes wide; batch 512) through `steps.jitted_train_step` at
               10, 1000 and 10000 tasks (long-tailed class counts, Zipf task mix): compile s,
               step ms (median of `--steps` awaited steps after warm-up), examples/s, model
               TFLOP per step (formula below), XLA's own flop count (compiled cost analysis),
               MFU, peak device memory.
  torch        the same model written the usual PyTorch way (benchmarks/torch_model.py:
               `transformers.BertModel`, `nn.ModuleList` heads looped over the batch's tasks,
               fused AdamW, clipping) with bfloat16 autocast, eager and with `torch.compile` of
               the encoder (the head loop is data-dependent Python, where a whole-model compile
               breaks its graph), on the same GPU and the same batches, in a subprocess (its own
               CUDA context; a crash there cannot lose the JAX numbers). Skipped, with a note,
               where torch has no CUDA. With --smoke it runs on CPU (compile backend "eager").
  profile      a `jax.profiler` trace of a few 1000-task steps (perfetto JSON), summarised: the
               top ops by device time (by kernel/op name; host ops where the trace has no
               device track, as on CPU).

Model FLOPs per train step (the formula MFU uses; also in benchmarks/README.md):

  B batch, S = text + image tokens, L layers, H hidden, F MLP width, K images of width D,
  C head width (max classes), r adapter width (A adapter blocks).
  N = L (4 H^2 + 2 H F)                 encoder matmul parameters (embeddings excluded)
  FLOPs = 6 B [ S N                     6 x params x tokens: the encoder's matmuls
              + 2 L S^2 H               attention scores and weighted values
              + K D H                   image projection
              + H^2                     pooler (one token)
              + 2 A H r                 the adapter (computed for every example)
              + H C ]                   the example's task head
  (forward 2 flops per multiply-add, backward twice the forward: x 3 -> the 6.) MFU = FLOPs /
  step time / measured peak. Attention over padding is counted (the kernels compute it).

GPU memory: XLA_PYTHON_CLIENT_PREALLOCATE=false is set before JAX starts, so JAX takes what it
uses (not 75% of the device) and the torch subprocess has the rest.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

START = time.time()
PROFILE_RESERVE_S = 30  # Kept for the profile, which runs after the torch section.
SMOKE_FIELDS = {  # Tiny sizes: the whole script on CPU in seconds.
    "model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.mlp_size": 64,
    "model.max_classes": 16, "model.adapter_size": 8, "data.max_text_len": 16,
    "data.vocab_size": 512, "data.synthetic.image_dim": 8, "data.synthetic.max_images": 2,
    "batch_size": 16}


def log(msg):
  print(f"[accelerator {time.time() - START:6.1f} s] {msg}", flush=True)


def error_text(e: BaseException) -> str:
  return f"{type(e).__name__}: {e}"[:2000]


def make_config(smoke: bool):
  config = common.load_config("mtl1000")
  config.model.text_init = ""
  config.model.pooling = "cls"
  if smoke:
    common.set_fields(config, SMOKE_FIELDS)
  return config


def model_flops(spec, config, batch_size) -> dict:
  """Model FLOPs of one train step (module docstring), term by term."""
  b, s = batch_size, spec.max_positions + spec.max_images
  l, h, f = spec.num_layers, spec.hidden_size, spec.mlp_size
  k, d, c = spec.max_images, spec.image_dim, config.model.max_classes
  a, r = config.model.adapter_layers, config.model.adapter_size
  n = l * (4 * h * h + 2 * h * f)
  terms = {"encoder_matmuls": 6 * b * s * n, "attention": 6 * b * 2 * l * s * s * h,
           "image_projection": 6 * b * k * d * h, "pooler": 6 * b * h * h,
           "adapter": 6 * b * 2 * a * h * r, "heads": 6 * b * h * c}
  return {"encoder_matmul_params": n, "tokens_per_example": s, "terms": terms,
          "total": float(sum(terms.values()))}


def _cost_flops(compiled):
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None
  except Exception:  # pylint: disable=broad-except
    return None


def _peak_memory_gb(device):
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if not stats:
    return None
  return stats.get("peak_bytes_in_use", 0) / 2**30


# --- Sections ---------------------------------------------------------------------------------

def section_device(result, args):
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  out = {"backend": jax.default_backend(), "device_kind": getattr(d, "device_kind", str(d)),
         "device_count": jax.device_count(), "jax": jax.__version__,
         "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")}
  if jax.default_backend() == "cpu" and not args.smoke:
    out["warning"] = "no accelerator: this run measures the CPU (use --smoke for a quick check)"
  return out


def section_peak(result, args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sizes = [256, 512] if args.smoke else [8192, 16384]
  matmul = jax.jit(lambda a, b: a @ b)
  runs = []
  for n in sizes:
    try:
      ka, kb = jax.random.split(jax.random.key(n))
      a = jax.random.normal(ka, (n, n), jnp.bfloat16)
      b = jax.random.normal(kb, (n, n), jnp.bfloat16)
      matmul(a, b).block_until_ready()  # Compile and warm up.
      flops = 2.0 * n ** 3
      iters = 3
      start = time.perf_counter()
      for _ in range(iters):
        out = matmul(a, b)
      out.block_until_ready()
      first = time.perf_counter() - start
      # Enough repetitions for ~1 s (GPU) / ~0.2 s (smoke) of work.
      iters = int(min(200, max(3, (0.2 if args.smoke else 1.0) / max(first / 3, 1e-6))))
      start = time.perf_counter()
      for _ in range(iters):
        out = matmul(a, b)
      out.block_until_ready()
      seconds = time.perf_counter() - start
      runs.append({"n": n, "iters": iters, "seconds": seconds,
                   "tflops": flops * iters / seconds / 1e12})
      log(f"peak matmul n={n}: {runs[-1]['tflops']:.1f} TFLOP/s")
      del a, b, out
    except Exception as e:  # pylint: disable=broad-except
      runs.append({"n": n, "error": error_text(e)})
  good = [r for r in runs if "tflops" in r]
  if not good:
    raise RuntimeError(f"no matmul size ran: {runs}")
  return {"dtype": "bfloat16", "runs": runs, "tflops": max(r["tflops"] for r in good)}


def _build_step(config, spec, num_tasks):
  import jax  # pylint: disable=g-import-not-at-top
  from mtl_jax import steps  # pylint: disable=g-import-not-at-top
  num_classes = common.long_tailed_classes(num_tasks, config.model.max_classes)
  model = common.make_model(config, spec, num_classes)
  state = model.create_state(jax.random.key(0))
  return model, state, num_classes, steps.jitted_train_step(model, 1)


def section_jax_step(result, args, keep_for_profile):
  import jax  # pylint: disable=g-import-not-at-top
  config = make_config(args.smoke)
  spec = common.spec_from_config(config)
  flops = model_flops(spec, config, config.batch_size)
  peak = (result["sections"].get("peak_matmul") or {}).get("tflops")
  rows = []
  out = {"config": "configs/mtl1000.py" + (" (smoke sizes)" if args.smoke else ""),
         "batch_size": config.batch_size, "spec": {
             k: getattr(spec, k) for k in ("vocab_size", "max_positions", "image_dim",
                                           "max_images", "hidden_size", "num_layers",
                                           "num_heads", "mlp_size", "dtype", "dropout")},
         "max_classes": config.model.max_classes, "model_flops": flops, "rows": rows}
  result["sections"]["jax_step"] = out
  for num_tasks in [int(t) for t in args.tasks.split(",")]:
    row = {"tasks": num_tasks}
    rows.append(row)
    if remaining(args) < (15 if args.smoke else 60):
      row["skipped"] = f"time budget: {remaining(args):.0f} s left"
      log(f"jax step, {num_tasks} tasks: skipped ({row['skipped']})")
      continue
    try:
      log(f"jax step, {num_tasks} tasks: building")
      model, state, num_classes, step = _build_step(config, spec, num_tasks)
      batches = [model.global_batch(b) for b in common.make_batches(
          args.warmup + args.steps, spec, config.batch_size, num_classes,
          task_probs=common.zipf_task_probs(num_tasks))]
      start = time.perf_counter()
      compiled = step.lower(state, batches[0]).compile()
      row["compile_s"] = time.perf_counter() - start
      row["xla_flops_per_step"] = _cost_flops(compiled)
      log(f"jax step, {num_tasks} tasks: compiled in {row['compile_s']:.1f} s")
      for b in batches[:args.warmup]:
        state, metrics = compiled(state, b)
      jax.block_until_ready(state)
      times = []
      for b in batches[args.warmup:]:
        start = time.perf_counter()
        state, metrics = compiled(state, b)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
      step_s = float(np.median(times))
      row.update(step_ms=1e3 * step_s, step_ms_min=1e3 * min(times),
                 step_ms_max=1e3 * max(times), examples_per_s=config.batch_size / step_s,
                 model_tflop_per_step=flops["total"] / 1e12,
                 model_tflops=flops["total"] / step_s / 1e12,
                 mfu=(flops["total"] / step_s / 1e12 / peak) if peak else None,
                 last_loss=float(metrics["loss"]),
                 head_params=int(sum(x.size for x in jax.tree.leaves(
                     state.params["tasks"]["heads"]))),
                 encoder_params=int(sum(x.size for x in jax.tree.leaves(
                     state.params["encoder"]))),
                 peak_memory_gb=_peak_memory_gb(jax.devices()[0]), step_s=times)
      log(f"jax step, {num_tasks} tasks: {row['step_ms']:.1f} ms, "
          f"{row['examples_per_s']:.0f} ex/s, MFU {row['mfu'] or float('nan'):.3f}")
      if num_tasks == args.profile_tasks:
        keep_for_profile.update(compiled=compiled, state=state, batches=batches)
      else:
        del state
      del compiled, batches
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = error_text(e)
      row["traceback"] = traceback.format_exc()[-3000:]
      log(f"jax step, {num_tasks} tasks: ERROR {row['error']}")
    write(result, args)
  return out


def summarize_trace(log_dir: str, steps: int, top: int = 15) -> dict:
  """Top ops by total duration from the perfetto trace `jax.profiler.trace` wrote."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(log_dir) for f in fs
           if f.endswith("perfetto_trace.json.gz")]
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
  with gzip.open(sorted(files)[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  process, thread = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      process[e.get("pid")] = e.get("args", {}).get("name", "")
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      thread[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", "")
  device_pids = {p for p, n in process.items() if "device:" in n.lower() or "gpu" in n.lower()}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  thread_of = lambda e: thread.get((e.get("pid"), e.get("tid")), "")
  device = [e for e in complete if e.get("pid") in device_pids]
  if device:
    # One level of ops, never their enclosing module or step: the "XLA Ops" line where the
    # trace has one, else the GPU streams (kernels), else every device line but the
    # module/step lines.
    names = {thread_of(e) for e in device}
    if any("XLA Ops" in n for n in names):
      keep = lambda n: "XLA Ops" in n
    elif any(n.startswith("Stream") for n in names):
      keep = lambda n: n.startswith("Stream")
    else:
      keep = lambda n: not any(w in n for w in ("Module", "Step", "Framework", "TensorFlow"))
    chosen = [e for e in device if keep(thread_of(e))]
    source = "device"
  else:
    # CPU: XLA's op events on the host; runtime functions (C++ `::` names), Python frames
    # (`$`) and the main thread's dispatch left out. Loops and calls enclose their ops here,
    # so shares can add up to more than 100%.
    chosen = [e for e in complete
              if not str(e.get("name", "")).startswith(("$", "end: ")) and
              "::" not in str(e.get("name", "")) and thread_of(e) != "python"]
    source = "host (no device track in the trace)"
  threads_used = sorted({thread_of(e) for e in chosen})
  totals = {}
  for e in chosen:
    name = str(e.get("name", "?"))
    entry = totals.setdefault(name, {"name": name, "total_us": 0.0, "count": 0})
    entry["total_us"] += float(e["dur"])
    entry["count"] += 1
    hlo = (e.get("args") or {}).get("hlo_op")
    if hlo and "hlo_op" not in entry:
      entry["hlo_op"] = hlo
  busy = sum(t["total_us"] for t in totals.values())
  ranked = sorted(totals.values(), key=lambda t: -t["total_us"])[:top]
  for t in ranked:
    t["ms_per_step"] = t.pop("total_us") / 1e3 / steps
    t["share"] = t["ms_per_step"] * 1e3 * steps / busy if busy else None
  return {"source": source, "processes": sorted(set(process.values())),
          "threads": threads_used[:20], "events": len(chosen),
          "busy_ms_per_step": busy / 1e3 / steps, "top_ops": ranked}


def section_profile(result, args, kept):
  import jax  # pylint: disable=g-import-not-at-top
  if not kept:
    raise RuntimeError(f"no compiled {args.profile_tasks}-task step to profile (see jax_step)")
  compiled, state, batches = kept["compiled"], kept["state"], kept["batches"]
  steps = min(args.profile_steps, len(batches))
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for b in batches[:steps]:
        state, _ = compiled(state, b)
      jax.block_until_ready(state)
    kept["state"] = state
    out = summarize_trace(log_dir, steps)
  out.update(tasks=args.profile_tasks, steps=steps)
  for t in out["top_ops"][:5]:
    log(f"  {t['ms_per_step']:8.3f} ms/step  {t['name'][:90]}")
  return out


def section_torch(result, args):
  """The torch worker in a subprocess, given what is left of the time budget."""
  out_file = os.path.join(tempfile.mkdtemp(prefix="accelerator_torch_"), "torch.json")
  cmd = [sys.executable, os.path.abspath(__file__), "--torch_worker", out_file,
         f"--torch_tasks={args.torch_tasks}", f"--steps={args.steps}",
         f"--warmup={args.warmup}",
         f"--budget_s={max(remaining(args) - PROFILE_RESERVE_S - 10, 10):.0f}"]
  if args.smoke:
    cmd.append("--smoke")
  if args.no_torch_compile:
    cmd.append("--no_torch_compile")
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # The worker imports mtl_jax.model, never a GPU.
  timeout = max(remaining(args) - PROFILE_RESERVE_S, 10)
  try:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout, capture_output=True,
                          text=True)
    returncode, stderr = proc.returncode, proc.stderr
    sys.stdout.write(proc.stdout)
  except subprocess.TimeoutExpired as e:
    returncode, stderr = "timeout", (e.stderr or b"")
    stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
  out = {}
  if os.path.exists(out_file):
    with open(out_file) as f:
      out = json.load(f)
  out["returncode"] = returncode
  if returncode != 0:
    out["stderr_tail"] = (stderr or "")[-3000:]
    out.setdefault("status", "error")
  peak = (result["sections"].get("peak_matmul") or {}).get("tflops")
  flops = (result["sections"].get("jax_step") or {}).get("model_flops", {}).get("total")
  for row in out.get("rows", []):
    if peak and flops and row.get("step_ms"):
      row["mfu"] = flops / (row["step_ms"] / 1e3) / 1e12 / peak
  return out


def torch_worker(args):
  """In the subprocess: the PyTorch model on CUDA (CPU with --smoke); writes to --torch_worker."""
  result = {"status": "running", "rows": []}

  def save():
    with open(args.torch_worker, "w") as f:
      json.dump(common._jsonable(result), f, indent=1)  # pylint: disable=protected-access

  try:
    import torch  # pylint: disable=g-import-not-at-top
    result["torch"] = torch.__version__
    result["cuda_available"] = bool(torch.cuda.is_available())
    result["torch_cuda_version"] = torch.version.cuda
    if torch.cuda.is_available():
      device = "cuda"
      result["device"] = torch.cuda.get_device_name(0)
    elif args.smoke:
      device = "cpu"
      result["device"] = "cpu (--smoke)"
    else:
      result["status"] = "skipped"
      result["note"] = (f"torch {torch.__version__} has no CUDA (torch.version.cuda="
                        f"{torch.version.cuda}); install a CUDA build of torch to compare.")
      save()
      return
    import transformers  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_model  # pylint: disable=g-import-not-at-top
    result["transformers"] = transformers.__version__
    config = make_config(args.smoke)
    spec = common.spec_from_config(config)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    variants = ["eager"] + ([] if args.no_torch_compile else ["compile"])
    plan = [(v, int(t)) for t in args.torch_tasks.split(",") for v in variants
            if v == "eager" or int(t) == int(args.torch_tasks.split(",")[0])]
    for variant, num_tasks in plan:
      row = {"variant": variant, "tasks": num_tasks}
      result["rows"].append(row)
      left = args.budget_s - (time.time() - START)
      if left < (10 if args.smoke else (120 if variant == "compile" else 40)):
        row["skipped"] = f"time budget: {left:.0f} s left"
        save()
        continue
      try:
        torch.manual_seed(0)
        num_classes = common.long_tailed_classes(num_tasks, config.model.max_classes)
        batches = [torch_model.as_torch(b, device) for b in common.make_batches(
            args.warmup + args.steps, spec, config.batch_size, num_classes,
            task_probs=common.zipf_task_probs(num_tasks))]
        model = torch_model.TorchMultiTask(spec, num_classes).to(device)
        model.train()
        optimizer, kind = torch_model.make_optimizer(model, config.optimizer)
        row["optimizer"] = f"AdamW ({kind})"
        if variant == "compile":
          backend = "eager" if device == "cpu" else "inductor"
          model.encode = torch.compile(model.encode, backend=backend)
          row["compile_backend"] = backend
        step = torch_model.train_step_fn(model, optimizer, config.optimizer.clip_norm,
                                         torch.bfloat16, device)
        start = time.perf_counter()
        for b in batches[:args.warmup]:
          loss = step(b)
        sync()
        row["warmup_s"] = time.perf_counter() - start
        times = []
        for b in batches[args.warmup:]:
          start = time.perf_counter()
          loss = step(b)
          sync()
          times.append(time.perf_counter() - start)
        step_s = float(np.median(times))
        row.update(step_ms=1e3 * step_s, examples_per_s=config.batch_size / step_s,
                   last_loss=float(loss), step_s=times, **model.param_counts())
        if device == "cuda":
          row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"[accelerator torch] {variant}, {num_tasks} tasks: {row['step_ms']:.1f} ms",
              flush=True)
        del model, optimizer, batches
        if device == "cuda":
          torch.cuda.empty_cache()
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = error_text(e)
        row["traceback"] = traceback.format_exc()[-3000:]
      save()
    result["status"] = "ok"
  except Exception as e:  # pylint: disable=broad-except
    result["status"] = "error"
    result["error"] = error_text(e)
    result["traceback"] = traceback.format_exc()[-3000:]
  save()


# --- Driver -----------------------------------------------------------------------------------

def remaining(args) -> float:
  return args.budget_s - (time.time() - START)


def write(result, args):
  common.write_result(args.out, result["metadata"], **{k: v for k, v in result.items()
                                                       if k != "metadata"})


def run_section(result, args, name, fn, *fn_args):
  log(f"{name}: start")
  start = time.time()
  try:
    out = fn(result, args, *fn_args) or {}
    out.setdefault("status", "ok")
  except Exception as e:  # pylint: disable=broad-except
    out = {"status": "error", "error": error_text(e), "traceback": traceback.format_exc()[-3000:]}
    log(f"{name}: ERROR {out['error']}")
  out["seconds"] = time.time() - start
  result["sections"][name] = out
  write(result, args)
  log(f"{name}: {out['status']} in {out['seconds']:.1f} s")
  return out


def print_table(result):
  sections = result["sections"]
  peak = sections.get("peak_matmul", {}).get("tflops")
  print(f"device: {sections.get('device', {}).get('device_kind')}; measured peak bf16 matmul: "
        + (f"{peak:.1f} TFLOP/s" if peak else "n/a"))
  rows = []
  for r in sections.get("jax_step", {}).get("rows", []):
    rows.append(["jax (ours)", r["tasks"], _f(r.get("step_ms"), 1),
                 _f(r.get("examples_per_s"), 0), _f(r.get("model_tflops"), 1),
                 _f(r.get("mfu"), 3), _f(r.get("compile_s"), 1),
                 r.get("error") or r.get("skipped") or ""])
  torch_section = sections.get("torch", {})
  for r in torch_section.get("rows", []):
    rows.append([f"torch {r['variant']}", r["tasks"], _f(r.get("step_ms"), 1),
                 _f(r.get("examples_per_s"), 0), "", _f(r.get("mfu"), 3),
                 _f(r.get("warmup_s"), 1), (r.get("error") or r.get("skipped") or "")[:60]])
  print(common.fmt_table(["model", "tasks", "step ms", "ex/s", "TFLOP/s", "MFU",
                          "compile/warmup s", "note"], rows))
  if torch_section.get("status") not in (None, "ok"):
    print(f"torch: {torch_section.get('status')}: "
          f"{torch_section.get('note') or torch_section.get('error') or ''}")
  profile = sections.get("profile", {})
  for t in profile.get("top_ops", [])[:10]:
    print(f"  profile ({profile.get('source')}): {t['ms_per_step']:8.3f} ms/step "
          f"{100 * (t.get('share') or 0):5.1f}%  {t['name'][:80]}")


def _f(x, digits):
  return "" if x is None else f"{x:.{digits}f}"


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--smoke", action="store_true", help="Tiny sizes: a CPU check in seconds.")
  parser.add_argument("--tasks", default=None, help="Task counts (default 10,1000,10000; "
                      "smoke 4,16,64).")
  parser.add_argument("--profile_tasks", type=int, default=None,
                      help="Which task count to profile (default the second of --tasks).")
  parser.add_argument("--torch_tasks", default=None,
                      help="Task counts for torch; compile only at the first (default: the "
                           "profiled count, then the others).")
  parser.add_argument("--steps", type=int, default=None, help="Timed steps (20; smoke 3).")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--profile_steps", type=int, default=3)
  parser.add_argument("--no_torch_compile", action="store_true")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="Work is skipped past this wall time (default 400; smoke 300).")
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "accelerator.json"))
  parser.add_argument("--torch_worker", default="", help="Internal: write torch results here.")
  args = parser.parse_args(argv)
  args.tasks = args.tasks or ("4,16,64" if args.smoke else "10,1000,10000")
  task_list = args.tasks.split(",")
  args.profile_tasks = args.profile_tasks or int(task_list[min(1, len(task_list) - 1)])
  args.torch_tasks = args.torch_tasks or ",".join(
      [str(args.profile_tasks)] + [t for t in task_list if int(t) != args.profile_tasks])
  args.steps = args.steps or (3 if args.smoke else 20)
  args.budget_s = args.budget_s or (300.0 if args.smoke else 400.0)
  if args.torch_worker:
    torch_worker(args)
    return

  try:
    metadata = common.run_metadata(None if argv is None else ["benchmarks/accelerator.py",
                                                              *argv])
  except Exception as e:  # pylint: disable=broad-except
    metadata = {"error": f"run_metadata failed: {error_text(e)}"}
  result = {"metadata": metadata, "args": vars(args), "smoke": args.smoke,
            "flops_formula": ("6 B [S L (4 H^2 + 2 H F) + 2 L S^2 H + K D H + H^2 + 2 A H r "
                              "+ H C]; MFU = FLOPs / step time / measured peak bf16 matmul"),
            "sections": {}}
  log(f"budget {args.budget_s:.0f} s; writing {args.out}")
  kept = {}
  run_section(result, args, "device", section_device)
  run_section(result, args, "peak_matmul", section_peak)
  run_section(result, args, "jax_step", section_jax_step, kept)
  run_section(result, args, "torch", section_torch)
  run_section(result, args, "profile", section_profile, kept)  # Last: a profiler crash loses
  kept.clear()                                                  # nothing else.
  result["wall_s"] = time.time() - START
  write(result, args)
  print_table(result)
  log(f"done; wrote {args.out}")


if __name__ == "__main__":
  main()
