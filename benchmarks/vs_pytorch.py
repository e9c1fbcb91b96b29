"""Our whole train step versus the same model written the usual PyTorch way, on one CPU.

  python benchmarks/vs_pytorch.py [--configs mtl100:cpu,mtl100] [--batch_size 64] [--steps 10]

Same sizes (each config's model, task count, text length, images), same batches, same
optimiser hyper-parameters, one process, run one after the other.

  ours:    `Trainer.train_step` under `jax.jit` (stacked heads, row-wise AdamW on the heads of
           the tasks in the batch, optax AdamW on the encoder).
  PyTorch: `transformers.BertModel` of the same sizes fed `inputs_embeds`: the word embeddings
           of the text followed by the images through an `nn.Linear` projection, token type 0
           for text and 1 for images, the padding mask of both; its pooler output goes to an
           `nn.ModuleList` of per-task `nn.Linear` heads (each of its task's width), applied by
           a Python loop over the tasks present in the batch; `torch.optim.AdamW` (whose step
           skips parameters without a gradient, so absent heads are left alone) and gradient
           clipping. Attention-probability dropout is off, as in our encoder.

Torch runs with `torch.set_num_threads(--torch_threads)` (a list gives one timed pass per count),
JAX on its CPU backend. Step time is the median over `--steps` steps after warm-up, each awaited;
the two steps take turns batch by batch, so a shared machine's load falls on both alike. (On a
loaded 2-core machine, 2 torch threads can be many times slower than 1: OpenMP threads
spin-waiting for a core; pass `--torch_threads 1,2` to see it, and `OMP_WAIT_POLICY=PASSIVE`
in the environment to remove it.) Prints a table and writes
benchmarks/results/vs_pytorch.json.
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import load_config, long_tailed_classes, make_batches  # noqa: E402
from mtl_jax import sharding, train  # noqa: E402
from mtl_jax.model import ModelSpec  # noqa: E402


def load_sized_config(name: str, batch_size: int):
  config = load_config(name)
  if batch_size:
    config.batch_size = batch_size
  return config


def make_spec(config) -> ModelSpec:
  m, d = config.model, config.data
  return ModelSpec(vocab_size=d.vocab_size, max_positions=d.max_text_len,
                   image_dim=d.synthetic.image_dim, max_images=d.synthetic.max_images,
                   hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                   mlp_size=m.mlp_size, dropout=m.dropout)


def build_ours(config, spec, num_classes, batches):
  """Compiles our step; returns (run(i): one awaited step on batch i -> loss, info)."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  trainer = train.Trainer(config, spec, num_classes, mesh)
  state = trainer.create_state(jax.random.key(0))
  device_batches = [trainer.global_batch(b) for b in batches]
  start = time.perf_counter()
  step = trainer.jitted_train_step(1).lower(state, device_batches[0]).compile()
  info = {"compile_s": time.perf_counter() - start,
          "encoder_params": int(sum(x.size for x in jax.tree.leaves(state.params["encoder"]))),
          "head_params": int(sum(x.size for x in jax.tree.leaves(
              state.params["tasks"]["heads"])))}
  holder = [state]

  def run(i):
    holder[0], metrics = step(holder[0], device_batches[i])
    jax.block_until_ready(holder[0])
    return metrics["loss"]

  return run, info


def build_torch(config, spec, num_classes, batches):
  """The PyTorch model and optimiser; returns (run(i), info) like `build_ours`."""
  import torch  # Local: only this benchmark needs it.
  import transformers
  from torch import nn
  torch.manual_seed(0)

  class TorchMultiTask(nn.Module):
    def __init__(self):
      super().__init__()
      bert_config = transformers.BertConfig(
          vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
          num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
          intermediate_size=spec.mlp_size, hidden_act="gelu",
          hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=0.0,
          max_position_embeddings=spec.max_positions + spec.max_images, type_vocab_size=2,
          layer_norm_eps=spec.layer_norm_eps)
      self.bert = transformers.BertModel(bert_config)
      self.image_projection = nn.Linear(spec.image_dim, spec.hidden_size)
      self.heads = nn.ModuleList(nn.Linear(spec.hidden_size, int(k)) for k in num_classes)

    def forward(self, b):
      text = self.bert.embeddings.word_embeddings(b["token_ids"])
      images = self.image_projection(b["images"])
      types = torch.cat([torch.zeros_like(b["token_ids"]),
                         torch.ones_like(b["image_mask"])], dim=1)
      mask = torch.cat([b["token_mask"], b["image_mask"]], dim=1)
      pooled = self.bert(inputs_embeds=torch.cat([text, images], dim=1), attention_mask=mask,
                         token_type_ids=types).pooler_output
      loss = pooled.new_zeros(())
      for t in torch.unique(b["task_id"]).tolist():
        rows = (b["task_id"] == t).nonzero(as_tuple=True)[0]
        loss = loss + nn.functional.cross_entropy(self.heads[t](pooled[rows]), b["label"][rows],
                                                  reduction="sum")
      return loss / b["task_id"].shape[0]

  model = TorchMultiTask()
  model.train()
  opt = config.optimizer
  optimizer = torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2),
                                eps=opt.eps, weight_decay=opt.weight_decay)
  as_torch = lambda b: {k: torch.from_numpy(v).long() if v.dtype == np.int32 else
                        torch.from_numpy(v) for k, v in b.items()}
  torch_batches = [as_torch(b) for b in batches]

  def run(i):
    optimizer.zero_grad(set_to_none=True)
    loss = model(torch_batches[i])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm)
    optimizer.step()
    return loss.detach()

  encoder = sum(p.numel() for p in model.bert.parameters()) + sum(
      p.numel() for p in model.image_projection.parameters())
  info = {"encoder_params": int(encoder),
          "head_params": int(sum(p.numel() for p in model.heads.parameters()))}
  return run, info


def time_interleaved(runs, count, warmup=2):
  """Each run in turn on every batch, so a shared machine's load falls on all alike."""
  times = [[] for _ in runs]
  losses = [None] * len(runs)
  for i in range(count):
    for j, run in enumerate(runs):
      start = time.perf_counter()
      losses[j] = float(run(i))
      if i >= warmup:
        times[j].append(time.perf_counter() - start)
  return times, losses


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="mtl100:cpu,mtl100")
  parser.add_argument("--batch_size", type=int, default=64, help="0: each config's own.")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--torch_threads", default="2",
                      help="Comma-separated torch thread counts, each its own timed pass.")
  parser.add_argument("--out", default="benchmarks/results/vs_pytorch.json")
  args = parser.parse_args()
  load_before = os.getloadavg()
  import torch  # Local: only this benchmark needs it.
  rows = []
  for name in args.configs.split(","):
    config = load_sized_config(name, args.batch_size)
    spec = make_spec(config)
    num_classes = long_tailed_classes(config.data.synthetic.num_tasks, config.model.max_classes)
    batches = make_batches(args.steps + 2, spec, config.batch_size, num_classes)
    ours, ours_info = build_ours(config, spec, num_classes, batches)
    theirs, torch_info = build_torch(config, spec, num_classes, batches)
    for threads in [int(t) for t in args.torch_threads.split(",")]:
      torch.set_num_threads(threads)
      (ours_s, torch_s), (ours_loss, torch_loss) = time_interleaved(
          [ours, theirs], args.steps + 2)
      row = {"config": name, "tasks": len(num_classes), "batch_size": config.batch_size,
             "hidden": spec.hidden_size, "layers": spec.num_layers,
             "tokens": spec.max_positions + spec.max_images, "torch_threads": threads,
             "ours": {**ours_info, "step_s": ours_s, "last_loss": ours_loss},
             "torch": {**torch_info, "step_s": torch_s, "last_loss": torch_loss}}
      for key, times in (("ours", ours_s), ("torch", torch_s)):
        row[f"{key}_step_ms"] = 1e3 * float(np.median(times))
        row[f"{key}_examples_per_s"] = config.batch_size / float(np.median(times))
      row["ours_over_torch_throughput"] = (row["ours_examples_per_s"]
                                           / row["torch_examples_per_s"])
      print(f"[{name}, torch threads {threads}: {row['ours_examples_per_s']:.1f} vs "
            f"{row['torch_examples_per_s']:.1f} examples/s]", flush=True)
      rows.append(row)
  print(f"{'config':<11} {'tasks':>5} {'batch':>5} {'hidden x layers':>15} "
        f"{'encoder params (ours / torch)':>29} {'torch thr':>9} {'ours ex/s':>9} "
        f"{'torch ex/s':>10} {'ours/torch':>10}")
  for r in rows:
    print(f"{r['config']:<11} {r['tasks']:>5} {r['batch_size']:>5} "
          f"{f'''{r['hidden']} x {r['layers']}''':>15} "
          f"{f'''{r['ours']['encoder_params']:,} / {r['torch']['encoder_params']:,}''':>29} "
          f"{r['torch_threads']:>9} {r['ours_examples_per_s']:>9.1f} "
          f"{r['torch_examples_per_s']:>10.1f} "
          f"{r['ours_over_torch_throughput']:>10.2f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"args": vars(args), "device": str(jax.devices()[0]),
               "backend": jax.default_backend(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
               "load_average_before_after": [load_before[0], os.getloadavg()[0]],
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
               "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
