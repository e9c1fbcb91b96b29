"""Batches from one indexed catalogue source: mixed-task train batches and padded eval batches.

All tasks share one random-access source per split whose records are grouped by task
(`catalogue.task_offsets`), so sampling an example of task t is picking an index in its range:
no per-task pipelines, however many tasks. Train batch `s` is a pure function of
(seed, s, process index): tasks are drawn with the sampler's probabilities at step s, then an
example uniformly within each drawn task. The iterator's whole state is the next step, which the
checkpoint saves; a resumed run neither replays nor skips data. Each process builds only its own
slice of the global batch.
"""
import queue
import threading

import numpy as np

from mtl_jax import sampling
from mtl_jax import tokenizer as tokenizer_lib


def _read(source, indices):
  if hasattr(source, "__getitems__"):
    return source.__getitems__([int(i) for i in indices])
  return [source[int(i)] for i in indices]


def _as_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def make_batch(records, tokenizer, max_text_len: int, max_images: int) -> dict:
  """Records (dicts from the source) -> a batch of numpy arrays."""
  token_ids, token_mask = tokenizer_lib.encode_batch(
      tokenizer, [_as_str(r["title"]) for r in records],
      [_as_str(r["description"]) for r in records], max_text_len)
  num_images = np.asarray([int(r["num_images"]) for r in records])
  return {
      "token_ids": token_ids.astype(np.int32),
      "token_mask": token_mask.astype(np.int32),
      "images": np.stack([np.asarray(r["images"], np.float32) for r in records]),
      "image_mask": (np.arange(max_images)[None, :] < num_images[:, None]).astype(np.int32),
      "task_id": np.asarray([int(r["task"]) for r in records], np.int32),
      "label": np.asarray([int(r["label"]) for r in records], np.int32),
  }


class TrainBatches:
  """Mixed-task train batches for this process, from `start_step` on, prefetched on a thread."""

  def __init__(self, catalogue, tokenizer, config, start_step: int, process_index: int = 0,
               process_count: int = 1):
    self._catalogue = catalogue
    self._tokenizer = tokenizer
    self._config = config
    self._source = catalogue.sources["train"]
    self._offsets = catalogue.task_offsets["train"]
    self.task_sizes = np.diff(self._offsets)
    self._process_index = process_index
    self.local_batch_size = config.batch_size // process_count
    self.next_step = start_step
    self._queue = queue.Queue(maxsize=max(config.data.prefetch, 1))
    self._stop = threading.Event()
    self._thread = None

  def indices_at(self, step: int) -> np.ndarray:
    """Record indices of this process's slice of the batch of `step`."""
    cfg = self._config
    alpha = sampling.alpha_at(step, cfg.sampling, cfg.total_steps)
    probs = sampling.task_probabilities(self.task_sizes, alpha)
    rng = np.random.default_rng([cfg.seed, step, self._process_index])
    tasks = rng.choice(len(probs), size=self.local_batch_size, p=probs)
    within = np.floor(rng.random(self.local_batch_size) * self.task_sizes[tasks]).astype(np.int64)
    return self._offsets[tasks] + within

  def batch_at(self, step: int) -> dict:
    records = _read(self._source, self.indices_at(step))
    return make_batch(records, self._tokenizer, self._config.data.max_text_len,
                      self._catalogue.task_table.max_images)

  def _produce(self, first_step: int):
    step = first_step
    while not self._stop.is_set():
      try:
        item = (step, self.batch_at(step))
      except Exception as e:  # Surface the error in the training thread.
        item = (step, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      step += 1

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._thread is None:
      self._thread = threading.Thread(target=self._produce, args=(self.next_step,), daemon=True)
      self._thread.start()
    step, batch = self._queue.get()
    assert step == self.next_step, (step, self.next_step)
    if isinstance(batch, Exception):
      raise batch
    self.next_step += 1
    return batch

  def close(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)

  def state(self) -> dict:
    return {"next_step": int(self.next_step), "seed": int(self._config.seed)}


def eval_batches(catalogue, split: str, tokenizer, config, process_index=0, process_count=1):
  """Yields this process's slice of fixed-size global batches covering `split` once.

  The last batch is padded (with copies of record 0) and `example_mask` marks the real
  examples, so every process runs the same number of steps with the same shapes. Batches are
  made ahead on a host thread (`config.data.prefetch` of them), so that reading and tokenizing
  overlap the evaluation step that consumes them; the batches and their order do not change.
  """
  source = catalogue.sources[split]
  global_batch = config.eval_batch_size
  local_batch = global_batch // process_count
  max_len, max_images = config.data.max_text_len, catalogue.task_table.max_images

  def make(start):
    indices = np.arange(start, start + global_batch)
    mask = indices < len(source)
    indices = np.where(mask, indices, 0)
    mine = slice(process_index * local_batch, (process_index + 1) * local_batch)
    batch = make_batch(_read(source, indices[mine]), tokenizer, max_len, max_images)
    batch["example_mask"] = mask[mine].astype(np.int32)
    return batch

  starts = range(0, len(source), global_batch)
  if len(starts) <= 1:
    for start in starts:
      yield make(start)
    return
  yield from _prefetched(make, starts, max(config.data.prefetch, 1))


_DONE = object()


def _prefetched(make, args, depth: int):
  """`make(a)` for each of `args` in order, computed `depth` ahead on a thread."""
  q = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item) -> None:
    """Queues `item`, waiting for room, unless the consumer stops first."""
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def produce():
    try:
      for a in args:
        put(make(a))
        if stop.is_set():
          return
      item = _DONE
    except Exception as e:  # Surface the error in the consuming thread.
      item = e
    put(item)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is _DONE:
        return
      if isinstance(item, Exception):
        raise item
      yield item
  finally:  # Also when the consumer stops early (the generator is closed).
    stop.set()
    thread.join(timeout=5)
