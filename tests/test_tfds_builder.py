"""The TFDS builder and loader: prepare, reuse, round-trip, task offsets, skip counts."""
import json
import pickle

import numpy as np
import pytest

from mtl_jax import catalogue as cat
from mtl_jax import config_base, synthetic, tfds_builder

TASKS = {"t0": ["a", "b"], "t1": ["c"], "t2": ["d", "e", "f"]}


def rec(i, task, label, images=()):
  return {"id": f"id-{i}", "task": task, "label": label, "title": f"Title {i} \u00e9t\u00e9",
          "description": f"description of {i}" if i % 3 else "", "images": list(images)}


def splits():
  # Unsorted on purpose; one bad record in train and one in test.
  train = [rec(0, "t2", "d", [0]), rec(1, "t0", "a", [1, 2]), rec(2, "t1", "c"),
           rec(3, "t0", "b", [3]), rec(4, "t2", "f", [4, 5]), "not json",
           rec(5, "t0", "a"), {**rec(6, "t1", "c"), "label": "zzz"}]
  validation = [rec(10, "t1", "c", [6]), rec(11, "t0", "b")]
  test = [rec(20, "t2", "e", [7]), {**rec(21, "t9", "a")}]
  return {"train": train, "validation": validation, "test": test}


@pytest.fixture
def catalogue_dir(tmp_path, write_catalogue):
  emb = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float16)
  return write_catalogue(tmp_path / "catalogue", TASKS, splits(), embeddings=emb)


def expected(catalogue_dir, split):
  """The valid records of a split, in the order the builder must produce: by task, stable."""
  table = cat.read_task_table(catalogue_dir)
  records = []
  for r in splits()[split]:
    if isinstance(r, dict) and r["task"] in TASKS and r["label"] in TASKS[r["task"]]:
      records.append(r)
  return sorted(records, key=lambda r: table.task_index(r["task"]))


def test_prepare_load_round_trip(tmp_path, catalogue_dir):
  data_dir = tmp_path / "tfds"
  before = sorted(p.name for p in catalogue_dir.iterdir())
  c = tfds_builder.load_catalogue(catalogue_dir, data_dir, on_bad_record="skip")
  assert sorted(p.name for p in catalogue_dir.iterdir()) == before  # Writes only in data_dir.
  assert c.data_path.startswith(str(data_dir))

  table = c.task_table
  assert table == cat.read_task_table(catalogue_dir)
  emb = np.load(catalogue_dir / "image_embeddings.npy").astype(np.float32)
  for split in cat.SPLITS:
    src = c.sources[split]
    want = expected(catalogue_dir, split)
    assert len(src) == len(want)
    got = [src[i] for i in range(len(src))]
    assert src.__getitems__(list(range(len(src)))[::-1])[::-1][0]["id"] == got[0]["id"]
    for g, w in zip(got, want):
      assert isinstance(g["id"], str) and isinstance(g["title"], str)
      assert isinstance(g["description"], str)
      assert (g["id"], g["title"], g["description"]) == (w["id"], w["title"], w["description"])
      t = table.task_index(w["task"])
      assert (g["task"], g["label"]) == (t, table.class_index(t, w["label"]))
      assert g["num_images"] == len(w["images"])
      assert g["images"].shape == (2, 4) and g["images"].dtype == np.float32
      padded = np.zeros((2, 4), np.float32)
      padded[:len(w["images"])] = emb[w["images"]]
      np.testing.assert_array_equal(g["images"], padded)
    # Offsets: task t's records are off[t]:off[t+1].
    off = c.task_offsets[split]
    assert off.dtype == np.int64 and len(off) == table.num_tasks + 1 and off[-1] == len(src)
    for t in range(table.num_tasks):
      assert all(got[i]["task"] == t for i in range(off[t], off[t + 1]))
  np.testing.assert_array_equal(c.task_offsets["train"], [0, 3, 4, 6])
  np.testing.assert_array_equal(c.num_examples("validation"), [1, 1, 0])

  assert c.skipped["train"] == {cat.UNKNOWN_TASK: {"not_json": 1}, "t1": {"unknown_label": 1}}
  assert c.skipped["test"] == {cat.UNKNOWN_TASK: {"unknown_task": 1}}
  assert c.skipped["validation"] == {}
  on_disk = json.loads((tfds_builder.Path(c.data_path) / tfds_builder.SKIPPED_FILE).read_text())
  assert on_disk == c.skipped


def test_second_load_does_not_prepare_again(tmp_path, catalogue_dir, monkeypatch):
  data_dir = tmp_path / "tfds"
  first = tfds_builder.load_catalogue(catalogue_dir, data_dir, on_bad_record="skip")

  def fail(*args, **kwargs):
    raise AssertionError("prepared again")

  monkeypatch.setattr(tfds_builder.ProductCatalogue, "download_and_prepare", fail)
  second = tfds_builder.load_catalogue(catalogue_dir, data_dir, on_bad_record="skip")
  assert second.data_path == first.data_path
  assert second.task_table == first.task_table and second.skipped == first.skipped
  for split in cat.SPLITS:
    np.testing.assert_array_equal(second.task_offsets[split], first.task_offsets[split])
  assert second.sources["train"][0]["id"] == first.sources["train"][0]["id"]


def test_fail_policy_raises_and_leaves_nothing_prepared(tmp_path, catalogue_dir):
  data_dir = tmp_path / "tfds"
  with pytest.raises(cat.BadRecordError, match=r"train\.jsonl line 6, field '<line>'"):
    tfds_builder.load_catalogue(catalogue_dir, data_dir, on_bad_record="fail")
  assert not list(data_dir.glob("product_catalogue/*/1.0.0/dataset_info.json"))


def test_changed_catalogue_is_prepared_anew(tmp_path, catalogue_dir):
  data_dir = tmp_path / "tfds"
  first = tfds_builder.load_catalogue(catalogue_dir, data_dir, on_bad_record="skip")
  with open(catalogue_dir / "validation.jsonl", "a") as f:
    f.write(json.dumps(rec(30, "t2", "f")) + "\n")
  second = tfds_builder.load_catalogue(catalogue_dir, data_dir, on_bad_record="skip")
  assert second.data_path != first.data_path
  assert len(second.sources["validation"]) == len(first.sources["validation"]) + 1


def test_synthetic_catalogue_loads(tmp_path, tiny_taxonomy):
  cfg = config_base.base_config().data.synthetic
  cfg.num_tasks, cfg.max_products, cfg.max_classes = 4, 200, 8
  stats = synthetic.generate_catalogue(tmp_path / "cat", cfg, tiny_taxonomy)
  c = tfds_builder.load_catalogue(tmp_path / "cat", tmp_path / "tfds")
  for split in cat.SPLITS:
    assert len(c.sources[split]) == stats["products"][split]
    np.testing.assert_array_equal(
        c.num_examples(split), [t["products"][split] for t in stats["tasks"]])
  assert c.sources["train"][0]["images"].shape == (cfg.max_images, cfg.image_dim)


def test_empty_split_gives_an_empty_source(tmp_path, write_catalogue):
  directory = write_catalogue(tmp_path / "cat", {"t": ["x"]}, {
      "train": [rec(0, "t", "x", [0])], "validation": [rec(1, "t", "x")], "test": []})
  c = tfds_builder.load_catalogue(directory, tmp_path / "tfds")
  assert len(c.sources["test"]) == 0 and c.sources["test"].__getitems__([]) == []
  np.testing.assert_array_equal(c.task_offsets["test"], [0, 0])
  assert len(c.sources["train"]) == 1


def test_sources_pickle(tmp_path, catalogue_dir):
  """Data-loader worker processes receive the sources by pickle."""
  c = tfds_builder.load_catalogue(catalogue_dir, tmp_path / "tfds", on_bad_record="skip")
  src = pickle.loads(pickle.dumps(c.sources["train"]))
  assert len(src) == len(c.sources["train"]) and src[2]["id"] == c.sources["train"][2]["id"]
