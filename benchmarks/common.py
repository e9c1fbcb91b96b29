"""Inputs shared by the benchmarks: configs by name, long-tailed class counts, random batches."""
import importlib

import numpy as np


def load_config(name: str):
  """"demo" or "mtl100:cpu" -> that config file's ConfigDict."""
  module, _, variant = name.partition(":")
  return importlib.import_module(f"configs.{module}").get_config(variant)


def long_tailed_classes(num_tasks, max_classes, seed=0):
  """Most tasks far narrower than the widest, as in real catalogues."""
  num_classes = np.clip(np.random.default_rng(seed).zipf(1.6, num_tasks) + 1, 2, max_classes)
  num_classes[0] = max_classes
  return num_classes.astype(np.int32)


def make_batches(count, spec, batch_size, num_classes, seed=0):
  """`count` random batches shaped for `spec` (a model.ModelSpec), tasks drawn uniformly."""
  rng = np.random.default_rng(seed)
  text_len, k = spec.max_positions, spec.max_images
  batches = []
  for _ in range(count):
    task_id = rng.integers(0, len(num_classes), batch_size).astype(np.int32)
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
