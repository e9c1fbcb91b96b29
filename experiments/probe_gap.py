"""Why a multi-task run loses to the linear probe: the probe refitted on the run's own features.

  python experiments/probe_gap.py [--run runs/experiments/real_embeddings/mtl/<run>]

For one finished run (its best checkpoint by default) on a catalogue of precomputed embeddings,
the library's per-task linear probe (`linear_probe.fit_tasks`, its L-BFGS solver and L2 grid,
the penalty chosen per task on validation by `select_l2`) is fitted on three inputs of the same
products, each standardised per task as the probe does:

- `refit`: the run's head inputs (its pooled state after any adapter), a refit of every head on
  the frozen encoder;
- `refit+emb`: those and the product's image embedding (the mean of its rows) side by side;
- `probe`: the embedding alone, the built-in probe (`single_task --kind=linear_probe
  --text_features=none`).

Beside them the run's own accuracy on the train split and on `--split`. How to read it: a refit
above the run means its heads were undertrained; a refit below the probe means the encoder's
features lost what the probe uses; a run at 1.000 on train while behind on `--split` memorises.
`--split validation` (the default) is optimistic for the three fits alike: validation picks their
penalty.

Prints the table and writes experiments/results/probe_gap.json.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from mtl_jax import input_pipeline  # noqa: E402
from mtl_jax import linear_probe  # noqa: E402
from mtl_jax import steps  # noqa: E402
from mtl_jax import workdir as workdir_lib  # noqa: E402

FEATURE_SETS = ("refit", "refit+emb", "probe")


def split_outputs(run, arrays, catalogue, split: str) -> dict:
  """The run's logits, head inputs ("features"), labels and tasks on `split`, and each
  product's image embedding ("embedding": the mean of its rows, as the probe reads it)."""
  embeddings = []

  def batches():
    for batch in input_pipeline.eval_batches(catalogue, split, run.tokenizer, run.config):
      mask = batch["image_mask"][..., None].astype(np.float32)
      mean = (batch["images"] * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
      embeddings.append(mean[batch["example_mask"].astype(bool)])
      yield batch

  outs = list(steps.evaluate_batches(run.model, arrays.params, arrays.adapter_map, batches(),
                                     with_features=True))
  out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  out["embedding"] = np.concatenate(embeddings)
  return out


def _accuracy(logits, labels, trained: int) -> float | None:
  """Accuracy over the examples of trained classes, argmax over those classes."""
  seen = labels < trained
  if not seen.any():
    return None
  return float((logits[seen, :trained].argmax(-1) == labels[seen]).mean())


def measure(workdir: str, split: str = "validation", step="best",
            l2_grid=linear_probe.DEFAULT_L2_GRID) -> dict:
  """Per task: the run's train and `split` accuracy and the three fits' `split` accuracy."""
  run, arrays = common.read_run(workdir, step)
  catalogue, _ = common.prepare_data(run.config, os.fspath(run.workdir))
  trained = np.asarray(jax.device_get(arrays.num_classes))
  names = list(run.task_table.names)
  data = {s: split_outputs(run, arrays, catalogue, s) for s in dict.fromkeys(
      ("train", "validation", split))}
  rows_of = {s: linear_probe.rows_by_task(d["task_id"], len(names)) for s, d in data.items()}
  inputs = {"refit": lambda d: d["features"], "probe": lambda d: d["embedding"],
            "refit+emb": lambda d: np.concatenate([d["features"], d["embedding"]], 1)}
  rows = [{"task": n, "train_products": len(rows_of["train"][t]),
           "run_train": _accuracy(data["train"]["logits"][rows_of["train"][t]],
                                  data["train"]["label"][rows_of["train"][t]], trained[t]),
           "run": _accuracy(data[split]["logits"][rows_of[split][t]],
                            data[split]["label"][rows_of[split][t]], trained[t])}
          for t, n in enumerate(names)]
  for name in FEATURE_SETS:
    x = {s: inputs[name](d) for s, d in data.items()}
    train, val = rows_of["train"], rows_of["validation"]
    labels = data["train"]["label"]
    # One fit scores the validation rows (to pick the penalty) and then `split`'s.
    logits, _, _ = linear_probe.fit_tasks(
        [x["train"][r] for r in train], [labels[r] for r in train],
        [(labels[r] < trained[t]).astype(np.float32) for t, r in enumerate(train)],
        [np.concatenate([x["validation"][val[t]]] + ([x[split][rows_of[split][t]]]
                                                       if split != "validation" else []))
         for t in range(len(names))],
        list(trained), int(trained.max()), l2_grid)
    for t, row in enumerate(rows):
      n_val = len(val[t])
      best, _ = linear_probe.select_l2(logits[t][:, :n_val], data["validation"]["label"][val[t]],
                                       int(trained[t]), l2_grid)
      split_logits = logits[t][best, :n_val] if split == "validation" else \
          logits[t][best, n_val:]
      row[name] = _accuracy(split_logits, data[split]["label"][rows_of[split][t]], trained[t])
      row[f"{name}_l2"] = float(l2_grid[best])
  return {"run": os.fspath(run.workdir), "step": run.step, "split": split, "rows": rows,
          "means": {k: float(np.mean([r[k] for r in rows if r[k] is not None]))
                    for k in ("run_train", "run", *FEATURE_SETS)}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", default=None, help="A finished multi-task run's workdir "
                      "(default: the first multi-task run in experiments/results/"
                      "real_embeddings.json, seed 0 of the last real_embeddings.py).")
  parser.add_argument("--split", choices=("validation", "test"), default="validation")
  parser.add_argument("--step", default="best", help="A checkpoint step, 'latest' or 'best'.")
  parser.add_argument("--out", default=common.default_out("probe_gap"))
  args = parser.parse_args()
  if args.run is None:
    with open(common.default_out("real_embeddings")) as f:
      args.run = json.load(f)["runs"]["mtl"][0]
  try:
    result = measure(args.run, args.split, args.step)
  except workdir_lib.RunDirError as e:
    sys.exit(f"error: {e} (experiments/real_embeddings.py trains such runs)")
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  table = [[r["task"][:34], str(r["train_products"]), fmt(r["run_train"]), fmt(r["run"]),
            *(fmt(r[k]) for k in FEATURE_SETS)] for r in
           sorted(result["rows"], key=lambda r: -r["train_products"])]
  table.append(["mean", "", *(fmt(result["means"][k]) for k in ("run_train", "run",
                                                                 *FEATURE_SETS))])
  print(f"{args.split} accuracy of {result['run']} (step {result['step']}) and of the probe "
        "refitted on its features:")
  print(common.format_table(["task", "train", "run (train)", "run", *FEATURE_SETS], table))
  common.write_json(args.out, {**common.run_metadata(), **result})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
