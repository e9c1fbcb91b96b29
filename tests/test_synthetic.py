"""The synthetic catalogue: determinism, sizes, text, image clusters, atomic writing."""
import collections
import json
import re

import numpy as np
import pytest

from mtl_jax import catalogue as cat
from mtl_jax import config_base, synthetic


def small_config(**overrides):
  c = config_base.base_config().data.synthetic
  c.num_tasks = 30
  c.min_products = 20
  c.max_products = 1500
  c.min_classes = 3
  c.max_classes = 12
  c.image_dim = 16
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.fixture
def generated(tmp_path, tiny_taxonomy):
  directory = tmp_path / "catalogue"
  stats = synthetic.generate_catalogue(directory, small_config(), taxonomy=tiny_taxonomy)
  return directory, stats


def read_split(directory, split):
  return [json.loads(l) for l in (directory / f"{split}.jsonl").read_text().splitlines()]


def test_deterministic_by_seed(tmp_path, tiny_taxonomy):
  a = synthetic.generate_catalogue(tmp_path / "a", small_config(num_tasks=8), tiny_taxonomy)
  b = synthetic.generate_catalogue(tmp_path / "b", small_config(num_tasks=8), tiny_taxonomy)
  synthetic.generate_catalogue(tmp_path / "c", small_config(num_tasks=8, seed=1), tiny_taxonomy)
  names = ["tasks.json", "image_embeddings.npy", "_COMPLETE"] + [
      f"{s}.jsonl" for s in cat.SPLITS]
  for name in names:
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  train = [(tmp_path / d / "train.jsonl").read_bytes() for d in "ac"]
  assert train[0] != train[1]
  for stats in (a, b):
    stats.pop("generation_seconds")
  assert a == b
  # A task's content does not depend on how many tasks follow it.
  d = synthetic.generate_catalogue(tmp_path / "d", small_config(num_tasks=3), tiny_taxonomy)
  assert d["tasks"] == a["tasks"][:3]


def test_sizes_are_long_tailed_within_bounds(generated):
  _, stats = generated
  sizes = np.array([sum(t["products"].values()) for t in stats["tasks"]])
  assert sizes.min() >= 20 and sizes.max() <= 1500
  assert sizes.max() > 10 * sizes.min()
  assert sizes.mean() > np.median(sizes)  # Skewed right: a long tail of large tasks.


def test_class_counts_vary_within_bounds(generated, tiny_taxonomy):
  directory, stats = generated
  table = cat.read_task_table(directory)
  counts = table.num_classes
  assert counts.min() >= 3 and counts.max() <= 12
  assert len(set(counts.tolist())) >= 4
  assert [t["num_classes"] for t in stats["tasks"]] == counts.tolist()
  assert len({t["granularity"] for t in stats["tasks"]}) == 3
  assert all(0 <= t["label_noise"] <= 0.03 for t in stats["tasks"])
  # The dry run's view of the sites, drawn without making products, is the catalogue's.
  assert synthetic.task_class_names(small_config(), tiny_taxonomy) == list(table.class_names)


def test_splits_ids_and_task_grouping(generated):
  directory, stats = generated
  table = cat.read_task_table(directory)
  ids = []
  per_split = {}
  for split in cat.SPLITS:
    records = read_split(directory, split)
    tasks = [table.task_index(r["task"]) for r in records]
    assert tasks == sorted(tasks), f"{split} is not grouped by task"
    per_split[split] = collections.Counter(r["task"] for r in records)
    ids += [r["id"] for r in records]
    assert len(records) == stats["products"][split]
  assert len(ids) == len(set(ids))
  assert all(per_split["train"][name] >= 1 for name in table.names)
  total = sum(stats["products"].values())
  assert 0.75 < stats["products"]["train"] / total < 0.85
  # The format checker accepts everything the generator writes.
  _, indices = cat.index_catalogue(directory, "fail")
  assert len(indices["train"]) == stats["products"]["train"]


def test_text_uses_taxonomy_words(generated, tiny_taxonomy):
  directory, _ = generated
  vocab = set(synthetic.load_taxonomy(tiny_taxonomy).vocab)
  for record in read_split(directory, "validation"):
    title = re.findall(r"[a-z]+", record["title"].lower())
    description = re.findall(r"[a-z]+", record["description"].lower())
    assert 4 <= len(title) <= 9  # Brand and 3-8 words.
    assert 10 <= len(description) <= 30
    assert set(title) <= vocab and set(description) <= vocab, record


def test_sites_share_the_taxonomy(generated):
  """Correlated tasks: the same leaves and departments recur across sites."""
  _, stats = generated
  departments = collections.Counter(d for t in stats["tasks"] for d in t["departments"])
  assert max(departments.values()) >= 10


def _task_images(directory, table, records):
  emb = np.load(directory / "image_embeddings.npy")
  assert emb.dtype == np.float16
  kept = [r for r in records if r["images"]]
  x = np.stack([emb[r["images"]].astype(np.float32).mean(0) for r in kept])
  task = table.task_index(kept[0]["task"])
  y = np.array([table.class_index(task, r["label"]) for r in kept])
  return x, y


def test_images_cluster_by_class_and_a_task_is_learnable(generated):
  directory, stats = generated
  table = cat.read_task_table(directory)
  # A mid-size task with a few classes.
  candidates = [t for t in stats["tasks"] if t["num_classes"] >= 4 and
                300 <= sum(t["products"].values()) <= 1500]
  task = max(candidates, key=lambda t: t["products"]["train"])["name"]
  train = [r for r in read_split(directory, "train") if r["task"] == task]
  test = [r for r in read_split(directory, "test") + read_split(directory, "validation")
          if r["task"] == task]
  x, y = _task_images(directory, table, train)

  d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  same = (y[:, None] == y[None]) & ~np.eye(len(y), dtype=bool)
  diff = y[:, None] != y[None]
  assert d[same].mean() < 0.9 * d[diff].mean()

  classes = np.unique(y)
  centroids = np.stack([x[y == c].mean(0) for c in classes])
  xt, yt = _task_images(directory, table, test)
  pred = classes[((xt[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
  accuracy = (pred == yt).mean()
  chance = np.bincount(yt).max() / len(yt)
  assert accuracy > chance + 0.2, (accuracy, chance)
  assert accuracy < 0.99  # Informative, not trivially separable.


def test_temp_dir_marker_and_reuse(tmp_path, tiny_taxonomy, monkeypatch):
  out = tmp_path / "catalogue"
  real = synthetic._task_records

  def dies_at_task_2(world, cfg, task, *args):
    if task == 2:
      raise KeyboardInterrupt  # Stands in for a kill mid-generation.
    return real(world, cfg, task, *args)

  monkeypatch.setattr(synthetic, "_task_records", dies_at_task_2)
  with pytest.raises(KeyboardInterrupt):
    synthetic.generate_catalogue(out, small_config(num_tasks=4), tiny_taxonomy)
  assert not out.exists()
  assert list(tmp_path.iterdir()) == [tiny_taxonomy]  # No temp dir left behind.
  monkeypatch.setattr(synthetic, "_task_records", real)

  stats = synthetic.generate_catalogue(out, small_config(num_tasks=4), tiny_taxonomy)
  assert cat.is_complete(out)
  assert json.loads((out / "stats.json").read_text()) == stats
  assert stats["generation_seconds"] > 0
  mtime = (out / "train.jsonl").stat().st_mtime_ns
  again = synthetic.generate_catalogue(out, small_config(num_tasks=4), tiny_taxonomy)
  assert again == stats and (out / "train.jsonl").stat().st_mtime_ns == mtime
  with pytest.raises(cat.CatalogueError, match="exists and is not a complete .* Fix: "):
    synthetic.generate_catalogue(out, small_config(num_tasks=5), tiny_taxonomy)
  other_taxonomy = tmp_path / "other.txt"
  other_taxonomy.write_text(tiny_taxonomy.read_text() + "# Edited.\n")
  with pytest.raises(cat.CatalogueError):
    synthetic.generate_catalogue(out, small_config(num_tasks=4), other_taxonomy)
  other_taxonomy.unlink()
  (out / "_COMPLETE").unlink()
  with pytest.raises(cat.CatalogueError):
    synthetic.generate_catalogue(out, small_config(num_tasks=4), tiny_taxonomy)


def test_scales_to_a_thousand_tasks(tmp_path, tiny_taxonomy):
  stats = synthetic.generate_catalogue(
      tmp_path / "c", small_config(num_tasks=1000, min_products=3, max_products=8),
      tiny_taxonomy)
  table = cat.read_task_table(tmp_path / "c")
  assert table.num_tasks == 1000 and table.names[-1] == "site0999"
  assert all(t["products"]["train"] >= 1 for t in stats["tasks"])


def test_packaged_taxonomy_parses():
  path = synthetic.default_taxonomy_path()
  text = path.read_text()
  if "@generic:" not in text or "@brands:" not in text:
    pytest.skip("mtl_jax/data/taxonomy.txt is still being written")
  tax = synthetic.load_taxonomy()
  assert len(tax.departments) >= 5 and len(tax.leaves) >= 100
  assert all(8 <= len(w) <= 14 for w in tax.leaf_words)
  assert len(tax.generic) >= 10 and len(tax.brands) >= 10
