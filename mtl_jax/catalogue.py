"""The product-catalogue format: what a user writes, and how it is read and checked.

A catalogue is one directory; fill it from your own data, or let `mtl_jax.synthetic` write one:

  my_catalogue/
    tasks.json              the tasks (websites) and their classes (categories)
    train.jsonl             one product per line
    validation.jsonl
    test.jsonl
    image_embeddings.npy    precomputed image embeddings, one row per image
    _COMPLETE               optional; the synthetic generator writes it last

`tasks.json`:

  {"format_version": 1, "image_dim": 512, "max_images": 4,
   "tasks": [{"name": "shop-a", "classes": ["Women > Shoes > Boots", "Men > Shirts", ...]},
             {"name": "shop-b", "classes": [...]}, ...]}

  `image_dim` (D) is the width of an embedding row, `max_images` (K) the most images a product may
  have. Task names are unique; class names are unique within their task and any non-empty string
  (a path in the site's hierarchy is usual). A task's class index is its position in `classes`, and
  a task's index its position in `tasks`: keep both lists stable once a model is trained.

`train.jsonl`, `validation.jsonl`, `test.jsonl`: one JSON object per line,

  {"id": "shop-a/123", "task": "shop-a", "label": "Women > Shoes > Boots",
   "title": "Leather ankle boots", "description": "Soft leather ...", "images": [17, 18]}

  - `id`: non-empty string, unique across all three files.
  - `task`: a task name from tasks.json; `label`: one of that task's class names.
  - `title`: non-empty string. `description`: string, may be empty or absent.
  - `images`: 0..K integer row indices into image_embeddings.npy (absent means none). Rows may be
    shared between products.
  Blank lines are ignored. Records may come in any order; the TFDS builder groups them by task.
  Every task needs at least one valid training record.

`image_embeddings.npy`: a `[N, D]` float16 or float32 array in numpy's .npy format (no pickles;
it is memory-mapped, not loaded). It may be absent when no product has images. Embed your images
with any pretrained image encoder; rows must be finite.

Checking. `read_task_table` checks tasks.json and raises `CatalogueError` naming the file and the
field. `validate_record` checks one line and raises `BadRecordError` naming the file, the line,
the field, what is wrong and how to fix it. `CatalogueValidator` applies a policy to a whole
catalogue: `on_bad_record="fail"` raises at the first bad record; `"skip"` drops bad records and
counts them per split, task and reason (a record whose task is unknown counts under
`UNKNOWN_TASK`). File-level problems (a malformed tasks.json, an embedding file of the wrong
shape or dtype, a missing split file, a task left with no training records) raise under either
policy: no record-level choice can repair them.
"""
from __future__ import annotations

import array
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

FORMAT_VERSION = 1
TASKS_FILE = "tasks.json"
EMBEDDINGS_FILE = "image_embeddings.npy"
COMPLETE_MARKER = "_COMPLETE"
SPLITS = ("train", "validation", "test")
POLICIES = ("fail", "skip")
UNKNOWN_TASK = "<unknown>"

# Reasons a record is rejected: the keys of the skip counts.
REASONS = (
    "not_json",
    "not_object",
    "missing_id",
    "duplicate_id",
    "unknown_task",
    "unknown_label",
    "missing_title",
    "bad_description",
    "bad_images",
    "too_many_images",
    "image_out_of_range",
    "nonfinite_image",
)


def split_file(split: str) -> str:
  """The file name of a split: `train` -> `train.jsonl`."""
  return f"{split}.jsonl"


class CatalogueError(ValueError):
  """A catalogue that cannot be used as it is; the message says where and how to fix it."""


class BadRecordError(CatalogueError):
  """One bad line of a split file.

  Attributes:
    file: the file's path as given.
    line: 1-based line number.
    field: the offending field (`<line>` when the line itself is unreadable).
    reason: one of `REASONS`.
    task: the record's task name, or `UNKNOWN_TASK` when it has no known task.
  """

  def __init__(self, file: str, line: int, field: str, reason: str, problem: str, fix: str,
               task: str = UNKNOWN_TASK):
    self.file, self.line, self.field, self.reason, self.task = file, line, field, reason, task
    super().__init__(f"{file} line {line}, field '{field}': {problem} Fix: {fix}")


def _task_table_error(source: str, field: str, problem: str, fix: str) -> CatalogueError:
  return CatalogueError(f"{source}, field '{field}': {problem} Fix: {fix}")


@dataclasses.dataclass(frozen=True)
class TaskTable:
  """Every task's name and class names, and the image-embedding shape.

  Attributes:
    names: task names; a task's index is its position here.
    class_names: per task, its class names; a class's index is its position.
    image_dim: D, the width of an image embedding.
    max_images: K, the most images one product may have.
  """
  names: tuple[str, ...]
  class_names: tuple[tuple[str, ...], ...]
  image_dim: int
  max_images: int

  def __post_init__(self):
    # Accept lists (e.g. from JSON) but store tuples, so the table stays hashable and immutable.
    object.__setattr__(self, "names", tuple(self.names))
    object.__setattr__(self, "class_names", tuple(tuple(c) for c in self.class_names))
    object.__setattr__(self, "image_dim", int(self.image_dim))
    object.__setattr__(self, "max_images", int(self.max_images))
    _check_task_table(self, "TaskTable")

  @property
  def num_tasks(self) -> int:
    return len(self.names)

  @property
  def num_classes(self) -> np.ndarray:
    """int32 [T]: each task's class count."""
    return np.array([len(c) for c in self.class_names], dtype=np.int32)

  @functools.cached_property
  def _task_ids(self) -> dict[str, int]:
    return {name: i for i, name in enumerate(self.names)}

  @functools.cached_property
  def _class_ids(self) -> tuple[dict[str, int], ...]:
    return tuple({c: j for j, c in enumerate(classes)} for classes in self.class_names)

  def has_task(self, name: str) -> bool:
    return name in self._task_ids

  def task_index(self, name: str) -> int:
    """The index of task `name`; raises `KeyError` naming close matches for an unknown one."""
    try:
      return self._task_ids[name]
    except (KeyError, TypeError):
      shown = ", ".join(repr(n) for n in self.names[:5]) + (", ..." if self.num_tasks > 5 else "")
      raise KeyError(f"Unknown task {name!r}: the task table has {self.num_tasks} tasks "
                     f"({shown}).") from None

  def class_index(self, task: int, class_name: str) -> int:
    """The index of `class_name` within task `task` (an index); `KeyError` if it is not there."""
    try:
      return self._class_ids[task][class_name]
    except (KeyError, TypeError):
      raise KeyError(f"{class_name!r} is not a class of task {self.names[task]!r}.") from None

  def to_json(self) -> dict[str, Any]:
    """The tasks.json object of this table."""
    return {
        "format_version": FORMAT_VERSION,
        "image_dim": self.image_dim,
        "max_images": self.max_images,
        "tasks": [{"name": n, "classes": list(c)} for n, c in zip(self.names, self.class_names)],
    }

  @classmethod
  def from_json(cls, obj: dict[str, Any] | str, source: str = TASKS_FILE) -> TaskTable:
    """A table from a tasks.json object (or its text); errors name `source` and the field."""
    if isinstance(obj, str):
      try:
        obj = json.loads(obj)
      except ValueError as e:
        raise _task_table_error(source, "<file>", f"not valid JSON ({e}).",
                                "write one JSON object as described in mtl_jax/catalogue.py.")
    if not isinstance(obj, dict):
      raise _task_table_error(source, "<file>", "the file is not a JSON object.",
                              'write {"format_version": 1, "image_dim": ..., "max_images": ..., '
                              '"tasks": [...]}.')
    for key in ("format_version", "image_dim", "max_images", "tasks"):
      if key not in obj:
        raise _task_table_error(source, key, "missing.", f"add the '{key}' key.")
    if obj["format_version"] != FORMAT_VERSION:
      raise _task_table_error(source, "format_version",
                              f"{obj['format_version']!r} is not supported.",
                              f"write the format version {FORMAT_VERSION}.")
    for key, least in (("image_dim", 1), ("max_images", 0)):
      value = obj[key]
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise _task_table_error(source, key, f"{value!r} is not an integer >= {least}.",
                                f"set '{key}' to an integer >= {least}.")
    tasks = obj["tasks"]
    if not isinstance(tasks, list) or not tasks:
      raise _task_table_error(source, "tasks", "must be a non-empty list of tasks.",
                              'list the tasks as [{"name": ..., "classes": [...]}, ...].')
    names, class_names = [], []
    for i, task in enumerate(tasks):
      where = f"tasks[{i}]"
      if not isinstance(task, dict):
        raise _task_table_error(source, where, "not an object.",
                                'write the task as {"name": ..., "classes": [...]}.')
      for key in ("name", "classes"):
        if key not in task:
          raise _task_table_error(source, f"{where}.{key}", "missing.",
                                  f"add the '{key}' key to the task.")
      if not isinstance(task["classes"], list):
        raise _task_table_error(source, f"{where}.classes", "not a list.",
                                "list the task's class names.")
      names.append(task["name"])
      class_names.append(task["classes"])
    table = cls.__new__(cls)
    for key, value in (("names", tuple(names)),
                       ("class_names", tuple(tuple(c) for c in class_names)),
                       ("image_dim", obj["image_dim"]), ("max_images", obj["max_images"])):
      object.__setattr__(table, key, value)
    _check_task_table(table, source)
    return table


def _check_task_table(table: TaskTable, source: str) -> None:
  if not table.names:
    raise _task_table_error(source, "tasks", "no tasks.", "add at least one task.")
  if table.image_dim < 1 or table.max_images < 0:
    raise _task_table_error(source, "image_dim", "image_dim must be >= 1 and max_images >= 0.",
                            "correct the two numbers.")
  seen = {}
  for i, (name, classes) in enumerate(zip(table.names, table.class_names)):
    where = f"tasks[{i}]"
    if not isinstance(name, str) or not name or name == UNKNOWN_TASK:
      raise _task_table_error(source, f"{where}.name", f"{name!r} is not a usable task name.",
                              f"use a non-empty string other than {UNKNOWN_TASK!r}.")
    if name in seen:
      raise _task_table_error(source, f"{where}.name",
                              f"duplicate task name {name!r} (also tasks[{seen[name]}]).",
                              "give every task its own name, or merge the two entries.")
    seen[name] = i
    if not classes:
      raise _task_table_error(source, f"{where}.classes", f"task {name!r} has no classes.",
                              "list at least one class name, or remove the task.")
    seen_classes = {}
    for j, c in enumerate(classes):
      if not isinstance(c, str) or not c:
        raise _task_table_error(source, f"{where}.classes[{j}]",
                                f"{c!r} is not a non-empty string.", "name the class.")
      if c in seen_classes:
        raise _task_table_error(source, f"{where}.classes[{j}]",
                                f"duplicate class name {c!r} in task {name!r} "
                                f"(also classes[{seen_classes[c]}]).",
                                "give every class of a task its own name.")
      seen_classes[c] = j


def read_task_table(catalogue_dir: str | os.PathLike) -> TaskTable:
  """Reads and checks `<catalogue_dir>/tasks.json`."""
  path = Path(catalogue_dir) / TASKS_FILE
  if not path.is_file():
    raise CatalogueError(f"{path}: missing. Fix: write the task table described in "
                         "mtl_jax/catalogue.py, or point at the right catalogue directory.")
  return TaskTable.from_json(path.read_text(encoding="utf-8"), source=str(path))


def open_embeddings(catalogue_dir: str | os.PathLike, table: TaskTable) -> np.ndarray:
  """Memory-maps `image_embeddings.npy` and checks its shape and dtype (file-level errors).

  Returns a `[N, D]` read-only array; `[0, D]` float32 when the file is absent.
  """
  path = Path(catalogue_dir) / EMBEDDINGS_FILE
  if not path.exists():
    return np.zeros((0, table.image_dim), np.float32)
  emb = read_embeddings_array(path, str(path))
  if emb.ndim != 2 or emb.shape[1] != table.image_dim:
    raise CatalogueError(f"{path}, field 'shape': {emb.shape} is not [N, {table.image_dim}] "
                         f"(image_dim in {TASKS_FILE}). Fix: save one {table.image_dim}-wide "
                         f"row per image, or set image_dim in {TASKS_FILE} to the embeddings' "
                         "width.")
  return emb


def read_embeddings_array(path: str | os.PathLike, name: str) -> np.ndarray:
  """Memory-maps a float16/float32 .npy array, never unpickled; errors begin with `name`."""
  fix = "Fix: save a float16/float32 array with np.save(path, array), without pickles."
  try:
    with open(path, "rb") as f:
      is_npy = f.read(6) == b"\x93NUMPY"
    if is_npy:
      emb = np.load(path, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError) as e:  # Object arrays (pickles), malformed headers.
    raise CatalogueError(f"{name}: not a plain .npy array ({e}). {fix}") from None
  if not is_npy:
    raise CatalogueError(f"{name}: not a .npy file. {fix}")
  if emb.dtype not in (np.float16, np.float32):
    raise CatalogueError(f"{name}, field 'dtype': {emb.dtype} is not float16 or float32. Fix: "
                         "save the array as float16 or float32.")
  return emb


def nonfinite_rows(embeddings: np.ndarray, chunk_rows: int = 1 << 16) -> np.ndarray:
  """bool [N]: rows holding a NaN or Inf, scanned in chunks so the file stays memory-mapped."""
  bad = np.zeros(embeddings.shape[0], dtype=bool)
  for start in range(0, embeddings.shape[0], chunk_rows):
    block = np.asarray(embeddings[start:start + chunk_rows])
    bad[start:start + len(block)] = ~np.isfinite(block).all(axis=1)
  return bad


class Record(NamedTuple):
  """One valid product, with its task, label and images as indices."""
  id: str
  task: int
  label: int
  title: str
  description: str
  images: tuple[int, ...]


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def validate_record(line: str | bytes, table: TaskTable, *, num_embeddings: int,
                    file: str = "<record>", line_no: int = 0,
                    bad_rows: np.ndarray | None = None,
                    seen_ids: set[str] | None = None) -> Record:
  """Checks one line of a split file and returns its `Record`.

  Args:
    line: the line's text (bytes are decoded as UTF-8).
    table: the catalogue's task table.
    num_embeddings: N, the number of rows of image_embeddings.npy.
    file: the file's name for messages.
    line_no: 1-based line number for messages.
    bad_rows: optional bool [N] of non-finite embedding rows (see `nonfinite_rows`).
    seen_ids: ids of the records accepted so far; a valid record's id is added to it.

  Raises:
    BadRecordError: naming the file, line, field, problem and fix.
  """

  def bad(field, reason, problem, fix, task=UNKNOWN_TASK):
    return BadRecordError(file, line_no, field, reason, problem, fix, task)

  try:
    obj = json.loads(line)
  except ValueError as e:  # Also catches invalid UTF-8.
    raise bad("<line>", "not_json", f"not valid JSON ({e}).",
              "write one JSON object per line (a stray line break inside a string breaks it).")
  if not isinstance(obj, dict):
    raise bad("<line>", "not_object", f"a JSON {type(obj).__name__}, not an object.",
              'write one object per line: {"id": ..., "task": ..., "label": ..., ...}.')

  task_name = obj.get("task")
  task = table._task_ids.get(task_name) if isinstance(task_name, str) else None
  if task is None:
    problem = "missing." if "task" not in obj else f"{task_name!r} is not a task in {TASKS_FILE}."
    raise bad("task", "unknown_task", problem,
              f"use a task name listed in {TASKS_FILE}, or add the task there.")
  task_name = table.names[task]

  rec_id = obj.get("id")
  if not isinstance(rec_id, str) or not rec_id:
    problem = "missing." if "id" not in obj else f"{rec_id!r} is not a non-empty string."
    raise bad("id", "missing_id", problem,
              "give every record a unique non-empty string id.", task_name)

  label_name = obj.get("label")
  label = table._class_ids[task].get(label_name) if isinstance(label_name, str) else None
  if label is None:
    problem = ("missing." if "label" not in obj else
               f"{label_name!r} is not a class of task {task_name!r}.")
    raise bad("label", "unknown_label", problem,
              f"use one of the task's class names from {TASKS_FILE}, or add the class to the "
              "task there.", task_name)

  title = obj.get("title")
  if not isinstance(title, str) or not title.strip():
    problem = "missing." if "title" not in obj else f"{title!r} is not a non-empty string."
    raise bad("title", "missing_title", problem,
              "give the product a non-empty title (the description may be empty).", task_name)

  description = obj.get("description", "")
  if not isinstance(description, str):
    raise bad("description", "bad_description", f"{description!r} is not a string.",
              'write the description as a string ("" when there is none).', task_name)

  images = obj.get("images", [])
  if not isinstance(images, list) or not all(_is_int(i) for i in images):
    raise bad("images", "bad_images", f"{images!r} is not a list of integers.",
              f"list the product's row indices into {EMBEDDINGS_FILE} ([] for none).", task_name)
  if len(images) > table.max_images:
    raise bad("images", "too_many_images",
              f"{len(images)} images, more than max_images={table.max_images}.",
              f"keep at most {table.max_images} images per product, or raise max_images in "
              f"{TASKS_FILE}.", task_name)
  for i in images:
    if not 0 <= i < num_embeddings:
      raise bad("images", "image_out_of_range",
                f"row {i} is outside {EMBEDDINGS_FILE}, which has {num_embeddings} rows.",
                f"use row indices 0..{num_embeddings - 1}, or add the missing rows.", task_name)
    if bad_rows is not None and bad_rows[i]:
      raise bad("images", "nonfinite_image", f"row {i} of {EMBEDDINGS_FILE} holds NaN or Inf.",
                "recompute that image's embedding, or drop the image from the record.", task_name)

  if seen_ids is not None:
    if rec_id in seen_ids:
      raise bad("id", "duplicate_id",
                f"{rec_id!r} is already the id of an earlier record (ids are unique across all "
                "splits).", "give each product one record and one unique id.", task_name)
    seen_ids.add(rec_id)
  return Record(rec_id, task, label, title, description, tuple(images))


def parse_valid_record(line: str | bytes, table: TaskTable) -> Record:
  """Parses a line already accepted by `validate_record` (no checks beyond what parsing needs)."""
  obj = loads_line(line)
  task = table._task_ids[obj["task"]]
  return Record(obj["id"], task, table._class_ids[task][obj["label"]], obj["title"],
                obj.get("description", ""), tuple(obj.get("images", ())))


@dataclasses.dataclass
class SplitIndex:
  """Where a split's valid records are, sorted stably by task.

  Attributes:
    offsets: int64 [n], the byte offset of each valid record's line, in task order (and in file
      order within a task).
    tasks: int32 [n], each record's task index (non-decreasing).
    task_offsets: int64 [T + 1]; task t's records are positions task_offsets[t]:task_offsets[t+1].
  """
  offsets: np.ndarray
  tasks: np.ndarray
  task_offsets: np.ndarray

  def __len__(self) -> int:
    return len(self.offsets)


class CatalogueValidator:
  """Validates a catalogue's records in order under a bad-record policy, counting skips.

  Ids are checked for uniqueness across every split this validator sees, so feed it the splits of
  one catalogue in turn (`index_catalogue` does). Memory: one entry per record id, plus the
  small-int index of valid records.

  Attributes:
    table: the task table.
    embeddings: the memory-mapped embedding rows.
    skipped: split -> {task name -> {reason -> count}} of the records dropped under "skip".
  """

  def __init__(self, catalogue_dir: str | os.PathLike, on_bad_record: str = "fail"):
    if on_bad_record not in POLICIES:
      raise ValueError(f"on_bad_record={on_bad_record!r}; expected one of {POLICIES}.")
    self.catalogue_dir = Path(catalogue_dir)
    self.on_bad_record = on_bad_record
    self.table = read_task_table(catalogue_dir)
    self.embeddings = open_embeddings(catalogue_dir, self.table)
    self.bad_rows = nonfinite_rows(self.embeddings)
    self.seen_ids: set[str] = set()
    self.skipped: dict[str, dict[str, dict[str, int]]] = {}

  def check(self, line: str | bytes, split: str, line_no: int,
            file: str | None = None) -> Record | None:
    """The record of `line`, or None when it is bad and the policy is "skip"."""
    try:
      return validate_record(line, self.table, num_embeddings=len(self.embeddings),
                             file=file or split_file(split), line_no=line_no,
                             bad_rows=self.bad_rows, seen_ids=self.seen_ids)
    except BadRecordError as e:
      if self.on_bad_record == "fail":
        raise
      per_task = self.skipped.setdefault(split, {}).setdefault(e.task, {})
      per_task[e.reason] = per_task.get(e.reason, 0) + 1
      return None

  def index_split(self, split: str) -> SplitIndex:
    """First pass over a split file: validates every line and sorts the valid ones by task.

    Same result as calling `check` on every non-blank line in order (same records, skip counts,
    first error and message), but faster: the file is read in blocks, and a line that parses
    into a record passing every check is accepted by an inlined copy of those checks; any other
    line (unreadable, not UTF-8, a check failing, a duplicate id) goes through `check`, which
    raises or counts it exactly as `validate_record` says.
    """
    path = self.catalogue_dir / split_file(split)
    if not path.is_file():
      raise CatalogueError(f"{path}: missing. Fix: write the split file (it may be empty).")
    self.skipped.setdefault(split, {})
    offsets, tasks = array.array("q"), array.array("i")  # 12 bytes a record.
    fast = _FastChecker(self)
    line_no, offset = 0, 0
    for block, final in _read_blocks(path):
      lines = block.split(b"\n")
      last = len(lines) - 1 if final else -1  # The file's last line has no newline.
      for i, line in enumerate(lines):
        line_no += 1
        size = len(line) + 1
        if line.strip():
          task = fast(line)
          if task is None:  # The reference path decides, with the line as the file holds it.
            record = self.check(line if i == last else line + b"\n", split, line_no,
                                file=str(path))
            task = None if record is None else record.task
          if task is not None:
            offsets.append(offset)
            tasks.append(task)
        offset += size
    offsets = np.frombuffer(offsets, dtype=np.int64) if offsets else np.zeros(0, np.int64)
    tasks = np.frombuffer(tasks, dtype=np.int32) if tasks else np.zeros(0, np.int32)
    order = np.argsort(tasks, kind="stable")  # Stable: file order within a task.
    counts = np.bincount(tasks, minlength=self.table.num_tasks)
    task_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SplitIndex(offsets[order], tasks[order], task_offsets)


_BLOCK_BYTES = 8 << 20
_JSON_SPACE = json.decoder.WHITESPACE.match
_SCAN = json.JSONDecoder().scan_once  # What json.loads runs, without its per-call overhead.


def _read_blocks(path: Path) -> Iterator[tuple[bytes, bool]]:
  """The file's bytes in blocks of whole lines, each without its final newline, and whether it is
  the last block.

  Splitting the blocks on b"\\n" gives the lines that iterating over the file in binary mode
  gives, in order, without their newlines; the last block's last line is the file's text after
  its last newline (empty, so blank, when the file ends in one).
  """
  rest = b""
  with open(path, "rb") as f:
    while chunk := f.read(_BLOCK_BYTES):
      chunk = rest + chunk
      cut = chunk.rfind(b"\n")
      if cut < 0:
        rest = chunk
        continue
      yield chunk[:cut], False
      rest = chunk[cut + 1:]
  yield rest, True


def loads_line(line: str | bytes) -> Any:
  """`json.loads(line)`, faster on the usual line (UTF-8, one JSON value, no BOM)."""
  try:
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    if text[:1] != "\ufeff" and "\x00" not in text[:4]:
      obj, end = _SCAN(text, 0 if text[:1] == "{" else _JSON_SPACE(text, 0).end())
      if end == len(text) or _JSON_SPACE(text, end).end() == len(text):
        return obj
  except (UnicodeDecodeError, StopIteration, ValueError):
    pass
  return json.loads(line)  # The exact behaviour, errors included.


class _FastChecker:
  """The task index of a line `validate_record` accepts, or None to let `check` decide.

  It accepts exactly what `validate_record` accepts, applying the same checks in a form that is
  cheap for the valid lines that make up almost all of a catalogue, and records the id as seen.
  Returning None is always safe: the line then goes through the reference path.
  """

  def __init__(self, validator: CatalogueValidator):
    table = validator.table
    self.task_ids = table._task_ids
    self.class_ids = table._class_ids
    self.max_images = table.max_images
    self.num_embeddings = len(validator.embeddings)
    self.bad_rows = frozenset(np.flatnonzero(validator.bad_rows).tolist())
    self.seen_ids = validator.seen_ids

  def __call__(self, line: bytes) -> int | None:
    try:
      text = line.decode("utf-8")
    except UnicodeDecodeError:
      return None
    # json.loads(bytes) guesses UTF-16/32 from NULs in the first bytes, and drops a UTF-8 BOM.
    if text[:1] == "\ufeff" or "\x00" in text[:4]:
      return None
    try:
      obj, end = _SCAN(text, 0 if text[0] == "{" else _JSON_SPACE(text, 0).end())
    except (StopIteration, ValueError):
      return None
    if type(obj) is not dict or (end != len(text) and _JSON_SPACE(text, end).end() != len(text)):
      return None
    get = obj.get
    task_name = get("task")
    task = self.task_ids.get(task_name) if type(task_name) is str else None
    rec_id = get("id")
    if task is None or type(rec_id) is not str or not rec_id or rec_id in self.seen_ids:
      return None
    label = get("label")
    if type(label) is not str or label not in self.class_ids[task]:
      return None
    title = get("title")
    if type(title) is not str or not title.strip():
      return None
    if type(get("description", "")) is not str:
      return None
    images = get("images", [])
    if type(images) is not list:
      return None
    if images:
      if len(images) > self.max_images:
        return None
      for i in images:
        if type(i) is not int or not 0 <= i < self.num_embeddings or i in self.bad_rows:
          return None
    self.seen_ids.add(rec_id)
    return task


def index_catalogue(catalogue_dir: str | os.PathLike, on_bad_record: str = "fail"
                    ) -> tuple[CatalogueValidator, dict[str, SplitIndex]]:
  """Validates all splits (train, validation, test in that order) and indexes them by task.

  Raises:
    CatalogueError: on a file-level problem, on the first bad record under "fail", or when a task
      is left without training records.
  """
  validator = CatalogueValidator(catalogue_dir, on_bad_record)
  indices = {split: validator.index_split(split) for split in SPLITS}
  train_counts = np.diff(indices["train"].task_offsets)
  empty = np.flatnonzero(train_counts == 0)
  if len(empty):
    table = validator.table
    named = ", ".join(f"{table.names[t]!r} (tasks[{t}])" for t in empty[:5])
    more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
    dropped = sum(sum(validator.skipped["train"].get(table.names[t], {}).values())
                  for t in empty)
    raise CatalogueError(
        f"{Path(catalogue_dir) / split_file('train')}, field 'task': task {named}{more} has no "
        f"valid training records ({dropped} of its training records were skipped as bad). "
        f"Fix: add training records for it, or remove it from {TASKS_FILE}.")
  return validator, indices


def iter_records(catalogue_dir: str | os.PathLike, split: str, index: SplitIndex,
                 table: TaskTable) -> Iterator[Record]:
  """Second pass: yields the indexed records in task order by seeking to each line."""
  with open(Path(catalogue_dir) / split_file(split), "rb") as f:
    for offset in index.offsets:
      f.seek(int(offset))
      yield parse_valid_record(f.readline(), table)


def is_complete(catalogue_dir: str | os.PathLike) -> bool:
  """Whether a generated catalogue finished writing (its `_COMPLETE` marker exists)."""
  return (Path(catalogue_dir) / COMPLETE_MARKER).exists()


def gather_images(record_images: tuple[int, ...], embeddings: np.ndarray,
                  max_images: int) -> np.ndarray:
  """float32 [K, D]: a record's embedding rows, zero-padded to `max_images`."""
  out = np.zeros((max_images, embeddings.shape[1]), np.float32)
  if record_images:
    out[:len(record_images)] = embeddings[list(record_images)]
  return out

