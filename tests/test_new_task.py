"""Adding a task to a trained model: only the new task's rows change, old outputs stay
bit-identical, the grown run serves predictions, and (slow) the new head learns."""
import collections
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from mtl_jax import catalogue as cat
from mtl_jax import new_task, predict, task_layers, train, workdir as workdir_lib
from tests.helpers import tiny_config
from tests.trained_run import tiny_run


def mirror_catalogue(source_dir, out_dir, task, suffix="-mirror", image_dim=None):
  """A one-task catalogue: `task` of `source_dir` under a new name (a new website that sells
  what an old one sells, with the same category names)."""
  os.makedirs(out_dir)
  table = json.loads((source_dir / cat.TASKS_FILE).read_text())
  table["tasks"] = [{"name": t["name"] + suffix, "classes": t["classes"]}
                    for t in table["tasks"] if t["name"] == task]
  if image_dim is not None:
    table["image_dim"] = image_dim
  (out_dir / cat.TASKS_FILE).write_text(json.dumps(table))
  for split in cat.SPLITS:
    lines = []
    for line in (source_dir / cat.split_file(split)).read_text().splitlines():
      record = json.loads(line)
      if record["task"] == task:
        record.update(task=task + suffix, id=record["id"] + suffix)
        lines.append(json.dumps(record) + "\n")
    (out_dir / cat.split_file(split)).write_text("".join(lines))
  embeddings = np.load(source_dir / cat.EMBEDDINGS_FILE)
  if image_dim is not None:
    embeddings = np.zeros((len(embeddings), image_dim), np.float16)
  np.save(out_dir / cat.EMBEDDINGS_FILE, embeddings)
  return out_dir


def input_records(catalogue_dir, split="test"):
  """A catalogue split as prediction input (embedding vectors instead of row indices)."""
  embeddings = np.load(catalogue_dir / cat.EMBEDDINGS_FILE).astype(np.float32)
  records = []
  for line in (catalogue_dir / cat.split_file(split)).read_text().splitlines():
    record = json.loads(line)
    record["images"] = [embeddings[i].tolist() for i in record["images"]]
    records.append(record)
  return records


def restored_state(workdir):
  mngr = ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", item_names=("state", "meta"))
  step = mngr.latest_step()
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  mngr.close()
  return step, restored.state, restored.meta


def _leaves(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
  workdir = tiny_run(tmp_path_factory)
  mirror = mirror_catalogue(workdir / "catalogue",
                            tmp_path_factory.mktemp("new_task") / "mirror", "site0003")
  return {"workdir": workdir, "mirror": mirror,
          "old_records": input_records(workdir / "catalogue"),
          "new_records": input_records(mirror)}


@pytest.fixture(scope="module", params=[False, True], ids=["head", "head_and_adapter"])
def grown(request, old_run, tmp_path_factory):
  with_adapter = request.param
  new_workdir = tmp_path_factory.mktemp("grown") / "run"
  results = new_task.add_task(old_run["workdir"], new_workdir, old_run["mirror"], steps=8,
                              with_adapter=with_adapter, learning_rate=1e-2, log_every=4)
  return {"workdir": new_workdir, "results": results, "with_adapter": with_adapter}


def test_other_tasks_predictions_are_bit_identical(old_run, grown):
  before = predict.Predictor.from_workdir(old_run["workdir"], batch_size=32)
  after = predict.Predictor.from_workdir(grown["workdir"], batch_size=32)
  records = old_run["old_records"]
  for a, b in zip(before.probabilities(records), after.probabilities(records)):
    np.testing.assert_array_equal(a, b)
  # The same products in a batch shared with the new task's products: still identical.
  mixed = records[:10] + old_run["new_records"][:10]
  for a, b in zip(before.probabilities(records[:10]), after.probabilities(mixed)[:10]):
    np.testing.assert_array_equal(a, b)
  before.close()
  after.close()


def test_only_the_new_rows_changed_in_the_checkpoint(old_run, grown):
  old_step, old, old_meta = restored_state(old_run["workdir"])
  new_step, new, meta = restored_state(grown["workdir"])
  assert new_step == old_step + 8
  num_old = old_meta["num_tasks"]
  assert meta["num_tasks"] == num_old + 1
  table = cat.TaskTable.from_json(meta["task_table"])
  assert table.names[-1] == "site0003-mirror" and table.names[:-1] == tuple(
      cat.TaskTable.from_json(old_meta["task_table"]).names)
  assert meta["added_tasks"][-1]["tasks"] == ["site0003-mirror"]
  assert meta["added_tasks"][-1]["with_adapter"] == grown["with_adapter"]

  for frozen in ("params/encoder", "opt_state"):
    node_old, node_new = old, new
    for k in frozen.split("/"):
      node_old, node_new = node_old[k], node_new[k]
    old_leaves, new_leaves = _leaves(node_old), _leaves(node_new)
    assert old_leaves.keys() == new_leaves.keys() and old_leaves
    for key, value in old_leaves.items():
      np.testing.assert_array_equal(new_leaves[key], value, f"{frozen}{key}")
  model = json.loads(meta["config"])["model"]
  layout = task_layers.HeadLayout.for_classes(new["num_classes"], model["classes_per_block"],
                                              model["max_classes"])
  added = layout.task_rows(num_old)  # The new task's head blocks; every other row is kept.
  for part in ("heads", "adapters"):
    for tree in ("params", "task_opt_state"):
      node_old = old[tree]["tasks"][part] if tree == "params" else old[tree][part]
      node_new = new[tree]["tasks"][part] if tree == "params" else new[tree][part]
      old_rows, new_rows = _leaves(node_old), _leaves(node_new)
      for key, value in old_rows.items():
        kept = np.setdiff1d(np.arange(len(value)), added) if part == "heads" else slice(None)
        np.testing.assert_array_equal(new_rows[key][:len(value)][kept], value[kept],
                                      f"{tree}/{part}{key}")
  assert np.all(new["task_opt_state"]["heads"]["count"][added] == 8)
  np.testing.assert_array_equal(new["num_classes"], np.append(old["num_classes"],
                                                              old["num_classes"][3]))

  old_slots = old_meta["num_adapter_slots"]
  if grown["with_adapter"]:
    assert meta["num_adapter_slots"] == old_slots + 1
    assert new["adapter_map"][-1] == old_slots
    assert new["task_opt_state"]["adapters"]["count"][-1] == 8
    assert np.any(new["params"]["tasks"]["adapters"]["up"][-1] != 0)  # Trained from zero.
  else:
    assert meta["num_adapter_slots"] == old_slots
    assert new["adapter_map"][-1] == 0
  np.testing.assert_array_equal(new["adapter_map"][:-1], old["adapter_map"])


def test_the_grown_run_predicts_the_new_task_by_its_class_names(old_run, grown):
  predictor = predict.Predictor.from_workdir(grown["workdir"])
  classes = predictor.task_table.class_names[-1]
  out = predictor.predict(old_run["new_records"][:5], top_k=None)
  for result in out:
    assert result["task"] == "site0003-mirror"
    assert sorted(p["label"] for p in result["predictions"]) == sorted(classes)
    assert sum(p["probability"] for p in result["predictions"]) == pytest.approx(1, abs=1e-5)
  predictor.close()
  report = json.loads((grown["workdir"] / "reports" / "test.json").read_text())
  assert [r["task"] for r in report["tasks"]] == ["site0003-mirror"]
  assert report["tasks"][0]["eval_examples"] == len(old_run["new_records"])
  page = (grown["workdir"] / "reports" / "report.html").read_text()  # As every run writes.
  assert "site0003-mirror" in page


def test_bad_new_catalogues_and_workdirs_are_refused(old_run, tmp_path):
  clash = mirror_catalogue(old_run["workdir"] / "catalogue", tmp_path / "clash", "site0001",
                           suffix="")
  with pytest.raises(cat.CatalogueError, match=r"'site0001'\] are already tasks of the model"):
    new_task.add_task(old_run["workdir"], tmp_path / "a", clash, steps=1)
  narrow = mirror_catalogue(old_run["workdir"] / "catalogue", tmp_path / "narrow", "site0001",
                            image_dim=16)
  with pytest.raises(cat.CatalogueError, match=r"field 'image_dim': 16.*32-wide"):
    new_task.add_task(old_run["workdir"], tmp_path / "b", narrow, steps=1)
  with pytest.raises(workdir_lib.RunDirError, match="is the old run.s workdir"):
    new_task.add_task(old_run["workdir"], old_run["workdir"], old_run["mirror"], steps=1)


def test_a_workdir_that_already_holds_a_checkpoint_is_refused(old_run, grown):
  with pytest.raises(workdir_lib.RunDirError, match="already holds a checkpoint"):
    new_task.add_task(old_run["workdir"], grown["workdir"], old_run["mirror"], steps=1)


def test_a_run_with_shared_holdout_is_refused_before_anything_is_written(old_run, tmp_path):
  workdir = tmp_path / "shared"
  train.train_and_evaluate(tiny_config(**{
      "total_steps": 2, "eval_every": 2, "checkpoint_every": 2, "eval.holdout_classes": 1,
      "eval.holdout_mode": "shared",
      "data.catalogue_dir": str(old_run["workdir"] / "catalogue")}), str(workdir))
  with pytest.raises(workdir_lib.RunDirError, match="holdout_mode='shared' is not supported"):
    new_task.add_task(workdir, tmp_path / "grown", old_run["mirror"], steps=1)
  assert not (tmp_path / "grown").exists()


@pytest.mark.slow
def test_the_new_head_learns_well_above_chance(tmp_path):
  """On an encoder trained 200 steps, a new website selling what site0003 sells: its head alone
  (encoder frozen) must classify its held-out products far better than chance and than always
  predicting its most frequent class."""
  config = tiny_config(total_steps=200, eval_every=200, checkpoint_every=200, log_every=50)
  train.train_and_evaluate(config, str(tmp_path / "old"))
  mirror = mirror_catalogue(tmp_path / "old" / "catalogue", tmp_path / "mirror", "site0003")
  results = new_task.add_task(tmp_path / "old", tmp_path / "new", mirror, steps=150,
                              learning_rate=1e-2)
  rows = [results["rows"][s][0] for s in ("validation", "test")]
  count = sum(r["eval_examples"] for r in rows)
  accuracy = sum(r["accuracy"] * r["eval_examples"] for r in rows) / count
  labels = collections.Counter(
      json.loads(line)["label"] for s in ("validation", "test")
      for line in (mirror / cat.split_file(s)).read_text().splitlines())
  majority = max(labels.values()) / count
  chance = rows[0]["chance"]
  assert accuracy >= 2 * chance and accuracy >= majority + 0.1, (accuracy, chance, majority)
