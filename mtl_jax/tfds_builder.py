"""TFDS builder and loader for a product catalogue (see `mtl_jax.catalogue` for the format).

`load_catalogue(catalogue_dir, data_dir)` prepares the catalogue once into `data_dir` as
ArrayRecord files (no TensorFlow needed) and returns random-access sources for train, validation
and test, the task table, where each task's records are, and what was skipped.

Preparation validates every record (`mtl_jax.catalogue`) under the `on_bad_record` policy, then
writes each split grouped by task in task-index order, whatever the order of the user's JSONL: a
first pass keeps (task, byte offset) of each valid line, a stable sort orders them, and a second
pass seeks to each line and yields it. Memory is a few small ints per record, plus the set of ids
used to catch duplicates.

Where prepared data lives: `data_dir/product_catalogue/<policy>-<fingerprint>/1.0.0/`. The
fingerprint is a content hash of the catalogue's files, so an unchanged catalogue is prepared
once and reused (even when copied elsewhere), and a changed one is prepared anew beside it. The
task table, per-split task offsets and skip counts are stored in that folder's metadata.json
(`skipped.json` repeats the skip counts for people reading the folder).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

tfds.disable_progress_bar()  # Progress is printed by the train loop; bars garble logs.
from etils import epath

from mtl_jax import catalogue as cat

NAME = "product_catalogue"
SKIPPED_FILE = "skipped.json"
_HASH_CHUNK = 1 << 20


def fingerprint(catalogue_dir: str | os.PathLike) -> str:
  """A content hash of the catalogue's files (16 hex digits)."""
  h = hashlib.sha256()
  names = [cat.TASKS_FILE, cat.EMBEDDINGS_FILE] + [cat.split_file(s) for s in cat.SPLITS]
  for name in names:
    path = Path(catalogue_dir) / name
    h.update(name.encode() + b"\0")
    if not path.exists():
      h.update(b"<absent>\0")
      continue
    with open(path, "rb") as f:
      while chunk := f.read(_HASH_CHUNK):
        h.update(chunk)
    h.update(b"\0")
  return h.hexdigest()[:16]


class ProductCatalogueConfig(tfds.core.BuilderConfig):
  """Which catalogue to prepare, and what to do with bad records."""

  def __init__(self, *, catalogue_dir: str, on_bad_record: str = "fail", **kwargs):
    if on_bad_record not in cat.POLICIES:
      raise ValueError(f"on_bad_record={on_bad_record!r}; expected one of {cat.POLICIES}.")
    name = f"{on_bad_record}-{fingerprint(catalogue_dir)}"
    super().__init__(name=name, **kwargs)
    self.catalogue_dir = os.fspath(catalogue_dir)
    self.on_bad_record = on_bad_record


class ProductCatalogue(tfds.core.GeneratorBasedBuilder):
  """A product catalogue as train/validation/test splits, records grouped by task.

  Features: `id` (text), `task` and `label` (int64 indices into the task table), `title` and
  `description` (text), `images` (float32 [K, D], zero-padded) and `num_images` (int64).
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  # TFDS 4.9.10 finds a builder's code through the `importlib_resources` backport, which Python
  # 3.11 installs lack; naming the file here skips that look-up (there are no checksums to find).
  code_path = epath.Path(__file__)

  def __init__(self, *, catalogue_dir: str | os.PathLike | None = None,
               on_bad_record: str = "fail", config: ProductCatalogueConfig | None = None,
               **kwargs):
    if config is None:  # `config` is given when TFDS unpickles a builder (data-source workers).
      config = ProductCatalogueConfig(catalogue_dir=os.fspath(catalogue_dir),
                                      on_bad_record=on_bad_record, version=self.VERSION)
    kwargs.setdefault("file_format", "array_record")  # Random access; written without TF.
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    table = cat.read_task_table(self.builder_config.catalogue_dir)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "task": tfds.features.Scalar(np.int64),
            "label": tfds.features.Scalar(np.int64),
            "title": tfds.features.Text(),
            "description": tfds.features.Text(),
            "images": tfds.features.Tensor(shape=(table.max_images, table.image_dim),
                                           dtype=np.float32),
            "num_images": tfds.features.Scalar(np.int64),
        }),
        disable_shuffling=True,  # Keep the task grouping the loader's offsets rely on.
        metadata=tfds.core.MetadataDict(),
        description="A product catalogue: one classification task per website.",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    validator, indices = cat.index_catalogue(config.catalogue_dir, config.on_bad_record)
    table = validator.table
    metadata = self.info.metadata
    metadata["task_table"] = table.to_json()
    metadata["task_offsets"] = {s: idx.task_offsets.tolist() for s, idx in indices.items()}
    metadata["skipped"] = validator.skipped
    metadata["fingerprint"] = config.name
    Path(self.data_dir).mkdir(parents=True, exist_ok=True)
    (Path(self.data_dir) / SKIPPED_FILE).write_text(json.dumps(validator.skipped, indent=1))
    # TFDS rejects empty splits; the loader gives those an empty source.
    return {split: self._generate_examples(split, index, validator)
            for split, index in indices.items() if len(index)}

  def _generate_examples(self, split: str, index: cat.SplitIndex,
                         validator: cat.CatalogueValidator):
    table, emb = validator.table, validator.embeddings
    records = cat.iter_records(self.builder_config.catalogue_dir, split, index, table)
    for position, record in enumerate(records):
      # Integer keys in order: with shuffling disabled, TFDS writes records in key order.
      yield position, {
          "id": record.id,
          "task": record.task,
          "label": record.label,
          "title": record.title,
          "description": record.description,
          "images": cat.gather_images(record.images, emb, table.max_images),
          "num_images": len(record.images),
      }


_TEXT_FIELDS = ("id", "title", "description")


def _to_str(example: dict[str, Any]) -> dict[str, Any]:
  for key in _TEXT_FIELDS:
    value = example[key]
    if isinstance(value, bytes):
      example[key] = value.decode("utf-8")
  return example


class CatalogueSource:
  """Random access to one split; text fields come back as `str`.

  `len(src)`, `src[i]` and `src.__getitems__(indices)` (a list of examples, read in one batch).
  """

  def __init__(self, source: Any | None):
    self._source = source

  def __len__(self) -> int:
    return 0 if self._source is None else len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._source is None:
      raise IndexError(f"index {index} of an empty split")
    return _to_str(dict(self._source[int(index)]))

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    if len(indices) == 0:
      return []
    if self._source is None:
      raise IndexError("indices of an empty split")
    indices = [int(i) for i in indices]
    many = getattr(self._source, "__getitems__", None)
    items = many(indices) if many else [self._source[i] for i in indices]
    return [_to_str(dict(x)) for x in items]

  def __repr__(self) -> str:
    return f"CatalogueSource(len={len(self)})"


@dataclasses.dataclass
class Catalogue:
  """A prepared catalogue.

  Attributes:
    task_table: tasks, class names and image shape.
    sources: split -> `CatalogueSource`; `src[i]` is a dict of numpy values: id, title,
      description (str), task, label, num_images (int64), images (float32 [K, D]).
    task_offsets: split -> int64 [T + 1]; task t's records are indices off[t]:off[t+1].
    skipped: split -> {task name -> {reason -> count}} of bad records skipped.
    data_path: the prepared dataset's folder.
  """
  task_table: cat.TaskTable
  sources: dict[str, Any]
  task_offsets: dict[str, np.ndarray]
  skipped: dict[str, dict]
  data_path: str = ""

  def num_examples(self, split: str) -> np.ndarray:
    """int64 [T]: each task's record count in `split`."""
    return np.diff(self.task_offsets[split])


def load_catalogue(catalogue_dir: str | os.PathLike, data_dir: str | os.PathLike,
                   on_bad_record: str = "fail") -> Catalogue:
  """Prepares `catalogue_dir` into `data_dir` unless already there, and opens it.

  Args:
    catalogue_dir: a catalogue in the format of `mtl_jax.catalogue`.
    data_dir: where TFDS keeps prepared datasets; nothing is written elsewhere.
    on_bad_record: "fail" (raise at the first bad record) or "skip" (drop and count).

  Raises:
    CatalogueError: a bad catalogue (see `mtl_jax.catalogue`).
  """
  data_dir = os.fspath(data_dir)
  builder = ProductCatalogue(catalogue_dir=catalogue_dir, on_bad_record=on_bad_record,
                             data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_dir=os.path.join(data_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ),
    )
  metadata = builder.info.metadata
  table = cat.TaskTable.from_json(metadata["task_table"], source=f"{builder.data_path}")
  sources = builder.as_data_source()
  return Catalogue(
      task_table=table,
      sources={s: CatalogueSource(sources.get(s)) for s in cat.SPLITS},
      task_offsets={s: np.asarray(metadata["task_offsets"][s], np.int64) for s in cat.SPLITS},
      skipped={s: metadata["skipped"].get(s, {}) for s in cat.SPLITS},
      data_path=os.fspath(builder.data_path),
  )
