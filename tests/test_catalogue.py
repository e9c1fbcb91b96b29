"""The catalogue format: task table, record validation under both policies, task grouping."""
import json

import numpy as np
import pytest

from mtl_jax import catalogue as cat

TASKS = {"shop-a": ["Boots", "Sneakers", "Sandals"], "shop-b": ["Pans", "Kettles"]}


def rec(i, task="shop-a", label="Boots", **overrides):
  r = {"id": f"r{i}", "task": task, "label": label, "title": f"Product {i}",
       "description": "A fine product.", "images": [i % 10]}
  r.update(overrides)
  return r


def good_splits():
  return {
      "train": [rec(0), rec(1, label="Sneakers"), rec(2, "shop-b", "Pans"),
                rec(3, "shop-b", "Kettles")],
      "validation": [rec(4), rec(5, "shop-b", "Pans")],
      "test": [rec(6, label="Sandals"), rec(7, "shop-b", "Kettles")],
  }


def drop(r, key):
  r = dict(r)
  del r[key]
  return r


# (case name, split, bad line, reason, field, task the skip is counted under)
BAD = [
    ("not_json", "train", '{"id": "x", "task": ', "not_json", "<line>", cat.UNKNOWN_TASK),
    ("not_object", "train", "[1, 2, 3]", "not_object", "<line>", cat.UNKNOWN_TASK),
    ("missing_title", "train", drop(rec(90), "title"), "missing_title", "title", "shop-a"),
    ("empty_title", "validation", rec(90, title="  "), "missing_title", "title", "shop-a"),
    ("missing_id", "train", drop(rec(90), "id"), "missing_id", "id", "shop-a"),
    ("unknown_task", "test", rec(90, task="shop-z"), "unknown_task", "task", cat.UNKNOWN_TASK),
    ("unknown_label", "train", rec(90, "shop-b", "Boots"), "unknown_label", "label", "shop-b"),
    ("image_out_of_range", "train", rec(90, images=[3, 10]), "image_out_of_range", "images",
     "shop-a"),
    ("negative_image", "test", rec(90, images=[-1]), "image_out_of_range", "images", "shop-a"),
    ("too_many_images", "train", rec(90, images=[1, 2, 3]), "too_many_images", "images",
     "shop-a"),
    ("bad_images", "train", rec(90, images="1,2"), "bad_images", "images", "shop-a"),
    ("nonfinite_image", "train", rec(90, images=[9]), "nonfinite_image", "images", "shop-a"),
    ("duplicate_id_within", "train", rec(0, label="Sneakers"), "duplicate_id", "id", "shop-a"),
    ("duplicate_id_across", "test", rec(0, "shop-b", "Pans"), "duplicate_id", "id", "shop-b"),
]


def bad_catalogue(tmp_path, write_catalogue, split, line):
  splits = good_splits()
  splits[split] = splits[split][:1] + [line] + splits[split][1:]  # The bad record is line 2.
  emb = np.ones((10, 4), np.float32)
  emb[9, 2] = np.nan  # Good records use rows 0..7.
  return write_catalogue(tmp_path / "cat", TASKS, splits, embeddings=emb)


@pytest.mark.parametrize("case,split,line,reason,field,task", BAD, ids=[b[0] for b in BAD])
def test_bad_record_fails_naming_file_line_field(tmp_path, write_catalogue, case, split, line,
                                                   reason, field, task):
  directory = bad_catalogue(tmp_path, write_catalogue, split, line)
  with pytest.raises(cat.BadRecordError) as e:
    cat.index_catalogue(directory, "fail")
  err = e.value
  assert isinstance(err, cat.CatalogueError) and isinstance(err, ValueError)
  assert (err.reason, err.field, err.line, err.task) == (reason, field, 2, task)
  message = str(err)
  assert f"{split}.jsonl line 2" in message
  assert f"field '{field}'" in message
  assert "Fix:" in message


@pytest.mark.parametrize("case,split,line,reason,field,task", BAD, ids=[b[0] for b in BAD])
def test_bad_record_skipped_and_counted(tmp_path, write_catalogue, case, split, line, reason,
                                        field, task):
  directory = bad_catalogue(tmp_path, write_catalogue, split, line)
  validator, indices = cat.index_catalogue(directory, "skip")
  assert validator.skipped[split] == {task: {reason: 1}}
  for s in cat.SPLITS:
    assert len(indices[s]) == len(good_splits()[s])
    if s != split:
      assert validator.skipped[s] == {}


def test_empty_or_missing_description_and_images_are_allowed(tmp_path, write_catalogue):
  splits = good_splits()
  splits["train"] += [rec(20, description=""), drop(drop(rec(21), "description"), "images"),
                      rec(22, images=[])]
  directory = write_catalogue(tmp_path / "cat", TASKS, splits)
  _, indices = cat.index_catalogue(directory)
  records = list(cat.iter_records(directory, "train", indices["train"],
                                  cat.read_task_table(directory)))
  by_id = {r.id: r for r in records}
  assert by_id["r20"].description == "" and by_id["r21"].description == ""
  assert by_id["r21"].images == () and by_id["r22"].images == ()


def test_blank_lines_are_ignored(tmp_path, write_catalogue):
  splits = good_splits()
  splits["train"].insert(1, "   ")
  directory = write_catalogue(tmp_path / "cat", TASKS, splits)
  _, indices = cat.index_catalogue(directory)
  assert len(indices["train"]) == 4


@pytest.mark.parametrize("policy", cat.POLICIES)
def test_wrong_embedding_dimension_is_a_file_error(tmp_path, write_catalogue, policy):
  directory = write_catalogue(tmp_path / "cat", TASKS, good_splits(),
                              embeddings=np.zeros((10, 5), np.float32))
  with pytest.raises(cat.CatalogueError, match=r"image_embeddings\.npy, field 'shape'.*Fix:"):
    cat.index_catalogue(directory, policy)


def test_pickled_embeddings_are_refused(tmp_path, write_catalogue):
  directory = write_catalogue(tmp_path / "cat", TASKS, good_splits())
  np.save(directory / cat.EMBEDDINGS_FILE, np.array([{"a": 1}], dtype=object))
  with pytest.raises(cat.CatalogueError, match="not a plain .npy"):
    cat.index_catalogue(directory)


@pytest.mark.parametrize("policy", cat.POLICIES)
def test_task_without_training_records(tmp_path, write_catalogue, policy):
  splits = good_splits()
  # shop-b's only training records: one valid under no policy, one bad.
  splits["train"] = [rec(0), rec(2, "shop-b", "Boots")]
  directory = write_catalogue(tmp_path / "cat", TASKS, splits)
  with pytest.raises(cat.CatalogueError) as e:
    cat.index_catalogue(directory, policy)
  message = str(e.value)
  if policy == "fail":
    assert "field 'label'" in message  # The bad record comes first.
  else:
    assert "train.jsonl" in message and "'shop-b'" in message and "field 'task'" in message
    assert "no valid training records (1 of its training records were skipped" in message


def test_missing_split_file(tmp_path, write_catalogue):
  directory = write_catalogue(tmp_path / "cat", TASKS, good_splits())
  (directory / "test.jsonl").unlink()
  with pytest.raises(cat.CatalogueError, match=r"test\.jsonl: missing"):
    cat.index_catalogue(directory)


@pytest.mark.parametrize("mutate,field", [
    (lambda t: t["tasks"].append({"name": "shop-a", "classes": ["X"]}), "tasks[2].name"),
    (lambda t: t["tasks"][1]["classes"].append("Pans"), "tasks[1].classes[2]"),
    (lambda t: t["tasks"][0].update(classes=[]), "tasks[0].classes"),
    (lambda t: t["tasks"][0].pop("classes"), "tasks[0].classes"),
    (lambda t: t.pop("image_dim"), "image_dim"),
    (lambda t: t.pop("tasks"), "tasks"),
    (lambda t: t.update(max_images=-1), "max_images"),
    (lambda t: t.update(format_version=2), "format_version"),
], ids=["duplicate_task", "duplicate_class", "empty_classes", "missing_classes",
        "missing_image_dim", "missing_tasks", "negative_max_images", "format_version"])
def test_bad_task_table(tmp_path, write_catalogue, mutate, field):
  directory = write_catalogue(tmp_path / "cat", TASKS, good_splits())
  table = json.loads((directory / "tasks.json").read_text())
  mutate(table)
  (directory / "tasks.json").write_text(json.dumps(table))
  with pytest.raises(cat.CatalogueError) as e:
    cat.read_task_table(directory)
  assert "tasks.json" in str(e.value)
  assert f"field '{field}'" in str(e.value)
  assert "Fix:" in str(e.value)


def test_task_table():
  table = cat.TaskTable(names=["a", "b"], class_names=[["x", "y", "z"], ["u"]], image_dim=8,
                        max_images=2)
  assert table.num_tasks == 2
  np.testing.assert_array_equal(table.num_classes, [3, 1])
  assert table.num_classes.dtype == np.int32
  assert table.task_index("b") == 1 and table.class_index(0, "z") == 2
  with pytest.raises(KeyError, match="Unknown task 'c'"):
    table.task_index("c")
  again = cat.TaskTable.from_json(json.dumps(table.to_json()))
  assert again == table and hash(again) == hash(table)
  with pytest.raises(cat.CatalogueError, match="duplicate task name"):
    cat.TaskTable(names=["a", "a"], class_names=[["x"], ["y"]], image_dim=1, max_images=0)


def test_unsorted_records_come_out_grouped_by_task(tmp_path, write_catalogue):
  tasks = {"t0": ["a", "b"], "t1": ["a"], "t2": ["c", "d"]}
  order = ["t2", "t0", "t1", "t0", "t2", "t1", "t0", "t2"]
  train = [rec(i, task=t, label=tasks[t][0], title=f"title {i}") for i, t in enumerate(order)]
  splits = {"train": train, "validation": [rec(50, "t1", "a"), rec(51, "t0", "b")],
            "test": [rec(60, "t2", "d")]}
  directory = write_catalogue(tmp_path / "cat", tasks, splits)
  _, indices = cat.index_catalogue(directory)
  table = cat.read_task_table(directory)
  records = list(cat.iter_records(directory, "train", indices["train"], table))
  tasks_out = [r.task for r in records]
  assert tasks_out == sorted(tasks_out)
  # Within a task, file order.
  assert [r.id for r in records] == ["r1", "r3", "r6", "r2", "r5", "r0", "r4", "r7"]
  np.testing.assert_array_equal(indices["train"].task_offsets, [0, 3, 5, 8])
  np.testing.assert_array_equal(indices["validation"].task_offsets, [0, 1, 2, 2])
  np.testing.assert_array_equal(indices["test"].task_offsets, [0, 0, 0, 1])
  assert records[0].title == "title 1" and records[0].label == 0


def test_gather_images_pads_to_max_images():
  emb = np.arange(12, dtype=np.float16).reshape(4, 3)
  out = cat.gather_images((2, 0), emb, 3)
  assert out.dtype == np.float32 and out.shape == (3, 3)
  np.testing.assert_array_equal(out, [[6, 7, 8], [0, 1, 2], [0, 0, 0]])
