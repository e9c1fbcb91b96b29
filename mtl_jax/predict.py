"""Predictions from a trained run, without its training data.

  python -m mtl_jax.predict --workdir=runs/demo --input=products.jsonl \
      --output=predictions.jsonl [--top_k=5] [--batch_size=64] [--step=N|best] \
      [--image_embeddings=catalogue/image_embeddings.npy]

  from mtl_jax import predict
  predictor = predict.Predictor.from_workdir("runs/demo")
  predictor.predict([{"task": "site0003", "title": "Leather ankle boots",
                      "description": "...", "images": [[0.1, ...], ...]}], top_k=3)

What a run needs at prediction time travels with it: the checkpoint (parameters, the task ->
adapter map, each task's class count) and its `meta` (the config as JSON, the task table with
every task's class names, the adapter count), plus the tokenizer in `<workdir>/tokenizer`. The
tokenizer is looked up as `workdir.load_run_tokenizer` describes. The checkpoint is opened
through `workdir.open_run`, which verifies every array it reads against the fingerprints saved
with it: a damaged checkpoint is refused, naming an older one to use with `--step`.

Input: one JSON object per line, the catalogue's record format (`mtl_jax/catalogue.py`) except
that `images` holds the embedding vectors themselves:

  {"id": "p1", "task": "site0003", "title": "Leather ankle boots", "description": "Soft ...",
   "images": [[0.12, -0.5, ...], [...]]}

  - `task` (required): a task name of the model.
  - `title` (required, non-empty) and `description` (optional) strings.
  - `images` (optional): 0..max_images vectors of exactly image_dim finite numbers each, from the
    same image encoder the training embeddings came from; or, with `--image_embeddings=FILE.npy`
    (e.g. a catalogue's image_embeddings.npy), row indices into that file, so that a
    catalogue's own .jsonl lines can be predicted as they are.
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

if __name__ == "__main__":  # First, before the heavy imports: see allocator.py.
  from mtl_jax import allocator
  allocator.reexec_under_tcmalloc()

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
from absl import flags

from mtl_jax import catalogue as cat
from mtl_jax import cli
from mtl_jax import input_pipeline
from mtl_jax import steps
from mtl_jax import workdir as workdir_lib

_INPUT = "<records>"  # The `file` of errors about records given through the Python API.


# --- Input records ---------------------------------------------------------------------------

def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_record(obj: Any, table: cat.TaskTable, *, file: str = _INPUT,
                 line_no: int = 0, embeddings: np.ndarray | None = None) -> dict:
  """Checks one input product and returns it as the batch builder's record.

  `embeddings` (a catalogue's image_embeddings.npy, [N, image_dim]) lets `images` hold row
  indices into it, as catalogue records do, instead of the vectors themselves.

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
    if isinstance(vector, int) and not isinstance(vector, bool):
      if embeddings is None:
        raise bad(field, "bad_images", f"{vector} is a row index, but no image embeddings "
                  "file was given.", "pass --image_embeddings=<catalogue>/image_embeddings.npy "
                  f"(or give each image as its vector of {dim} numbers).", task_name)
      if not 0 <= vector < len(embeddings):
        raise bad(field, "bad_images", f"row {vector} is outside the {len(embeddings)} rows of "
                  "the image embeddings file.", "use row indices of that file.", task_name)
      vector = embeddings[vector].tolist()
    if not isinstance(vector, list) or not all(_is_number(x) for x in vector):
      shown = repr(vector) if not isinstance(vector, list) else "a list with non-numbers"
      raise bad(field, "bad_images", f"{shown[:60]} is not a list of numbers.",
                f"give each image as its embedding vector (a list of {dim} numbers) or as a row "
                "index into --image_embeddings.", task_name)
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


def load_image_embeddings(path: str | os.PathLike, image_dim: int) -> np.ndarray:
  """An [N, image_dim] float array from an .npy file (memory-mapped; never unpickled)."""
  embeddings = cat.read_embeddings_array(path, f"--image_embeddings={path}")
  if embeddings.ndim != 2 or embeddings.shape[1] != image_dim:
    raise cat.CatalogueError(
        f"--image_embeddings={path}: shape {embeddings.shape}, but the model's image embeddings "
        f"are [N, {image_dim}]. Fix: give the embeddings of the image encoder the model was "
        "trained with.")
  return embeddings


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

  def __init__(self, run: workdir_lib.Run, arrays: dict, batch_size: int = 64,
               image_embeddings: str | os.PathLike | None = None):
    self.run = run
    self.image_embeddings = (None if image_embeddings is None else
                             load_image_embeddings(image_embeddings, run.task_table.image_dim))
    self.task_table = run.task_table
    model = run.model
    data_devices = model.mesh.shape["data"]
    # Batches are split over the mesh's data axis: round up to a multiple of its size.
    self.batch_size = max(1, math.ceil(batch_size / data_devices)) * data_devices
    self._params = arrays["params"]
    self._adapter_map = arrays["adapter_map"]
    self._num_classes = arrays["num_classes"]
    self.trained_num_classes = np.asarray(jax.device_get(arrays["num_classes"]), np.int32)
    self._probs = steps.jitted_predict_step(model, run.num_adapter_slots)

  @property
  def traces(self) -> int:
    """How many times the prediction function was compiled (one per Predictor)."""
    return self._probs._cache_size()

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, step: int | str | None = None,
                   batch_size: int = 64, image_embeddings: str | os.PathLike | None = None
                   ) -> Predictor:
    """Loads the latest (or the given: a step, or "best") checkpoint of the run in `workdir`,
    verified.
    `image_embeddings`: an .npy file whose rows input records may name by index."""
    run = workdir_lib.open_run(workdir, step)
    try:
      return cls(run, run.restore_inference(), batch_size, image_embeddings)
    except BaseException:
      run.close()
      raise

  @property
  def step(self) -> int:
    return self.run.step

  def class_names(self, task: int) -> tuple[str, ...]:
    """The classes the model scores for task `task` (an index), in head-column order."""
    return self.run.model.class_names(self.task_table, task)

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
    sharding_ = self.run.model.batch_sharding
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
    return [parse_record(r, self.task_table, file=file, line_no=i,
                         embeddings=self.image_embeddings)
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
    if os.path.isdir(output_path):
      raise workdir_lib.RunDirError(f"--output={output_path}: a directory. Fix: give a file path, "
                                    f"e.g. {Path(output_path) / 'predictions.jsonl'}.")
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
      raise workdir_lib.RunDirError(
          f"--output={output_path}: the same file as --input; the predictions would replace the "
          "products. Fix: give another output file.")
    sources, parsed = [], []
    for line_no, obj in read_jsonl(input_path):
      parsed.append(parse_record(obj, self.task_table, file=os.fspath(input_path),
                                 line_no=line_no, embeddings=self.image_embeddings))
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
  flag_values = cli.flag_values()
  define = lambda kind, name, default, text, **kw: getattr(flags, f"DEFINE_{kind}")(
      name, default, text, flag_values=flag_values, **kw)
  define("string", "workdir", None, "The trained run's directory.", required=True)
  define("string", "input", None, "Products, one JSON object per line.")
  define("string", "output", None, "Where the predictions (JSONL) go.")
  define("integer", "top_k", 5, "Classes per product (0: all of the task's classes).")
  define("integer", "batch_size", 64, "Products per jitted call.", lower_bound=1)
  define("string", "step", None, workdir_lib.STEP_HELP)
  define("string", "image_embeddings", None, "An .npy file of image embeddings; input records "
         "may then give `images` as row indices into it, as catalogue records do.")
  define("bool", "list_tasks", False, "Print the model's tasks and their classes, and exit.")
  cli.parse(flag_values, argv, "python -m mtl_jax.predict")
  args = flag_values
  if args.list_tasks:
    run = workdir_lib.open_run(args.workdir, args.step)
    for name, classes in zip(run.task_table.names, run.task_table.class_names):
      print(f"{name}: {len(classes)} classes: {' | '.join(classes)}")
    run.close()
    return 0
  if not args.input or not args.output:
    raise flags.ValidationError("--input and --output are required (or --list_tasks).")
  if not os.path.isfile(args.input):
    raise workdir_lib.RunDirError(f"--input={args.input}: no such file. Fix: give a JSONL file "
                                  "of products (see `python -m mtl_jax.predict --help`).")
  predictor = Predictor.from_workdir(args.workdir, args.step, args.batch_size,
                                     args.image_embeddings)
  count = predictor.predict_file(args.input, args.output, args.top_k)
  print(f"{count} products -> {args.output} (checkpoint step {predictor.step} of "
        f"{predictor.run.workdir})", flush=True)
  predictor.close()
  return 0


if __name__ == "__main__":
  cli.run(main)
