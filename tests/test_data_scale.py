"""The fast data paths give what the reference paths give (issue 14.3).

- generation: the same bytes as the generator before it was optimised (golden digests), with any
  number of worker processes;
- validation: the block-reading, inlined-check `index_split` against the line-by-line reference
  (`CatalogueValidator.check` on every line) on catalogues full of bad lines, under both
  policies: the same index, the same skip counts, the same first error;
- preparation: the direct ArrayRecord writer against TFDS's own writer (`writer="tfds"`): the
  same example protos (byte for byte where deterministic), records, offsets and skips, also when
  shards are written by worker processes; and the result readable by TFDS alone;
- reading: `CatalogueSource` (raw reads, own decoding) against TFDS's data source and decoder;
  the tokenizer and the batches built on top of either are the same.
"""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.proto import tf_example_pb2

from mtl_jax import catalogue as cat
from mtl_jax import config_base, input_pipeline, synthetic, tfds_builder
from mtl_jax import tokenizer as tk


def synthetic_config(**overrides):
  c = config_base.base_config().data.synthetic
  c.num_tasks, c.min_products, c.max_products = 30, 20, 1500
  c.min_classes, c.max_classes, c.image_dim = 3, 12, 16
  for key, value in overrides.items():
    c[key] = value
  return c


def catalogue_digest(directory, stats):
  h = hashlib.sha256()
  for name in ("tasks.json", "image_embeddings.npy", "train.jsonl", "validation.jsonl",
               "test.jsonl"):
    h.update((directory / name).read_bytes())
  stats = dict(stats)
  stats.pop("generation_seconds")
  h.update(json.dumps(stats, sort_keys=True).encode())
  return h.hexdigest()


# sha256 of the files and stats made by the generator before it was optimised (json.dumps per
# record, one process), on the tests' tiny taxonomy.
GOLDEN = {
    "tiny30": ({}, "44023985432f6b12931c17c562853ea987b221929d0044651f0b22fbc66c00f2"),
    "tiny8_seed1_noimg": ({"num_tasks": 8, "seed": 1, "max_images": 0},
                          "4b1adedd218121190fee7ca909c93873dfd6c4a86650cb07aae222c7e2718664"),
}


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_generation_is_byte_identical_to_the_reference(tmp_path, tiny_taxonomy, case, workers):
  overrides, digest = GOLDEN[case]
  out = tmp_path / "c"
  stats = synthetic.generate_catalogue(out, synthetic_config(**overrides), tiny_taxonomy,
                                       workers=workers)
  assert catalogue_digest(out, stats) == digest
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ["_COMPLETE", "image_embeddings.npy", "stats.json", "tasks.json"] +
      [cat.split_file(s) for s in cat.SPLITS])  # No part files left behind.


def test_a_failing_generation_worker_fails_the_run_and_leaves_nothing(tmp_path, tiny_taxonomy,
                                                                      monkeypatch):
  monkeypatch.setattr(synthetic, "_WORKER_FUNCTION", "mtl_jax.synthetic._no_such_function")
  with pytest.raises(RuntimeError, match=r"(?s)failed in a worker process.*_no_such_function"):
    synthetic.generate_catalogue(tmp_path / "c", synthetic_config(num_tasks=6), tiny_taxonomy,
                                 workers=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taxonomy.txt"]


# --- Validation: fast index_split == the line-by-line reference. ---

TASKS = {"shop-a": ["Boots", "Sneakers", "Sandals"], "shop-b": ["Pans", "Kettles"]}


def rec(i, task="shop-a", label="Boots", **overrides):
  r = {"id": f"r{i}", "task": task, "label": label, "title": f"Product {i} \u00e9t\u00e9",
       "description": "A fine product.", "images": [i % 8]}
  r.update(overrides)
  return json.dumps(r)


def drop(line, key):
  r = json.loads(line)
  del r[key]
  return json.dumps(r)


GOOD = [rec(i, *(("shop-b", "Pans") if i % 3 == 0 else ())) for i in range(12)]
# Lines the fast path must not accept on its own, and some it must accept although unusual.
ODD = [
    '{"id": "x", "task": ', "[1, 2, 3]", "   ", "\x0b\x0c", "null", '"a string"',
    drop(rec(90), "title"), rec(91, title="  "), drop(rec(92), "id"), rec(93, id=""),
    rec(94, task="shop-z"), rec(95, task=7), drop(rec(96), "task"),
    rec(97, "shop-b", "Boots"), rec(98, label=["Boots"]), rec(99, images=[3, 10]),
    rec(100, images=[-1]), rec(101, images=[1, 2, 3]), rec(102, images="1,2"),
    rec(103, images=[1.0]), rec(104, images=[True]), rec(105, images=[9]),
    rec(106, description=None), rec(107, description=3), rec(0, label="Sneakers"),
    rec(1, "shop-b", "Pans"), rec(108) + " trailing", rec(109) + " {}", rec(110)[:-1],
    '  ' + rec(111) + '  \r', rec(112, images=[]), drop(rec(113), "images"),
    drop(rec(114), "description"), '{"id": "r115", "task": "shop-a", "task": "shop-b", '
    '"label": "Pans", "title": "t"}', '{"id": "r116", "task": "shop-a", "label": "Boots", '
    '"title": "t", "x": NaN}', rec(117, title="\ud83d\ude00 emoji"),
    "\ufeff" + rec(118),
]
ODD_BYTES = [  # Lines as raw bytes: encodings json.loads(bytes) treats specially.
    b"\xef\xbb\xbf" + rec(120).encode(),  # UTF-8 BOM: json.loads(bytes) accepts it.
    rec(121).encode("utf-16-le"),  # NULs in the first bytes: parsed as UTF-16.
    rec(122).encode()[:-3] + b"\xff\xfe}",  # Invalid UTF-8.
    b'{"id": "r123", "task": "shop-a", "label": "Boots",\n"title": "t"}',  # Split in two.
]


def write_odd_catalogue(directory, write_catalogue, order, final_newline=True):
  emb = np.ones((10, 4), np.float32)
  emb[9, 2] = np.nan
  lines = {"train": [], "validation": [], "test": []}
  every = [l.encode() if isinstance(l, str) else l for l in GOOD + ODD] + ODD_BYTES
  for j, i in enumerate(order):
    lines[("train", "train", "validation", "test")[j % 4]].append(every[i % len(every)])
  write_catalogue(directory, TASKS, {}, embeddings=emb)
  for split, split_lines in lines.items():
    data = b"\n".join(split_lines) + (b"\n" if final_newline else b"")
    (directory / cat.split_file(split)).write_bytes(data)
  return directory


def reference_index(directory, policy):
  """The validation loop as it was: `check` on every non-blank line read by iterating the file."""
  validator = cat.CatalogueValidator(directory, policy)
  indices = {}
  for split in cat.SPLITS:
    validator.skipped.setdefault(split, {})
    offsets, tasks, offset = [], [], 0
    path = directory / cat.split_file(split)
    with open(path, "rb") as f:
      for line_no, line in enumerate(f, start=1):
        if line.strip():
          record = validator.check(line, split, line_no, file=str(path))
          if record is not None:
            offsets.append(offset)
            tasks.append(record.task)
        offset += len(line)
    tasks = np.asarray(tasks, np.int32)
    order = np.argsort(tasks, kind="stable")
    indices[split] = (np.asarray(offsets, np.int64)[order], tasks[order])
  return validator, indices


def outcome(fn):
  try:
    return "ok", fn()
  except cat.CatalogueError as e:
    return "error", (type(e), str(e), getattr(e, "reason", None), getattr(e, "line", None),
                     getattr(e, "task", None), getattr(e, "field", None))


@pytest.mark.parametrize("final_newline", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_fast_validation_matches_the_reference(tmp_path, write_catalogue, seed, final_newline):
  n = len(GOOD) + len(ODD) + len(ODD_BYTES)
  rng = np.random.default_rng(seed)
  # Mostly good lines, every odd line somewhere, in a random order across the splits.
  order = np.concatenate([rng.permutation(n * 4), rng.integers(0, len(GOOD), 40)]) if seed else \
      np.arange(n * 4)
  directory = write_odd_catalogue(tmp_path / "c", write_catalogue, order, final_newline)
  for policy in cat.POLICIES:
    fast = outcome(lambda: cat.index_catalogue(directory, policy))
    ref = outcome(lambda: reference_index(directory, policy))
    assert fast[0] == ref[0], (policy, fast, ref)
    if fast[0] == "error":
      assert fast[1] == ref[1]
      continue
    (validator, indices), (ref_validator, ref_indices) = fast[1], ref[1]
    assert validator.skipped == ref_validator.skipped
    assert validator.seen_ids == ref_validator.seen_ids
    for split in cat.SPLITS:
      np.testing.assert_array_equal(indices[split].offsets, ref_indices[split][0])
      np.testing.assert_array_equal(indices[split].tasks, ref_indices[split][1])


def test_fast_validation_accepts_the_unusual_valid_lines(tmp_path, write_catalogue):
  lines = [rec(1), "\ufeff" + rec(2), rec(5, "shop-b", "Pans")]
  directory = write_catalogue(tmp_path / "c", TASKS, {"train": lines})
  with open(directory / "train.jsonl", "ab") as f:
    f.write(b"\xef\xbb\xbf" + rec(3).encode() + b"\n" + rec(4).encode("utf-16-le"))
  validator, indices = cat.index_catalogue(directory, "skip")
  # json.loads(bytes) drops a UTF-8 BOM and reads UTF-16 (NULs in the first bytes).
  assert validator.skipped["train"] == {}
  records = list(cat.iter_records(directory, "train", indices["train"], validator.table))
  assert [r.id for r in records] == ["r1", "r2", "r3", "r4", "r5"]


def test_validation_reads_across_blocks(tmp_path, write_catalogue, monkeypatch):
  monkeypatch.setattr(cat, "_BLOCK_BYTES", 100)  # Lines straddle many blocks.
  order = np.arange((len(GOOD) + len(ODD) + len(ODD_BYTES)) * 4)
  directory = write_odd_catalogue(tmp_path / "c", write_catalogue, order)
  fast = outcome(lambda: cat.index_catalogue(directory, "skip"))
  ref = outcome(lambda: reference_index(directory, "skip"))
  assert fast[1][0].skipped == ref[1][0].skipped
  for split in cat.SPLITS:
    np.testing.assert_array_equal(fast[1][1][split].offsets, ref[1][1][split][0])


# --- Preparation: the direct writer == TFDS's writer. ---

def test_encoder_matches_tfds_serialization():
  for k, d in ((3, 4), (0, 4), (1, 1)):
    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "task": tfds.features.Scalar(np.int64),
        "label": tfds.features.Scalar(np.int64), "title": tfds.features.Text(),
        "description": tfds.features.Text(),
        "images": tfds.features.Tensor(shape=(k, d), dtype=np.float32),
        "num_images": tfds.features.Scalar(np.int64)})
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    encoder = tfds_builder._ExampleEncoder(k, d)
    rng = np.random.default_rng(k)
    for task, label, n, title, description in [
        (0, 0, 0, "T", ""), (127, 128, k, "x" * 127, "\u00e9t\u00e9 \U0001F600"),
        (20000, 300, min(k, 1), "y" * 20000, "z" * 16383), (10 ** 12, 5, k, "a b", "c" * 16384)]:
      images = np.zeros((k, d), np.float32)
      images[:n] = rng.normal(size=(n, d)).astype(np.float16)
      example = {"id": f"id-{task}", "task": task, "label": label, "title": title,
                 "description": description, "images": images, "num_images": n}
      want = serializer.get_tf_example(features.encode_example(example)).SerializeToString(
          deterministic=True)
      got = encoder.encode(example["id"].encode(), title.encode(), description.encode(), task,
                           label, n, images.astype("<f4").tobytes())
      assert got == want


@pytest.fixture
def bad_catalogue(tmp_path, write_catalogue):
  order = np.random.default_rng(0).permutation((len(GOOD) + len(ODD) + len(ODD_BYTES)) * 4)
  return write_odd_catalogue(tmp_path / "c", write_catalogue, order)


def raw_records(data_path, split):
  """Every record's bytes, through TFDS alone."""
  sources = tfds.builder_from_directory(data_path).as_data_source()
  if split not in sources:  # An empty split.
    return []
  source = sources[split]
  return list(source.data_source.__getitems__(list(range(len(source)))))


def assert_same_prepared(a, b):
  assert a.task_table == b.task_table and a.skipped == b.skipped
  for split in cat.SPLITS:
    np.testing.assert_array_equal(a.task_offsets[split], b.task_offsets[split])
    assert len(a.sources[split]) == len(b.sources[split])
    if not len(a.sources[split]):
      continue
    ra, rb = raw_records(a.data_path, split), raw_records(b.data_path, split)
    assert [tf_example_pb2.Example.FromString(x) for x in ra] == [
        tf_example_pb2.Example.FromString(x) for x in rb]
    # TFDS's decoder gives the same values for both.
    da = tfds.builder_from_directory(a.data_path).as_data_source()[split]
    db = tfds.builder_from_directory(b.data_path).as_data_source()[split]
    for x, y in zip(da, db):
      assert x.keys() == y.keys()
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])


def test_direct_writer_matches_the_tfds_writer(tmp_path, bad_catalogue):
  direct = tfds_builder.load_catalogue(bad_catalogue, tmp_path / "direct", "skip")
  reference = tfds_builder.load_catalogue(bad_catalogue, tmp_path / "tfds", "skip", writer="tfds")
  assert sum(len(direct.sources[s]) for s in cat.SPLITS) > 20
  assert direct.skipped["train"]  # The catalogue has bad records of many kinds.
  assert_same_prepared(direct, reference)
  # Our protos are TFDS's, serialized deterministically.
  for split in cat.SPLITS:
    for x in raw_records(direct.data_path, split):
      assert x == tf_example_pb2.Example.FromString(x).SerializeToString(deterministic=True)


def test_both_writers_fail_with_the_same_error(tmp_path, bad_catalogue):
  errors = []
  for writer in tfds_builder.WRITERS:
    with pytest.raises(cat.BadRecordError) as e:
      tfds_builder.load_catalogue(bad_catalogue, tmp_path / writer, "fail", writer=writer)
    errors.append((str(e.value), e.value.reason, e.value.line))
    assert not list((tmp_path / writer).glob("product_catalogue/*/1.0.0/dataset_info.json"))
  assert errors[0] == errors[1]


def test_shards_written_by_worker_processes(tmp_path, tiny_taxonomy, monkeypatch):
  synthetic.generate_catalogue(tmp_path / "c", synthetic_config(num_tasks=8), tiny_taxonomy)
  monkeypatch.setattr(tfds_builder, "RECORDS_PER_SHARD", 500)  # Several shards per split.
  parallel = tfds_builder.load_catalogue(tmp_path / "c", tmp_path / "par", workers=2)
  reference = tfds_builder.load_catalogue(tmp_path / "c", tmp_path / "ref", writer="tfds")
  assert len(parallel.sources["train"]) > 1500
  shards = list((tmp_path / "par").glob("product_catalogue/*/1.0.0/*train.array_record-*"))
  assert len(shards) >= 3
  assert_same_prepared(parallel, reference)
  # A fresh process reads it with TFDS alone (no mtl_jax), as a user's tools would.
  script = ("import sys, tensorflow_datasets as tfds; "
            "ds = tfds.builder_from_directory(sys.argv[1]).as_data_source()['train']; "
            "x = ds[len(ds) - 1]; print(len(ds), x['id'].decode(), x['images'].shape)")
  out = subprocess.run([sys.executable, "-c", script, parallel.data_path], check=True,
                       capture_output=True, text=True)
  last = parallel.sources["train"][len(parallel.sources["train"]) - 1]
  assert out.stdout.split() == [str(len(parallel.sources["train"])), last["id"], "(3,", "16)"]


# --- Reading: CatalogueSource == TFDS's data source and decoder. ---

class TfdsDecoded:
  """A split read through TFDS's own data source and decoder (the reading path before)."""

  def __init__(self, source):
    self._source = source._source

  def __len__(self):
    return len(self._source)

  def __getitems__(self, indices):
    return [tfds_builder._to_str(dict(x)) for x in self._source.__getitems__(list(indices))]


@pytest.fixture
def prepared(tmp_path, tiny_taxonomy):
  synthetic.generate_catalogue(tmp_path / "c", synthetic_config(num_tasks=10), tiny_taxonomy)
  return tfds_builder.load_catalogue(tmp_path / "c", tmp_path / "tfds")


def assert_same_examples(got, want):
  assert len(got) == len(want)
  for x, y in zip(got, want):
    assert list(x) == list(y)
    for key in x:
      if key == "images":
        assert x[key].dtype == y[key].dtype == np.float32 and x[key].shape == y[key].shape
        np.testing.assert_array_equal(x[key], y[key])
      else:
        assert type(x[key]) is type(y[key]) and x[key] == y[key], key


def test_source_reads_what_tfds_decodes(prepared):
  for split in cat.SPLITS:
    src = prepared.sources[split]
    reference = TfdsDecoded(src)
    indices = np.random.default_rng(0).integers(0, len(src), 300).tolist()
    assert_same_examples(src.__getitems__(indices), reference.__getitems__(indices))
    assert_same_examples([src[i] for i in indices[:20]], reference.__getitems__(indices[:20]))
    with pytest.raises(IndexError):
      src[len(src)]
    with pytest.raises(IndexError):
      src.__getitems__([0, -1])


def test_source_reads_tfds_written_data(tmp_path, tiny_taxonomy):
  synthetic.generate_catalogue(tmp_path / "c", synthetic_config(num_tasks=4), tiny_taxonomy)
  c = tfds_builder.load_catalogue(tmp_path / "c", tmp_path / "tfds", writer="tfds")
  src = c.sources["train"]
  indices = list(range(len(src)))[::-1]
  assert_same_examples(src.__getitems__(indices), TfdsDecoded(src).__getitems__(indices))


def test_tokenizer_and_batches_are_those_of_the_tfds_decoder(tmp_path, prepared):
  class Reference:
    sources = {s: TfdsDecoded(prepared.sources[s]) for s in cat.SPLITS}
    task_offsets, task_table = prepared.task_offsets, prepared.task_table

  fast_tok = tk.build_tokenizer(prepared, tmp_path / "fast", 600)
  ref_tok = tk.build_tokenizer(Reference, tmp_path / "ref", 600)
  assert (tmp_path / "fast" / tk.VOCAB_FILE).read_bytes() == (
      tmp_path / "ref" / tk.VOCAB_FILE).read_bytes()
  config = config_base.base_config()
  config.batch_size, config.eval_batch_size, config.data.max_text_len = 16, 64, 24
  fast = input_pipeline.TrainBatches(prepared, fast_tok, config, 0)
  ref = input_pipeline.TrainBatches(Reference, ref_tok, config, 0)
  for step in (0, 1, 7):
    a, b = fast.batch_at(step), ref.batch_at(step)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(input_pipeline.eval_batches(prepared, "validation", fast_tok, config),
                  input_pipeline.eval_batches(Reference, "validation", ref_tok, config)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


class _ListSource:
  def __init__(self, records, fail_at=None):
    self.records, self.fail_at, self.reads = records, fail_at, 0

  def __len__(self):
    return len(self.records)

  def __getitems__(self, indices):
    self.reads += 1
    if self.fail_at is not None and indices[0] >= self.fail_at:
      raise OSError("disk on fire")
    return [self.records[i] for i in indices]


def _list_catalogue(n, fail_at=None):
  records = [{"title": f"boots {i}", "description": "leather", "images": np.zeros((2, 4)),
              "num_images": 1, "task": 0, "label": i % 2} for i in range(n)]

  class Catalogue:
    sources = {"validation": _ListSource(records, fail_at)}
    task_table = cat.TaskTable(names=["t"], class_names=[["a", "b"]], image_dim=4, max_images=2)
  return Catalogue


def test_eval_batches_prefetch_keeps_order_errors_and_stops_when_closed(tokenizer_dir):
  import threading
  tok = tk.load_tokenizer(tokenizer_dir)
  config = config_base.base_config()
  config.eval_batch_size, config.data.max_text_len = 8, 12
  catalogue = _list_catalogue(50)
  batches = list(input_pipeline.eval_batches(catalogue, "validation", tok, config))
  assert len(batches) == 7 and batches[-1]["example_mask"].tolist() == [1, 1] + [0] * 6
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:50],
                                np.arange(50) % 2)
  with pytest.raises(OSError, match="disk on fire"):
    list(input_pipeline.eval_batches(_list_catalogue(50, fail_at=24), "validation", tok, config))
  before = threading.active_count()
  catalogue = _list_catalogue(400)
  it = input_pipeline.eval_batches(catalogue, "validation", tok, config)
  next(it)
  it.close()  # The consumer stops early: the producer thread ends, reading no further.
  assert threading.active_count() == before
  assert catalogue.sources["validation"].reads <= 2 + config.data.prefetch


@pytest.fixture
def tokenizer_dir(tmp_path):
  tk.build_tokenizer(["leather boots kettle pans"] * 10, tmp_path / "tok", 60)
  return tmp_path / "tok"


@pytest.mark.parametrize("variant", ["", "cpu"])
def test_mtl10k_config(variant):
  import importlib
  module = importlib.import_module("configs.mtl10k")
  config = module.get_config(variant)
  config_base.validate_config(config, num_devices=1)
  assert "python -m mtl_jax.main --config=configs/mtl10k.py:cpu" in module.__doc__
  assert "Expected result" in module.__doc__
  assert config.data.synthetic.num_tasks == 10000
  assert config.model.max_classes >= config.data.synthetic.max_classes
  with pytest.raises(ValueError, match="Unknown variant"):
    module.get_config("nosuch")
