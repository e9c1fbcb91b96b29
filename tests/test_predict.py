"""Prediction from a saved run whose training data is gone: a tiny run is trained, its reference
outputs are computed through the training code path, then its catalogue and prepared data are
deleted and `mtl_jax.predict` must reproduce them from the workdir alone."""
import json
import shutil

import numpy as np
import pytest

from mtl_jax import catalogue as cat
from mtl_jax import checkpointing, input_pipeline, predict, sharding, state as state_lib, steps
from mtl_jax import tfds_builder, workdir as workdir_lib
from mtl_jax import tokenizer as tokenizer_lib
from tests.helpers import tiny_config
from tests.trained_run import copy_run, tiny_run


def _as_input(example, table):
  """A prepared catalogue example -> a prediction input record (images as vectors)."""
  return {"id": example["id"], "task": table.names[int(example["task"])],
          "title": example["title"], "description": example["description"],
          "images": np.asarray(example["images"])[:int(example["num_images"])].tolist(),
          "label": table.class_names[int(example["task"])][int(example["label"])]}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A tiny trained run, the training path's outputs on its test split, and then no data."""
  workdir = copy_run(tiny_run(tmp_path_factory), tmp_path_factory.mktemp("predict") / "run")
  config = tiny_config(total_steps=6)

  catalogue = tfds_builder.load_catalogue(str(workdir / "catalogue"), str(workdir / "prepared"))
  table = catalogue.task_table
  tokenizer = tokenizer_lib.load_tokenizer(workdir / "tokenizer")
  model = state_lib.Model(config, state_lib.model_spec(config, table, len(tokenizer)),
                          state_lib.trained_num_classes(table.num_classes, 0),
                          sharding.make_mesh(config.mesh))
  mngr = workdir_lib.checkpoint_manager(workdir)
  step, state, _ = checkpointing.restore_latest(
      mngr, lambda meta: model.abstract_state(meta["num_adapter_slots"]))
  mngr.close()
  first = next(input_pipeline.eval_batches(catalogue, "test", tokenizer, config))
  reference = np.asarray(steps.predict_step(
      model, state.params, state.adapter_map, state.num_classes,
      {k: v for k, v in first.items() if k != "label"}))
  test = catalogue.sources["test"]
  records = [_as_input(test[i], table) for i in range(len(test))]
  report = json.loads((workdir / "reports" / "test.json").read_text())

  shutil.rmtree(workdir / "catalogue")
  shutil.rmtree(workdir / "prepared")
  return {"workdir": workdir, "records": records, "reference": reference,
          "num_reference": int(first["example_mask"].sum()), "table": table, "step": step,
          "report": report}


@pytest.fixture(scope="module")
def predictor(saved_run):
  p = predict.Predictor.from_workdir(saved_run["workdir"], batch_size=16)
  yield p
  p.close()


def test_restores_the_latest_checkpoint_without_the_training_data(saved_run, predictor):
  assert not (saved_run["workdir"] / "catalogue").exists()
  assert not (saved_run["workdir"] / "prepared").exists()
  assert predictor.step == saved_run["step"] == 6
  assert predictor.task_table == saved_run["table"]


def test_probabilities_match_the_training_code_path(saved_run, predictor):
  n = saved_run["num_reference"]
  records = saved_run["records"][:n]
  probs = predictor.probabilities(records)
  table = saved_run["table"]
  for record, p, ref in zip(records, probs, saved_run["reference"]):
    k = int(table.num_classes[table.task_index(record["task"])])
    assert p.shape == (k,)
    np.testing.assert_allclose(p, ref[:k], rtol=1e-5, atol=1e-6)
    assert np.all(ref[k:] == 0)  # The reference gives other tasks' columns no probability.
    assert int(np.argmax(p)) == int(np.argmax(ref))


def test_all_classes_sum_to_one_and_are_named_from_the_task_table(saved_run, predictor):
  table = saved_run["table"]
  out = predictor.predict(saved_run["records"][:20], top_k=None)
  assert len(out) == 20
  for record, result in zip(saved_run["records"], out):
    assert result["id"] == record["id"] and result["task"] == record["task"]
    classes = table.class_names[table.task_index(record["task"])]
    labels = [p["label"] for p in result["predictions"]]
    assert sorted(labels) == sorted(classes)
    probs = [p["probability"] for p in result["predictions"]]
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_top_k_is_the_head_of_the_full_ranking(saved_run, predictor):
  records = saved_run["records"][:10]
  full = predictor.predict(records, top_k=None)
  top3 = predictor.predict(records, top_k=3)
  for a, b in zip(full, top3):
    assert b["predictions"] == a["predictions"][:3]


def test_top1_accuracy_equals_the_runs_test_report(saved_run, predictor):
  """Every test product through predict: per-task top-1 accuracy is the report's."""
  records = saved_run["records"]
  out = predictor.predict(records, top_k=1)
  correct, count = {}, {}
  for record, result in zip(records, out):
    task = record["task"]
    count[task] = count.get(task, 0) + 1
    correct[task] = correct.get(task, 0) + (result["predictions"][0]["label"] == record["label"])
  rows = {r["task"]: r for r in saved_run["report"]["tasks"]}
  assert set(count) == set(rows)
  for task in count:
    assert rows[task]["eval_examples"] == count[task]
    assert correct[task] / count[task] == pytest.approx(rows[task]["accuracy"], abs=1e-6)


def test_one_compilation_serves_every_batch(saved_run):
  predictor = predict.Predictor.from_workdir(saved_run["workdir"], batch_size=16)
  predictor.predict(saved_run["records"][:40])  # Two full batches and a padded one.
  predictor.predict(saved_run["records"][:5])
  predictor.predict(saved_run["records"][7:8])
  assert predictor.traces == 1
  predictor.close()


def test_an_earlier_step_and_a_missing_step(saved_run):
  earlier = predict.Predictor.from_workdir(saved_run["workdir"], step=3)
  assert earlier.step == 3
  earlier.close()
  with pytest.raises(workdir_lib.RunDirError, match=r"no checkpoint at step 5.*\[3, 6\]"):
    workdir_lib.open_run(saved_run["workdir"], step=5)


def test_cli_writes_one_line_per_product(saved_run, tmp_path, capsys):
  records = saved_run["records"][:7]
  source = tmp_path / "products.jsonl"
  source.write_text("".join(json.dumps(r) + "\n" for r in records[:4]) + "\n" +
                    "".join(json.dumps(r) + "\n" for r in records[4:]))
  out = tmp_path / "out" / "predictions.jsonl"
  assert predict.main([f"--workdir={saved_run['workdir']}", f"--input={source}",
                       f"--output={out}", "--top_k=2", "--batch_size=4"]) == 0
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [l["id"] for l in lines] == [r["id"] for r in records]
  assert all(len(l["predictions"]) == 2 for l in lines)
  assert "7 products" in capsys.readouterr().out


def test_cli_lists_the_tasks(saved_run, capsys):
  assert predict.main([f"--workdir={saved_run['workdir']}", "--list_tasks"]) == 0
  printed = capsys.readouterr().out
  assert all(f"{name}: " in printed for name in saved_run["table"].names)


def _bad(record, **changes):
  bad = dict(record)
  for key, value in changes.items():
    if value is None:
      bad.pop(key)
    else:
      bad[key] = value
  return bad


@pytest.mark.parametrize("changes, field, words", [
    ({"task": "site9999"}, "task", "'site9999' is not a task of this model"),
    ({"task": None}, "task", "missing"),
    ({"images": [[0.5] * 31]}, "images[0]", "31 numbers, but the model's image embeddings have "
                                             "image_dim=32"),
    ({"images": [[0.5] * 32, [0.5] * 33]}, "images[1]", "33 numbers"),
    ({"images": [3, 4]}, "images[0]", "is a row index, but no image embeddings file"),
    ({"images": ["a"]}, "images[0]", "not a list of numbers"),
    ({"images": [[0.0] * 32] * 4}, "images", "4 images, more than the model's max_images=3"),
    ({"images": [[float("nan")] * 32]}, "images[0]", "NaN"),
    ({"title": ""}, "title", "not a non-empty string"),
    ({"description": 5}, "description", "5 is not a string"),
])
def test_bad_records_name_the_line_and_field(saved_run, predictor, changes, field, words):
  good = saved_run["records"][0]
  with pytest.raises(cat.BadRecordError) as error:
    predictor.predict([good, _bad(good, **changes)])
  message = str(error.value)
  assert f"line 2, field '{field}'" in message and words in message and "Fix:" in message
  assert error.value.line == 2 and error.value.field == field


def test_a_bad_line_in_a_file_writes_no_output(saved_run, predictor, tmp_path):
  source = tmp_path / "products.jsonl"
  good = saved_run["records"][0]
  source.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
  out = tmp_path / "predictions.jsonl"
  with pytest.raises(cat.BadRecordError, match=r"products.jsonl line 3, field '<line>'"):
    predictor.predict_file(source, out)
  source.write_text(json.dumps(good) + "\n" + json.dumps(_bad(good, task="nope")) + "\n")
  with pytest.raises(cat.BadRecordError, match=r"products.jsonl line 2, field 'task'"):
    predictor.predict_file(source, out)
  assert list(tmp_path.iterdir()) == [source]


def test_a_missing_tokenizer_is_named(saved_run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(saved_run["workdir"] / "checkpoints", copy / "checkpoints")
  with pytest.raises(workdir_lib.RunDirError, match=r"no tokenizer found.*Fix: copy"):
    workdir_lib.open_run(copy)
  with pytest.raises(workdir_lib.RunDirError, match="no checkpoints directory"):
    workdir_lib.open_run(tmp_path / "nothing")


def test_images_as_row_indices_into_an_embeddings_file(saved_run, predictor, tmp_path):
  """Catalogue-style records (images as row indices) with --image_embeddings predict exactly
  what the same records with the vectors inline do."""
  records = saved_run["records"][:20]
  vectors = [v for r in records for v in r["images"]]
  np.save(tmp_path / "emb.npy", np.asarray(vectors, np.float32))
  indexed, row = [], 0
  for r in records:
    indexed.append({**r, "images": list(range(row, row + len(r["images"])))})
    row += len(r["images"])
  with_rows = predict.Predictor.from_workdir(saved_run["workdir"], batch_size=16,
                                             image_embeddings=tmp_path / "emb.npy")
  try:
    expected = predictor.probabilities(records)
    for a, b in zip(with_rows.probabilities(indexed), expected):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(cat.BadRecordError, match=r"field 'images\[0\]'.*row 10000 is outside"):
      with_rows.probabilities([{**indexed[0], "images": [10000]}])
  finally:
    with_rows.close()
  with pytest.raises(cat.BadRecordError, match=r"is a row index, but no image embeddings file"):
    predictor.probabilities([{**indexed[0], "images": [0]}])
  np.save(tmp_path / "wide.npy", np.zeros((3, 5), np.float32))
  with pytest.raises(cat.CatalogueError, match=r"shape \(3, 5\).*Fix:"):
    predict.Predictor.from_workdir(saved_run["workdir"], image_embeddings=tmp_path / "wide.npy")
  np.save(tmp_path / "ints.npy", np.zeros((3, 5), np.int64))
  (tmp_path / "text.jsonl").write_text('{"a": 1}\n')
  for name, words in (("ints.npy", ", field 'dtype': int64 is not float16 or float32"),
                      ("text.jsonl", ": not a .npy file")):
    with pytest.raises(cat.CatalogueError) as error:
      predict.Predictor.from_workdir(saved_run["workdir"], image_embeddings=tmp_path / name)
    message = str(error.value)
    assert message.startswith(f"--image_embeddings={tmp_path / name}{words}. Fix: "), message
    assert message.count("Fix:") == 1, message


def test_the_output_is_never_the_input_nor_a_directory(saved_run, tmp_path):
  source = tmp_path / "products.jsonl"
  text = "".join(json.dumps(r) + "\n" for r in saved_run["records"][:3])
  source.write_text(text)
  for output, words in ((source, "the same file as --input"), (tmp_path, "a directory")):
    # RunDirError: `cli.run` prints it as one line, `error: <message>`.
    with pytest.raises(workdir_lib.RunDirError, match=f"--output={output}: {words}.*Fix: "):
      predict.main([f"--workdir={saved_run['workdir']}", f"--input={source}",
                    f"--output={output}"])
  assert source.read_text() == text  # The products are kept.
