"""Small builders shared by the tests: a tiny model and random batches, no catalogue needed."""
import numpy as np

from configs import common, demo
from mtl_jax import sharding, state
from mtl_jax.model import ModelSpec

NUM_CLASSES = np.array([3, 5, 7, 2, 9, 4], np.int32)
VOCAB = 50


def tiny_config(**overrides):
  config = demo.get_config("tiny")
  config.total_steps = 50
  return common.set_fields(config, overrides)


def tiny_model(config=None, num_classes=NUM_CLASSES, devices=None):
  config = config or tiny_config()
  spec = ModelSpec.from_config(config.model, vocab_size=VOCAB,
                               max_positions=config.data.max_text_len, image_dim=8, max_images=2)
  return state.Model(config, spec, num_classes, sharding.make_mesh(config.mesh, devices))


def random_batch(seed, batch_size=16, num_classes=NUM_CLASSES, text_len=24, tasks=None):
  rng = np.random.default_rng(seed)
  task_id = (rng.choice(tasks, batch_size) if tasks is not None
             else rng.integers(0, len(num_classes), batch_size)).astype(np.int32)
  num_images = rng.integers(0, 3, batch_size)
  return {
      "token_ids": rng.integers(1, VOCAB, (batch_size, text_len)).astype(np.int32),
      "token_mask": (np.arange(text_len)[None] < rng.integers(3, text_len, (batch_size, 1))
                     ).astype(np.int32),
      "images": rng.normal(size=(batch_size, 2, 8)).astype(np.float32),
      "image_mask": (np.arange(2)[None] < num_images[:, None]).astype(np.int32),
      "task_id": task_id,
      "label": (rng.integers(0, 1000, batch_size) % num_classes[task_id]).astype(np.int32),
  }
