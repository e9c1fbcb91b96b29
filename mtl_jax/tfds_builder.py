"""TFDS builder and loader for a product catalogue (see `mtl_jax.catalogue` for the format).

`load_catalogue(catalogue_dir, data_dir)` prepares the catalogue once into `data_dir` as
ArrayRecord files (no TensorFlow needed) and returns random-access sources for train, validation
and test, the task table, where each task's records are, and what was skipped.

Preparation validates every record (`mtl_jax.catalogue`) under the `on_bad_record` policy, then
writes each split grouped by task in task-index order, whatever the order of the user's JSONL: a
first pass keeps (task, byte offset) of each valid line, a stable sort orders them, and a second
pass seeks to each line and yields it. Memory is a few small ints per record, plus the set of ids
used to catch duplicates.

Writing. TFDS's generic path (`_generate_examples` -> feature encoding -> `tf.train.Example`
protos built field by field -> an in-memory shuffler -> shards) costs ~120 us per record, most of
it in TFDS's per-example Python; at 10,000 tasks (~4 M records) that is most of an hour. So
`_generate_splits` writes the shards itself (`writer="direct"`, the default): the index's records,
in its order, are serialized by `_ExampleEncoder` into the same `tf.train.Example` bytes TFDS
writes (keys in sorted order, i.e. TFDS's protos serialized deterministically; tested byte for
byte), image rows gathered a block at a time, into ArrayRecord shards of at most
`RECORDS_PER_SHARD` records. Shards are written in worker processes when the catalogue is big
(`workers`). The result is an ordinary TFDS dataset (`dataset_info.json`, `features.json`,
ArrayRecord shards): `tfds.builder_from_directory(path).as_data_source()` reads it.
`writer="tfds"` keeps TFDS's own path (the reference the tests compare with).

Reading. `CatalogueSource` reads the raw records of a batch straight from the split's ArrayRecord
shards (seek and read: no thread pool, no per-call scan of the shard's index) and decodes them
itself (`decode_records`: protobuf parsing, the image floats straight from their bytes) to the
values TFDS's decoder gives, ~20x faster than TFDS's generic numpy decoding.

Where prepared data lives: `data_dir/product_catalogue/<policy>-<fingerprint>/1.0.0/`. The
fingerprint is a content hash of the catalogue's files, so an unchanged catalogue is prepared
once and reused (even when copied elsewhere), and a changed one is prepared anew beside it. The
task table, per-split task offsets and skip counts are stored in that folder's metadata.json
(`skipped.json` repeats the skip counts for people reading the folder).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import mmap
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

tfds.disable_progress_bar()  # Progress is printed by the train loop; bars garble logs.
from absl import logging  # noqa: E402
from array_record.python import array_record_module  # noqa: E402
from etils import epath  # noqa: E402
from tensorflow_datasets.core import splits as splits_lib  # noqa: E402
from tensorflow_datasets.proto import tf_example_pb2  # noqa: E402

from mtl_jax import catalogue as cat  # noqa: E402
from mtl_jax import workers as workers_lib  # noqa: E402

NAME = "product_catalogue"
SKIPPED_FILE = "skipped.json"
WRITERS = ("direct", "tfds")
RECORDS_PER_SHARD = 1 << 18
# One record per chunk (random access), as TFDS writes; snappy rather than TFDS's default zstd:
# a third of the write time (zstd was ~40% of preparation) and faster reads, ~20% larger files.
ARRAY_RECORD_OPTIONS = "group_size:1,snappy"
# Catalogues with at least this many valid records are written by worker processes.
PARALLEL_MIN_RECORDS = 200_000
_HASH_CHUNK = 1 << 20
_ENCODE_BLOCK = 4096


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
               writer: str = "direct", workers: int | None = None, **kwargs):
    if config is None:  # `config` is given when TFDS unpickles a builder (data-source workers).
      config = ProductCatalogueConfig(catalogue_dir=os.fspath(catalogue_dir),
                                      on_bad_record=on_bad_record, version=self.VERSION)
    if writer not in WRITERS:
      raise ValueError(f"writer={writer!r}; expected one of {WRITERS}.")
    self._writer, self._workers = writer, workers
    kwargs.setdefault("file_format", "array_record")  # Random access; written without TF.
    super().__init__(config=config, **kwargs)

  # TFDS announces a download of "Unknown size" and its reuse; here nothing is downloaded.
  def _log_download_bytes(self) -> None:
    print(f"Preparing {self.builder_config.catalogue_dir} (ArrayRecord shards) in "
          f"{self.data_dir}", flush=True)

  def _log_download_done(self) -> None:
    pass

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

  def _index(self):
    """Validates and indexes the catalogue, and records what the loader needs in metadata."""
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
    return validator, indices

  def _split_generators(self, dl_manager):
    del dl_manager
    validator, indices = self._index()
    # TFDS rejects empty splits; the loader gives those an empty source.
    return {split: self._generate_examples(split, index, validator)
            for split, index in indices.items() if len(index)}

  def _generate_splits(self, dl_manager, download_config):
    """Writes every split's shards directly (see the module docstring); returns SplitInfos."""
    if self._writer == "tfds":
      return super()._generate_splits(dl_manager, download_config)
    validator, indices = self._index()
    table = validator.table
    total = sum(len(index) for index in indices.values())
    workers = self._workers
    if workers is None:
      workers = min(_cpu_count(), 4) if total >= PARALLEL_MIN_RECORDS else 1
    jobs, templates = [], {}
    for split, index in indices.items():
      if not len(index):  # TFDS rejects empty splits; the loader gives those an empty source.
        continue
      template = self._get_filename_template(split_name=split)
      templates[split] = template
      num_shards = -(-len(index) // RECORDS_PER_SHARD)
      bounds = np.linspace(0, len(index), num_shards + 1).astype(np.int64)
      for shard in range(num_shards):
        lo, hi = int(bounds[shard]), int(bounds[shard + 1])
        jobs.append((split, shard, _ShardJob(
            catalogue_dir=self.builder_config.catalogue_dir, split=split,
            path=os.fspath(template.sharded_filepath(shard_index=shard, num_shards=num_shards)),
            offsets=index.offsets[lo:hi], tasks=index.tasks[lo:hi],
            max_images=table.max_images, image_dim=table.image_dim)))
    if workers > 1 and len(jobs) > 1:
      results = dict(zip([(split, shard) for split, shard, _ in jobs],
                         _write_in_workers([job for _, _, job in jobs], workers, table,
                                           validator.embeddings)))
    else:
      embeddings = validator.embeddings
      results = {(split, shard): _write_shard(job, table, embeddings)
                 for split, shard, job in jobs}
    infos = []
    for split, template in templates.items():
      shards = sorted((shard, r) for (s, shard), r in results.items() if s == split)
      infos.append(splits_lib.SplitInfo(
          name=split, shard_lengths=[int(r[0]) for _, r in shards],
          num_bytes=int(sum(r[1] for _, r in shards)), filename_template=template))
    return infos

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


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def _varint(n: int) -> bytes:
  """Protobuf base-128 varint of a non-negative int."""
  out = bytearray()
  while n >= 0x80:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


_VARINT = [_varint(n) for n in range(1 << 14)]


def _v(n: int) -> bytes:
  return _VARINT[n] if n < 16384 else _varint(n)


class _ExampleEncoder:
  """Serializes one record as the `tf.train.Example` TFDS writes for ProductCatalogue's features.

  Bytes for bytes, the result equals TFDS's proto (`ExampleSerializer(...).get_tf_example(...)`)
  serialized with `deterministic=True`: map entries in key order, packed numbers. The wire
  format is written out here (lengths computed, one join per record); the task, label and
  image-count entries are cached per value, and the images entry's header is constant (images
  are always padded to [K, D]).
  """

  def __init__(self, max_images: int, image_dim: int):
    self.image_bytes = payload = 4 * max_images * image_dim
    self._ints = {key: {} for key in ("label", "num_images", "task")}
    # Map-entry prefix of each text key: key field, then the tag of the value (a Feature).
    self._keys = {key: b"\n" + _v(len(key)) + key + b"\x12"
                  for key in (b"description", b"id", b"title")}
    floats = (b"\n" + _v(payload)) if payload else b""  # An empty packed field is left out.
    feature_len = 1 + len(_v(len(floats) + payload)) + len(floats) + payload
    self._images_head = (self._entry_head(b"images", feature_len) + b"\x12"
                         + _v(len(floats) + payload) + floats)

  @staticmethod
  def _entry_head(key: bytes, feature_len: int) -> bytes:
    """The bytes of a `Features.feature` map entry up to its Feature message's own bytes."""
    entry_len = 1 + len(_v(len(key))) + len(key) + 1 + len(_v(feature_len)) + feature_len
    return b"\n" + _v(entry_len) + b"\n" + _v(len(key)) + key + b"\x12" + _v(feature_len)

  def _int_entry(self, key: str, value: int) -> bytes:
    cache = self._ints[key]
    entry = cache.get(value)
    if entry is None:
      packed = _varint(value)
      values = b"\n" + _v(len(packed)) + packed  # Int64List.value (packed)
      feature = b"\x1a" + _v(len(values)) + values  # Feature.int64_list
      entry = cache[value] = self._entry_head(key.encode(), len(feature)) + feature
    return entry

  def _text_entry(self, pieces: list, key: bytes, value: bytes) -> int:
    """Appends a text entry's pieces: Features.feature{key, Feature{bytes_list{[value]}}}."""
    n = len(value)
    vn = _VARINT[n] if n < 16384 else _varint(n)
    list_len = 1 + len(vn) + n  # BytesList: field 1, length, value.
    vl = _VARINT[list_len] if list_len < 16384 else _varint(list_len)
    feature_len = 1 + len(vl) + list_len  # Feature: field 1 (bytes_list), length, BytesList.
    vf = _VARINT[feature_len] if feature_len < 16384 else _varint(feature_len)
    prefix = self._keys[key]
    entry_len = len(prefix) + len(vf) + feature_len
    ve = _VARINT[entry_len] if entry_len < 16384 else _varint(entry_len)
    pieces += (b"\n", ve, prefix, vf, b"\n", vl, b"\n", vn, value)
    return 1 + len(ve) + entry_len

  def encode(self, rec_id: bytes, title: bytes, description: bytes, task: int, label: int,
             num_images: int, images: bytes) -> bytes:
    """`images`: the float32 [K, D] padded images' bytes (little-endian)."""
    pieces = [b"\n", b""]  # Example.features: field 1, length (filled in below), Features.
    size = self._text_entry(pieces, b"description", description)
    size += self._text_entry(pieces, b"id", rec_id)
    ints = self._ints
    label_e = ints["label"].get(label) or self._int_entry("label", label)
    count_e = ints["num_images"].get(num_images) or self._int_entry("num_images", num_images)
    task_e = ints["task"].get(task) or self._int_entry("task", task)
    pieces += (self._images_head, images, label_e, count_e, task_e)
    size += (len(self._images_head) + len(images) + len(label_e) + len(count_e) + len(task_e))
    size += self._text_entry(pieces, b"title", title)
    pieces[1] = _VARINT[size] if size < 16384 else _varint(size)
    return b"".join(pieces)


@dataclasses.dataclass
class _ShardJob:
  """One shard to write: the records at `offsets` (task `tasks`) of a split file, in order."""
  catalogue_dir: str
  split: str
  path: str
  offsets: np.ndarray
  tasks: np.ndarray
  max_images: int
  image_dim: int


def _write_in_workers(jobs: list[_ShardJob], workers: int, table: cat.TaskTable,
                      embeddings: np.ndarray) -> list[tuple[int, int]]:
  """Runs `_write_shard` on every job in `workers` processes (this one included), in parallel.

  The others are `mtl_jax.workers` subprocesses. Each process gets a share of the shards
  balanced by record count, largest first.
  """
  bins = [[] for _ in range(min(workers, len(jobs)))]
  load = [0] * len(bins)
  for i in sorted(range(len(jobs)), key=lambda i: -len(jobs[i].offsets)):
    b = load.index(min(load))
    bins[b].append(i)
    load[b] += len(jobs[i].offsets)
  results = [None] * len(jobs)
  started = []
  with tempfile.TemporaryDirectory(prefix="mtl_jax_shards_") as tmp:
    try:
      for b, members in enumerate(bins[1:], start=1):
        job = [{**dataclasses.asdict(jobs[i]), "offsets": jobs[i].offsets.tolist(),
                "tasks": jobs[i].tasks.tolist()} for i in members]
        started.append((members, workers_lib.Worker(
            "mtl_jax.tfds_builder._write_shards", job, os.path.join(tmp, str(b)),
            "Writing ArrayRecord shards")))
      for i in bins[0]:
        results[i] = _write_shard(jobs[i], table, embeddings)
      for members, worker in started:
        for i, result in zip(members, worker.result()):
          results[i] = tuple(result)
    finally:
      for _, worker in started:
        worker.kill()
  return results


def _write_shards(jobs: list[dict[str, Any]]) -> list[tuple[int, int]]:
  """In a worker process: `_write_shard` on each job (as JSON)."""
  return [_write_shard(_ShardJob(**{**job, "offsets": np.asarray(job["offsets"], np.int64),
                                    "tasks": np.asarray(job["tasks"], np.int32)}))
          for job in jobs]


def _write_shard(job: _ShardJob, table: cat.TaskTable | None = None,
                 embeddings: np.ndarray | None = None) -> tuple[int, int]:
  """Writes one ArrayRecord shard; returns (records, bytes of serialized records)."""
  if table is None:
    table = cat.read_task_table(job.catalogue_dir)
  if embeddings is None:
    embeddings = cat.open_embeddings(job.catalogue_dir, table)
  k, d = job.max_images, job.image_dim
  encoder = _ExampleEncoder(k, d)
  class_ids = table._class_ids
  size = encoder.image_bytes
  num_bytes = 0
  writer = array_record_module.ArrayRecordWriter(job.path, ARRAY_RECORD_OPTIONS)
  encode, write = encoder.encode, writer.write
  try:
    with open(Path(job.catalogue_dir) / cat.split_file(job.split), "rb") as f, \
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as text:
      for start in range(0, len(job.offsets), _ENCODE_BLOCK):
        offsets = job.offsets[start:start + _ENCODE_BLOCK].tolist()
        tasks = job.tasks[start:start + _ENCODE_BLOCK].tolist()
        records, image_lists = [], []
        for offset in offsets:
          end = text.find(b"\n", offset)
          obj = cat.loads_line(text[offset:end if end >= 0 else len(text)])
          records.append(obj)
          image_lists.append(obj.get("images", ()))
        # The block's images, padded: [B, K, D] float32, gathered in one read of the rows.
        rows = np.full((len(records), k), -1, np.int64)
        for i, images in enumerate(image_lists):
          if images:
            rows[i, :len(images)] = images
        if size and len(embeddings):
          block = embeddings[np.maximum(rows, 0).ravel()].astype("<f4").reshape(-1, k, d)
          block[rows < 0] = 0
          block = block.tobytes()
        else:
          block = bytes(size * len(records))
        for i, obj in enumerate(records):
          task = tasks[i]
          data = encode(obj["id"].encode(), obj["title"].encode(),
                        obj.get("description", "").encode(), task,
                        class_ids[task][obj["label"]], len(image_lists[i]),
                        block[i * size:(i + 1) * size])
          write(data)
          num_bytes += len(data)
  finally:
    writer.close()
  return len(job.offsets), num_bytes


_TEXT_FIELDS = ("id", "title", "description")


def _to_str(example: dict[str, Any]) -> dict[str, Any]:
  for key in _TEXT_FIELDS:
    value = example[key]
    if isinstance(value, bytes):
      example[key] = value.decode("utf-8")
  return example


_FEATURE_KEYS = frozenset(("id", "task", "label", "title", "description", "images",
                           "num_images"))


def decode_records(records: Sequence[bytes], image_shape: tuple[int, int]
                   ) -> list[dict[str, Any]] | None:
  """What TFDS's decoder makes of ProductCatalogue records, text fields as `str`, or None.

  Per record: {"description", "id", "images", "label", "num_images", "task", "title"} with str
  text, int task/label/num_images and float32 `images` [K, D] (views of one writable array).
  Any record that is not exactly these features gives None: decode those through TFDS.
  """
  k, d = image_shape
  payload = 4 * k * d
  head = 1 + len(_v(payload)) if payload else 0
  rows, images = [], []
  for data in records:
    feature = tf_example_pb2.Example.FromString(data).features.feature
    if len(feature) != len(_FEATURE_KEYS) or not _FEATURE_KEYS.issuperset(feature.keys()):
      return None
    floats = feature["images"].float_list.SerializeToString()  # Packed: header, then floats.
    if len(floats) != head + payload:
      return None
    images.append(floats[head:])
    try:
      rows.append({
          "description": feature["description"].bytes_list.value[0].decode("utf-8"),
          "id": feature["id"].bytes_list.value[0].decode("utf-8"),
          "label": feature["label"].int64_list.value[0],
          "num_images": feature["num_images"].int64_list.value[0],
          "task": feature["task"].int64_list.value[0],
          "title": feature["title"].bytes_list.value[0].decode("utf-8"),
      })
    except IndexError:
      return None
  block = np.frombuffer(bytearray(b"".join(images)), "<f4").astype(np.float32, copy=False)
  block = block.reshape(len(rows), k, d)
  for i, row in enumerate(rows):
    row["images"] = block[i]
  return [{key: row[key] for key in sorted(row)} for row in rows]


class CatalogueSource:
  """Random access to one split; text fields come back as `str`.

  `len(src)`, `src[i]` and `src.__getitems__(indices)` (a list of examples, read in one batch).
  An index outside [0, len) raises IndexError. Records are read raw from the split's ArrayRecord
  shards (`_read_raw`, in the calling thread) and decoded by `decode_records` (the values TFDS's
  decoder gives, ~20x faster); anything this module did not write goes through TFDS's data
  source and decoder.
  """

  def __init__(self, source: Any | None):
    self._source = source
    self._image_shape = None
    self._shards = None  # (first index of each shard [S + 1], (path, skip) per shard).
    self._readers = {}
    self._lock = threading.Lock()
    try:
      self._image_shape = tuple(source.dataset_info.features["images"].shape)
      instructions = source.dataset_info.splits[source.split].file_instructions
      takes = [int(fi.take) for fi in instructions]
      self._shards = (np.concatenate([[0], np.cumsum(takes)]).astype(np.int64),
                      [(os.fspath(fi.filename), int(fi.skip)) for fi in instructions])
      if self._shards[0][-1] != len(source):
        self._shards = None
    except (AttributeError, KeyError, TypeError, ValueError):
      pass

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_readers"], state["_lock"] = {}, None  # Readers are opened again where unpickled.
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return 0 if self._source is None else len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._source is None:
      raise IndexError(f"index {index} of an empty split")
    return self.__getitems__([index])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    if len(indices) == 0:
      return []
    if self._source is None:
      raise IndexError("indices of an empty split")
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < len(self)]
    if bad:
      raise IndexError(f"index {bad[0]} is outside this split of {len(self)} records")
    if self._image_shape is None:
      many = getattr(self._source, "__getitems__", None)
      items = many(indices) if many else [self._source[i] for i in indices]
      return [_to_str(dict(x)) for x in items]
    records = self._read_raw(indices)
    decoded = decode_records(records, self._image_shape)
    if decoded is None:  # Not the records this module writes: TFDS's decoder knows.
      decoded = [_to_str(dict(self._source._deserialize(r))) for r in records]
    return decoded

  def _reader(self, shard: int):
    """(reader, lock) of one shard, opened on first use."""
    entry = self._readers.get(shard)
    if entry is None:
      with self._lock:
        entry = self._readers.get(shard)
        if entry is None:
          # Sequential reads after a seek, no read-ahead, no thread pool: ~10 us a record.
          entry = self._readers[shard] = (array_record_module.ArrayRecordReader(
              self._shards[1][shard][0], "readahead_buffer_size:0,max_parallelism:0"),
                                          threading.Lock())
    return entry

  def _read_raw(self, indices: list[int]) -> list[bytes]:
    """The records' bytes. Each is read by seek + read: ArrayRecord's batched read by indices
    allocates and scans a vector as long as the shard per call (~5 ns a record of the shard:
    1 ms for a 200k-record shard), which made a random batch of 128 cost ~20 ms at 4 M records.
    """
    if self._shards is None:
      records = list(self._source.data_source.__getitems__(indices))
      if len(records) != len(indices):
        raise IndexError(f"Requested {len(indices)} records but got {len(records)}.")
      return records
    starts, files = self._shards
    index = np.asarray(indices, np.int64)
    shard_of = (np.searchsorted(starts, index, side="right") - 1).tolist()
    positions = (index - starts[shard_of] + np.asarray([files[s][1] for s in shard_of],
                                                        np.int64)).tolist()
    out = []
    for shard, position in zip(shard_of, positions):
      reader, lock = self._reader(shard)
      with lock:
        reader.seek(position)
        out.append(reader.read())
    return out

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


@contextlib.contextmanager
def _tfds_warnings_quiet():
  """TFDS warns that our builder config is "custom" and that a new variant folder has no
  dataset_info.json yet, on every run: both are expected here. Shown again with --verbosity=0."""
  verbosity = logging.get_verbosity()
  if verbosity <= logging.WARNING:
    logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def load_catalogue(catalogue_dir: str | os.PathLike, data_dir: str | os.PathLike,
                   on_bad_record: str = "fail", *, writer: str = "direct",
                   workers: int | None = None) -> Catalogue:
  """Prepares `catalogue_dir` into `data_dir` unless already there, and opens it.

  Args:
    catalogue_dir: a catalogue in the format of `mtl_jax.catalogue`.
    data_dir: where TFDS keeps prepared datasets; nothing is written elsewhere.
    on_bad_record: "fail" (raise at the first bad record) or "skip" (drop and count).
    writer: "direct" (shards written by this module) or "tfds" (TFDS's generic example
      writer; the same records, ~10x slower).
    workers: processes writing shards; default: up to 4 (the usable CPUs) for catalogues of
      `PARALLEL_MIN_RECORDS` records or more, else none (written in this process).

  Raises:
    CatalogueError: a bad catalogue (see `mtl_jax.catalogue`).
  """
  data_dir = os.fspath(data_dir)
  with _tfds_warnings_quiet():
    builder = ProductCatalogue(catalogue_dir=catalogue_dir, on_bad_record=on_bad_record,
                               data_dir=data_dir, writer=writer, workers=workers)
    if not builder.is_prepared():
      builder.download_and_prepare(
          download_dir=os.path.join(data_dir, "downloads"),
          download_config=tfds.download.DownloadConfig(
              try_download_gcs=False,
              compute_stats=tfds.download.ComputeStatsMode.SKIP,
          ),
      )
    metadata = builder.info.metadata
    sources = builder.as_data_source()
  table = cat.TaskTable.from_json(metadata["task_table"], source=f"{builder.data_path}")
  return Catalogue(
      task_table=table,
      sources={s: CatalogueSource(sources.get(s)) for s in cat.SPLITS},
      task_offsets={s: np.asarray(metadata["task_offsets"][s], np.int64) for s in cat.SPLITS},
      skipped={s: metadata["skipped"].get(s, {}) for s in cat.SPLITS},
      data_path=os.fspath(builder.data_path),
  )
