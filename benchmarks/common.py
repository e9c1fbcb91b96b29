"""What the benchmarks share: configs by name, model specs, class counts, batches, the model, and
the result files.

Every result JSON is `{"metadata": ..., "args": ..., ...}` written by `write_result`; its
metadata comes from one function, `experiments.common.run_metadata` (command, date, hardware
with the load average at the start, versions), re-exported here as `run_metadata`, plus the load
average at the end and the wall time, which `write_result` adds.
"""
import dataclasses
import importlib
import json
import math
import os
import sys
import time

import numpy as np

from configs.common import set_fields  # noqa: F401  (re-exported for the scripts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def run_metadata(argv=None) -> dict:
  """`experiments.common.run_metadata`: the one source of result metadata in this repository.

  Imported when called: `experiments.common` imports the training loop (and with it TensorFlow,
  ~10-20 s), which only the moment of writing metadata needs.
  """
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from experiments.common import run_metadata as metadata  # pylint: disable=g-import-not-at-top
  meta = metadata(argv)
  meta["start_time"] = time.time()
  return meta


def load_average() -> list:
  return [round(x, 2) for x in os.getloadavg()]


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(float(value)) else None
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, np.bool_):
    return bool(value)
  return value


def write_result(path: str, metadata: dict, **payload) -> dict:
  """Writes `{"metadata": metadata + load at the end + wall time, **payload}` to `path`."""
  metadata = dict(metadata)
  start = metadata.pop("start_time", None)
  metadata["load_average_at_end"] = load_average()
  if start is not None:
    metadata["wall_s"] = round(time.time() - start, 1)
  result = _jsonable({"metadata": metadata, **payload})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  return result


def load_config(name: str):
  """"demo" or "mtl100:cpu" -> that config file's ConfigDict."""
  module, _, variant = name.partition(":")
  return importlib.import_module(f"configs.{module}").get_config(variant)


def spec_from_config(config, *, vocab_size=None, image_dim=None, max_images=None):
  """The encoder sizes of `config` with data sizes from its synthetic catalogue (or as given).

  The spec is built directly (no tokenizer, no pretrained checkpoint): a random-init encoder of
  the config's sizes with CLS pooling, as the PyTorch comparisons build theirs.
  """
  from mtl_jax.model import ModelSpec  # pylint: disable=g-import-not-at-top
  d = config.data
  spec = ModelSpec.from_config(
      config.model, vocab_size=vocab_size or d.vocab_size, max_positions=d.max_text_len,
      image_dim=image_dim or d.synthetic.image_dim,
      max_images=max_images or d.synthetic.max_images)
  return dataclasses.replace(spec, pooling="cls")


def make_model(config, spec, num_classes, devices=None):
  """`state.Model` on a mesh of `devices` (default: the first device alone)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mtl_jax import sharding, state  # pylint: disable=g-import-not-at-top
  devices = jax.devices()[:1] if devices is None else devices
  return state.Model(config, spec, num_classes, sharding.make_mesh(config.mesh, devices))


def long_tailed_classes(num_tasks, max_classes, seed=0):
  """Most tasks far narrower than the widest, as in real catalogues."""
  num_classes = np.clip(np.random.default_rng(seed).zipf(1.6, num_tasks) + 1, 2, max_classes)
  num_classes[0] = max_classes
  return num_classes.astype(np.int32)


def zipf_task_probs(num_tasks, exponent=1.0):
  """Task mix of a long-tailed catalogue: task t drawn with probability ~ 1 / (t + 1)^s."""
  weights = 1.0 / np.arange(1, num_tasks + 1, dtype=np.float64) ** exponent
  return weights / weights.sum()


def make_batches(count, spec, batch_size, num_classes, seed=0, task_probs=None):
  """`count` random batches shaped for `spec` (a model.ModelSpec); tasks drawn uniformly, or
  from `task_probs`."""
  rng = np.random.default_rng(seed)
  text_len, k = spec.max_positions, spec.max_images
  num_tasks = len(num_classes)
  batches = []
  for _ in range(count):
    if task_probs is None:
      task_id = rng.integers(0, num_tasks, batch_size).astype(np.int32)
    else:
      task_id = rng.choice(num_tasks, batch_size, p=task_probs).astype(np.int32)
    num_images = rng.integers(0, k + 1, batch_size)
    batches.append({
        "token_ids": rng.integers(1, spec.vocab_size, (batch_size, text_len)).astype(np.int32),
        "token_mask": (np.arange(text_len)[None] < rng.integers(4, text_len + 1, (
            batch_size, 1))).astype(np.int32),
        "images": rng.normal(size=(batch_size, k, spec.image_dim)).astype(np.float32),
        "image_mask": (np.arange(k)[None] < num_images[:, None]).astype(np.int32),
        "task_id": task_id,
        "label": (rng.integers(0, 1 << 20, batch_size) % num_classes[task_id]).astype(np.int32),
    })
  return batches


def fmt_table(headers, rows) -> str:
  """A plain-text table, right-aligned, columns padded to their widest cell."""
  cells = [[str(c) for c in r] for r in rows]
  widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
  line = lambda r: " ".join(c.rjust(w) for c, w in zip(r, widths))
  return "\n".join([line(headers)] + [line(r) for r in cells])
