"""Predictions from a trained run, without its training data.

  python -m mtl_jax.predict --workdir=runs/demo --input=products.jsonl \
      --output=predictions.jsonl [--top_k=5] [--batch_size=64] [--step=N]

  from mtl_jax import predict
  predictor = predict.Predictor.from_workdir("runs/demo")
  predictor.predict([{"task": "site0003", "title": "Leather ankle boots",
                      "description": "...", "images": [[0.1, ...], ...]}], top_k=3)

What a run needs at prediction time travels with it: the checkpoint (parameters, the task ->
adapter map, each task's class count) and its `meta` (the config as JSON, the task table with
every task's class names, the adapter count), plus the tokenizer in `<workdir>/tokenizer`. The
tokenizer is looked up as `open_run` describes; a run trained with `data.tokenizer_dir` or
`model.text_init` keeps no copy in its workdir unless `train.prepare_data` writes one, so such a
run also needs that directory (or the installed pretrained package) where it predicts.

Input: one JSON object per line, the catalogue's record format (`mtl_jax/catalogue.py`) except
that `images` holds the embedding vectors themselves:

  {"id": "p1", "task": "site0003", "title": "Leather ankle boots", "description": "Soft ...",
   "images": [[0.12, -0.5, ...], [...]]}

  - `task` (required): a task name of the model.
  - `title` (required, non-empty) and `description` (optional) strings.
  - `images` (optional): 0..max_images vectors of exactly image_dim finite numbers each, from the
    same image encoder the training embeddings came from.
  - `id` (optional) is copied to the output; `label` and other fields are ignored.

A bad record raises `catalogue.BadRecordError` naming the file, the line, the field and the fix;
the output file is written only when every record is good.

Output: one JSON object per input record, in input order:

  {"id": "p1", "task": "site0003",
   "predictions": [{"label": "Shoes > Boots", "probability": 0.91}, ...]}

`predictions` are the task's top-k classes by probability, by class name. The softmax runs over
the task's own classes only (the classes the model was trained on: a run with
`eval.holdout_classes` never predicts its held-out classes), so over all of them the
probabilities sum to 1. Products are processed in fixed-size batches (the last one padded) by
one jitted function: one compilation serves any number of records.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mtl_jax import catalogue as cat
from mtl_jax import checkpointing
from mtl_jax import input_pipeline
from mtl_jax import sharding
from mtl_jax import tokenizer as tokenizer_lib
from mtl_jax import train
from mtl_jax.model import ModelSpec

TOKENIZER_DIR = "tokenizer"
_INPUT = "<records>"  # The `file` of errors about records given through the Python API.


class RunError(FileNotFoundError):
  """A workdir that lacks something a trained run must have; the message says what and how."""


# --- Reading a run back --------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """A trained run as read back from its workdir: everything but the arrays.

  Attributes:
    workdir: the run's directory.
    step: the checkpoint's step.
    meta: the checkpoint's `meta` (config JSON, task table JSON, adapter count, ...).
    config: the run's config.
    task_table: every task's name and class names, and the image-embedding shape.
    tokenizer: the run's text tokenizer.
    tokenizer_source: where the tokenizer was read from.
    trainer: a `train.Trainer` for the checkpoint's tasks (its model, shardings, steps).
    manager: the workdir's Orbax checkpoint manager.
  """
  workdir: epath.Path
  step: int
  meta: dict
  config: ml_collections.ConfigDict
  task_table: cat.TaskTable
  tokenizer: Any
  tokenizer_source: str
  trainer: train.Trainer
  manager: ocp.CheckpointManager

  @property
  def num_adapter_slots(self) -> int:
    return int(self.meta["num_adapter_slots"])

  def restore_inference(self) -> dict:
    """{"params", "adapter_map", "num_classes"} of the checkpoint, placed by the config's
    sharding rules; the optimiser state is not read."""
    abstract = self.trainer.abstract_state(self.num_adapter_slots)
    target = {"params": abstract.params, "adapter_map": abstract.adapter_map,
              "num_classes": abstract.num_classes}
    restored = self.manager.restore(self.step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    return restored.state

  def restore_state(self) -> train.TrainState:
    """The whole train state (parameters and optimiser state) of the checkpoint."""
    abstract = self.trainer.abstract_state(self.num_adapter_slots)
    restored = self.manager.restore(self.step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return restored.state

  def close(self):
    self.manager.close()


def _has_tokenizer(directory: epath.Path) -> bool:
  return (directory / tokenizer_lib.VOCAB_FILE).exists() or (directory / "tokenizer.json").exists()


def load_run_tokenizer(workdir: str | os.PathLike, config) -> tuple[Any, str]:
  """The tokenizer a run trained with, and where it was found.

  Looked up in this order:
    1. `<workdir>/tokenizer`: where `train.prepare_data` builds the vocabulary of a run without
       `data.tokenizer_dir` or `model.text_init` (and where copies for other runs are kept);
    2. the config's `data.tokenizer_dir`;
    3. the config's `model.text_init` checkpoint's tokenizer.

  Raises:
    RunError: none of them is there.
  """
  workdir = epath.Path(workdir)
  local = workdir / TOKENIZER_DIR
  if _has_tokenizer(local):
    return tokenizer_lib.load_tokenizer(os.fspath(local)), os.fspath(local)
  tried = [os.fspath(local)]
  if config.data.tokenizer_dir:
    if _has_tokenizer(epath.Path(config.data.tokenizer_dir)):
      return tokenizer_lib.load_tokenizer(config.data.tokenizer_dir), config.data.tokenizer_dir
    tried.append(f"data.tokenizer_dir={config.data.tokenizer_dir}")
  elif config.model.text_init:
    from mtl_jax import pretrained  # Local: only runs that started from weights need it.
    try:
      return (pretrained.load_tokenizer_for(config.model.text_init),
              f"model.text_init={config.model.text_init}")
    except FileNotFoundError as e:
      tried.append(f"model.text_init={config.model.text_init} ({e})")
  raise RunError(
      f"{workdir}: no tokenizer found (tried {'; '.join(tried)}). Fix: copy the vocabulary the "
      f"run trained with (vocab.txt or tokenizer.json) into {local}.")


def _mesh_for(config):
  """The run's mesh where it fits the devices here, else data parallelism over all of them."""
  try:
    return sharding.make_mesh(config.mesh)
  except ValueError:
    fallback = ml_collections.ConfigDict({"data": -1, "model": 1})
    return sharding.make_mesh(fallback)


def open_run(workdir: str | os.PathLike, step: int | None = None) -> Run:
  """Reads a run's checkpoint metadata, tokenizer and model definition (not its arrays).

  Args:
    workdir: the run's directory (the one given to `train.train_and_evaluate`).
    step: the checkpoint to use; None: the latest.

  Raises:
    RunError: no checkpoint, no such step, or no tokenizer.
  """
  workdir = epath.Path(workdir)
  checkpoints = workdir / "checkpoints"
  if not checkpoints.is_dir():
    raise RunError(f"{workdir}: no checkpoints directory. Fix: give the --workdir of a trained "
                   "run (it holds checkpoints/ and tokenizer/).")
  manager = ocp.CheckpointManager(checkpoints, item_names=("state", "meta"))
  steps = sorted(manager.all_steps())
  if not steps:
    manager.close()
    raise RunError(f"{checkpoints}: no checkpoint. Fix: train the run first, or give the "
                   "workdir of a trained one.")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    manager.close()
    raise RunError(f"{checkpoints}: no checkpoint at step {step}. Fix: use one of {steps}.")
  meta = checkpointing.read_meta(manager, step)
  config = ml_collections.ConfigDict(json.loads(meta["config"]))
  task_table = cat.TaskTable.from_json(meta["task_table"],
                                       source=f"{checkpoints / str(step)} meta.task_table")
  tokenizer, tokenizer_source = load_run_tokenizer(workdir, config)
  known = {f.name for f in dataclasses.fields(ModelSpec)}
  if "model_spec" in meta and known >= set(meta["model_spec"]):
    # The sizes the run was built with, so a `model.text_init` checkpoint need not be present.
    spec = ModelSpec(**meta["model_spec"])
  else:
    spec = train.model_spec(config, task_table, len(tokenizer))
  num_classes = train.trained_num_classes(task_table.num_classes, config.eval.holdout_classes)
  trainer = train.Trainer(config, spec, num_classes, _mesh_for(config))
  return Run(workdir=workdir, step=int(step), meta=meta, config=config, task_table=task_table,
             tokenizer=tokenizer, tokenizer_source=tokenizer_source, trainer=trainer,
             manager=manager)


# --- Input records ---------------------------------------------------------------------------

def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_record(obj: Any, table: cat.TaskTable, *, file: str = _INPUT,
                 line_no: int = 0) -> dict:
  """Checks one input product and returns it as the batch builder's record.

  Returns:
    {"task": index, "title", "description", "images": float32 [K, D] zero-padded, "num_images",
     "label": 0 (unused)}.

  Raises:
    catalogue.BadRecordError: naming the file, line, field, problem and fix.
  """

  def bad(field, reason, problem, fix, task=cat.UNKNOWN_TASK):
    return cat.BadRecordError(file, line_no, field, reason, problem, fix, task)

  if not isinstance(obj, dict):
    raise bad("<line>", "not_object", f"a JSON {type(obj).__name__}, not an object.",
              'write one object per line: {"task": ..., "title": ..., "images": [...]}.')
  task_name = obj.get("task")
  if not isinstance(task_name, str) or not table.has_task(task_name):
    shown = ", ".join(table.names[:8]) + (", ..." if table.num_tasks > 8 else "")
    problem = ("missing." if "task" not in obj else
               f"{task_name!r} is not a task of this model (its {table.num_tasks} tasks: "
               f"{shown}).")
    raise bad("task", "unknown_task", problem,
              "use a task name the model was trained on (add a new website with "
              "`python -m mtl_jax.new_task`).")
  task = table.task_index(task_name)

  title = obj.get("title")
  if not isinstance(title, str) or not title.strip():
    problem = "missing." if "title" not in obj else f"{title!r} is not a non-empty string."
    raise bad("title", "missing_title", problem, "give the product a non-empty title.",
              task_name)
  description = obj.get("description", "")
  if description is None:
    description = ""
  if not isinstance(description, str):
    raise bad("description", "bad_description", f"{description!r} is not a string.",
              'write the description as a string ("" when there is none).', task_name)

  images = obj.get("images")
  images = [] if images is None else images
  dim, most = table.image_dim, table.max_images
  if not isinstance(images, list):
    raise bad("images", "bad_images", f"a {type(images).__name__}, not a list of vectors.",
              f"give a list of embedding vectors, each a list of {dim} numbers ([] for none).",
              task_name)
  if len(images) > most:
    raise bad("images", "too_many_images", f"{len(images)} images, more than the model's "
              f"max_images={most}.", f"give at most {most} images.", task_name)
  padded = np.zeros((most, dim), np.float32)
  for i, vector in enumerate(images):
    field = f"images[{i}]"
    if not isinstance(vector, list) or not all(_is_number(x) for x in vector):
      shown = repr(vector) if not isinstance(vector, list) else "a list with non-numbers"
      raise bad(field, "bad_images", f"{shown[:60]} is not a list of numbers.",
                f"give each image as its embedding vector: a list of {dim} numbers (image row "
                "indices are for catalogue files, not for prediction input).", task_name)
    if len(vector) != dim:
      raise bad(field, "bad_images", f"{len(vector)} numbers, but the model's image embeddings "
                f"have image_dim={dim}.", f"embed the image with the image encoder the model "
                f"was trained with ({dim}-wide vectors).", task_name)
    row = np.asarray(vector, np.float64)
    if not np.all(np.isfinite(row)) or np.any(np.abs(row) > np.finfo(np.float32).max):
      raise bad(field, "nonfinite_image", "holds NaN, Inf or a number too large for float32.",
                "recompute that image's embedding, or leave the image out.", task_name)
    padded[i] = row
  return {"task": task, "title": title, "description": description, "images": padded,
          "num_images": len(images), "label": 0}


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
  """(line number, parsed object) of every non-blank line; raises `BadRecordError` on bad JSON."""
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield line_no, json.loads(line)
      except ValueError as e:
        raise cat.BadRecordError(
            os.fspath(path), line_no, "<line>", "not_json", f"not valid JSON ({e}).",
            "write one JSON object per line.") from None


# --- Prediction -------------------------------------------------------------------------------

class Predictor:
  """A trained run's model, ready to classify products of its tasks.

  Attributes:
    run: the run (config, task table, tokenizer, trainer).
    batch_size: products per jitted call; the last batch of a call is padded to it.
    traces: how many times the prediction function was traced (compiled); one per Predictor.
  """

  def __init__(self, run: Run, arrays: dict, batch_size: int = 64):
    self.run = run
    self.task_table = run.task_table
    trainer = run.trainer
    data_devices = trainer.mesh.shape["data"]
    # Batches are split over the mesh's data axis: round up to a multiple of its size.
    self.batch_size = max(1, math.ceil(batch_size / data_devices)) * data_devices
    self._params = arrays["params"]
    self._adapter_map = arrays["adapter_map"]
    self._num_classes = arrays["num_classes"]
    self.trained_num_classes = np.asarray(jax.device_get(arrays["num_classes"]), np.int32)
    self.traces = 0
    shardings = trainer.state_shardings(run.num_adapter_slots)

    def probs_fn(params, adapter_map, num_classes, batch):
      self.traces += 1  # Runs only while tracing.
      return trainer.predict_probs(params, adapter_map, num_classes, batch)

    self._probs = jax.jit(
        probs_fn, in_shardings=(shardings.params, shardings.adapter_map, shardings.num_classes,
                                trainer.batch_sharding),
        out_shardings=sharding.replicated(trainer.mesh))

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, step: int | None = None,
                   batch_size: int = 64) -> Predictor:
    """Loads the latest (or the given) checkpoint of the run in `workdir`."""
    run = open_run(workdir, step)
    return cls(run, run.restore_inference(), batch_size)

  @property
  def step(self) -> int:
    return self.run.step

  def class_names(self, task: int) -> tuple[str, ...]:
    """The classes the model scores for task `task` (an index), in head-column order."""
    return self.task_table.class_names[task][:int(self.trained_num_classes[task])]

  def _encode(self, records: Sequence[dict]) -> dict:
    """Parsed records -> one padded batch of numpy arrays."""
    padded = list(records) + [records[0]] * (self.batch_size - len(records))
    batch = input_pipeline.make_batch(padded, self.run.tokenizer,
                                      self.run.config.data.max_text_len,
                                      self.task_table.max_images)
    del batch["label"]
    return batch

  def _probabilities(self, parsed: Sequence[dict]) -> list[np.ndarray]:
    out = []
    sharding_ = self.run.trainer.batch_sharding
    for start in range(0, len(parsed), self.batch_size):
      chunk = parsed[start:start + self.batch_size]
      batch = jax.device_put(self._encode(chunk), sharding_)
      probs = np.asarray(jax.device_get(self._probs(self._params, self._adapter_map,
                                                     self._num_classes, batch)))
      for r, p in zip(chunk, probs):
        out.append(p[:int(self.trained_num_classes[r["task"]])])
    return out

  def parse(self, records: Iterable[Any], file: str = _INPUT) -> list[dict]:
    """Checks products given as dicts (numbered from 1 in error messages)."""
    return [parse_record(r, self.task_table, file=file, line_no=i)
            for i, r in enumerate(records, start=1)]

  def probabilities(self, records: Sequence[Any]) -> list[np.ndarray]:
    """Per product, float32 probabilities over its task's classes (see `class_names`)."""
    parsed = self.parse(records)
    return self._probabilities(parsed) if parsed else []

  def _format(self, source: dict, parsed: dict, probs: np.ndarray, top_k: int | None) -> dict:
    k = len(probs) if top_k is None or top_k <= 0 else min(top_k, len(probs))
    order = np.argsort(-probs, kind="stable")[:k]
    names = self.class_names(parsed["task"])
    result = {"id": source["id"]} if "id" in source else {}
    result["task"] = self.task_table.names[parsed["task"]]
    result["predictions"] = [{"label": names[c], "probability": float(probs[c])} for c in order]
    return result

  def predict(self, records: Sequence[dict], top_k: int | None = 5) -> list[dict]:
    """Top-k classes of each product.

    Args:
      records: products in the input format of this module (dicts).
      top_k: how many classes per product; None or <= 0: all of the task's classes.

    Returns:
      One dict per record, in order: {"id" (if the record has one), "task",
      "predictions": [{"label": class name, "probability": p}, ...] most probable first}.
    """
    records = list(records)
    parsed = self.parse(records)
    if not parsed:
      return []
    return [self._format(s, p, probs, top_k)
            for s, p, probs in zip(records, parsed, self._probabilities(parsed))]

  def predict_file(self, input_path: str | os.PathLike, output_path: str | os.PathLike,
                   top_k: int | None = 5) -> int:
    """Predicts every product of a JSONL file into another. Returns the number of products.

    Every record is checked before anything is written; the output appears whole (written
    beside it and renamed) or not at all.
    """
    sources, parsed = [], []
    for line_no, obj in read_jsonl(input_path):
      parsed.append(parse_record(obj, self.task_table, file=os.fspath(input_path),
                                 line_no=line_no))
      sources.append(obj)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.parent / f".{output_path.name}.tmp-{os.getpid()}"
    try:
      with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, len(parsed), self.batch_size):
          chunk = parsed[start:start + self.batch_size]
          for s, p, probs in zip(sources[start:], chunk, self._probabilities(chunk)):
            f.write(json.dumps(self._format(s, p, probs, top_k), ensure_ascii=False) + "\n")
      os.replace(tmp, output_path)
    finally:
      if tmp.exists():
        tmp.unlink()
    return len(parsed)

  def close(self):
    self.run.close()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mtl_jax.predict",
      description="Top-k categories of products, from a trained run's checkpoint.")
  parser.add_argument("--workdir", required=True, help="The trained run's directory.")
  parser.add_argument("--input", help="Products, one JSON object per line.")
  parser.add_argument("--output", help="Where the predictions (JSONL) go.")
  parser.add_argument("--top_k", type=int, default=5,
                      help="Classes per product (0: all of the task's classes).")
  parser.add_argument("--batch_size", type=int, default=64, help="Products per jitted call.")
  parser.add_argument("--step", type=int, default=None,
                      help="The checkpoint step to use (default: the latest).")
  parser.add_argument("--list_tasks", action="store_true",
                      help="Print the model's tasks and their classes, and exit.")
  args = parser.parse_args(argv)
  if args.batch_size <= 0:
    parser.error(f"--batch_size={args.batch_size}: use a positive number of products.")
  if args.list_tasks:
    run = open_run(args.workdir, args.step)
    for name, classes in zip(run.task_table.names, run.task_table.class_names):
      print(f"{name}: {len(classes)} classes: {' | '.join(classes)}")
    run.close()
    return 0
  if not args.input or not args.output:
    parser.error("--input and --output are required (or --list_tasks).")
  predictor = Predictor.from_workdir(args.workdir, args.step, args.batch_size)
  count = predictor.predict_file(args.input, args.output, args.top_k)
  print(f"{count} products -> {args.output} (checkpoint step {predictor.step} of "
        f"{args.workdir})", flush=True)
  predictor.close()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
