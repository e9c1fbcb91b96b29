"""The encoder's matmuls alone, JAX (XLA's CPU backend) beside PyTorch, in one process.

  python benchmarks/matmul_layouts.py [--tokens 2176] [--hidden 128] [--mlp 512] [--rounds 5]

Where the train step's time goes on CPU is mostly its matmuls (`profile_step.py`). This times
them one by one at the issue 14.6 shapes (64 examples x 34 tokens = 2176 rows, hidden 128, MLP
512), in the two forms a training step needs:
- *forward* `X @ W` (X [tokens, in], W [in, out]), also the form of the input gradient;
- *weight gradient* `X.T @ G` (G [tokens, out]): both operands have the summed dimension first.
For each, JAX's `jit` and torch (`torch.set_num_threads(threads)`) take turns: `--rounds`
rounds of `--repeats` awaited calls each, median of the round medians. Each round starts after
`--pause` seconds of rest, so that the other side's worker threads, which spin for a while after
their last call, have stopped competing for the cores. The JSON also records
whether XLA compiled the weight-gradient form with a transpose or copy of an operand
(`xla_copies_an_operand`). Prints a table and writes benchmarks/results/matmul_layouts.json.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402


def shapes(hidden: int, mlp: int) -> list:
  """(name, form, in, out): each dense layer of an encoder layer, once per form."""
  layers = [("query/key/value/out", hidden, hidden), ("mlp_in", hidden, mlp),
            ("mlp_out", mlp, hidden)]
  return [(name, form, i, o) for form in ("forward", "weight gradient")
          for name, i, o in layers]


def _median_ms(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", type=int, default=64 * 34)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--mlp", type=int, default=512)
  parser.add_argument("--threads", type=int, default=2, help="torch's intra-op threads.")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--pause", type=float, default=0.5,
                      help="Seconds of rest before each side's round.")
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "matmul_layouts.json"))
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  meta = common.run_metadata(None if argv is None else ["benchmarks/matmul_layouts.py", *argv])
  rng = np.random.default_rng(0)
  rows = []
  for name, form, d_in, d_out in shapes(args.hidden, args.mlp):
    x = rng.standard_normal((args.tokens, d_in), np.float32)
    other = rng.standard_normal(
        (d_in, d_out) if form == "forward" else (args.tokens, d_out), np.float32)
    product = (lambda a, b: a @ b) if form == "forward" else (lambda a, b: a.T @ b)
    jx, jo = jax.device_put(x), jax.device_put(other)
    compiled = jax.jit(product).lower(jx, jo).compile()
    hlo = compiled.as_text()
    tx, to = torch.from_numpy(x), torch.from_numpy(other)
    np.testing.assert_allclose(np.asarray(compiled(jx, jo)), product(tx, to).numpy(),
                               rtol=1e-3, atol=1e-2)
    sides = {"jax": lambda: compiled(jx, jo).block_until_ready(),
             "torch": lambda: product(tx, to)}
    for fn in sides.values():
      fn()
    rounds = {side: [] for side in sides}
    for _ in range(args.rounds):
      for side, fn in sides.items():
        time.sleep(args.pause)  # the other side's idle threads stop spinning first
        rounds[side].append(_median_ms(fn, args.repeats))
    flops = 2 * args.tokens * d_in * d_out
    ms = {side: float(np.median(r)) for side, r in rounds.items()}
    rows.append({"layer": name, "form": form, "shape": f"{args.tokens}x{d_in}x{d_out}",
                 "flops": flops, "round_ms": rounds, "ms": ms,
                 "gflops": {s: flops / (m * 1e6) for s, m in ms.items()},
                 "torch_over_jax_time": ms["torch"] / ms["jax"],
                 "xla_copies_an_operand": " transpose(" in hlo or " copy(" in hlo})
  print(common.fmt_table(
      ["layer", "form", "rows x in x out", "jax ms", "torch ms", "jax GFLOP/s",
       "torch GFLOP/s", "jax speed / torch", "XLA copies an operand"],
      [[r["layer"], r["form"], r["shape"], f"{r['ms']['jax']:.3f}", f"{r['ms']['torch']:.3f}",
        f"{r['gflops']['jax']:.0f}", f"{r['gflops']['torch']:.0f}",
        f"{r['torch_over_jax_time']:.2f}", "yes" if r["xla_copies_an_operand"] else "no"]
       for r in rows]))
  common.write_result(args.out, meta, args=vars(args), jax=jax.__version__,
                      torch=torch.__version__, rows=rows)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
