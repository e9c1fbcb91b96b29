"""The train step: one compilation for many steps and task mixes; it learns; sparse == dense
where every task is present, and the documented difference where one is absent; rows without
loss are untouched.

Batch sizes are multiples of 8, and `test_passes_on_an_8_device_mesh` runs this whole file again
on an 8-device fake CPU mesh in a subprocess.
"""
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from mtl_jax import steps
from tests.helpers import NUM_CLASSES, random_batch, tiny_config, tiny_model


def run(model, batches, state=None):
  state = state or model.create_state(jax.random.key(0))
  step = steps.jitted_train_step(model, 1)
  losses = []
  for b in batches:
    state, metrics = step(state, model.global_batch(b))
    losses.append(float(metrics["loss"]))  # Also syncs each step (fake-device meshes need it).
  return state, losses


def test_one_compilation_for_many_steps_and_task_mixes(monkeypatch):
  monkeypatch.setattr(steps, "train_step", chex.assert_max_traces(steps.train_step, n=1))
  model = tiny_model()
  # Different task mixes (one task, all tasks, a few) must not retrace.
  batches = [random_batch(i, tasks=[i % 6] if i % 3 == 0 else None) for i in range(8)]
  state, _ = run(model, batches)
  assert int(state.step) == 8


def test_loss_falls_on_a_repeated_batch():
  model = tiny_model(tiny_config(**{"model.dropout": 0.0, "optimizer.warmup_steps": 1,
                                    "optimizer.learning_rate": 1e-2}))
  _, losses = run(model, [random_batch(0)] * 40)
  assert losses[-1] < 0.5 * losses[0], losses


def test_absent_tasks_keep_their_head_bit_for_bit():
  model = tiny_model()
  state = model.create_state(jax.random.key(0))
  before = jax.device_get(state.params["tasks"]["heads"])
  state, _ = run(model, [random_batch(i, tasks=[0, 2]) for i in range(3)], state)
  after = jax.device_get(state.params["tasks"]["heads"])
  rows = model.head_layout.task_rows
  for t in (1, 3, 4, 5):
    np.testing.assert_array_equal(after["kernel"][rows(t)], before["kernel"][rows(t)])
  for t in (0, 2):
    assert not np.array_equal(after["kernel"][rows(t)], before["kernel"][rows(t)])
  counts = jax.device_get(state.task_opt_state["heads"].count)
  assert [counts[rows(t)].tolist() for t in range(6)] == [[3], [0], [3], [0], [0, 0], [0]]
  assert not counts[model.head_layout.num_blocks.sum():].any()  # Spare rows are never stepped.


def test_a_task_whose_examples_carry_no_loss_is_not_updated():
  """Examples of held-out classes carry no loss: their task's row is not stepped."""
  model = tiny_model()
  state = model.create_state(jax.random.key(0))
  before = jax.device_get(state.params["tasks"]["heads"])
  batches = []
  for i in range(3):
    b = random_batch(i, tasks=[0, 2])
    b["label"] = np.where(b["task_id"] == 2, NUM_CLASSES[2], b["label"]).astype(np.int32)
    batches.append(b)
  state, _ = run(model, batches, state)
  after = jax.device_get(state.params["tasks"]["heads"])
  rows = model.head_layout.task_rows(2)
  np.testing.assert_array_equal(after["kernel"][rows], before["kernel"][rows])
  np.testing.assert_array_equal(after["bias"][rows], before["bias"][rows])
  counts = jax.device_get(state.task_opt_state["heads"].count)
  np.testing.assert_array_equal(counts[:model.head_layout.num_blocks.sum()],
                                [3, 0, 0, 0, 0, 0, 0])
  assert not np.any(jax.device_get(state.task_opt_state["heads"].mu["kernel"][rows]))


def _every_task_batches(num_steps, absent=()):
  batches = []
  present = np.array([t for t in range(len(NUM_CLASSES)) if t not in absent], np.int32)
  for i in range(num_steps):
    b = random_batch(i, batch_size=16)
    b["task_id"] = present[np.arange(16) % len(present)]
    b["label"] = (b["label"] % NUM_CLASSES[b["task_id"]]).astype(np.int32)
    batches.append(b)
  return batches


def _train_modes(batches, **overrides):
  results = {}
  for mode in ("sparse", "dense"):
    model = tiny_model(tiny_config(**{"optimizer.task_update": mode, **overrides}))
    state, losses = run(model, batches)
    results[mode] = (jax.device_get(state.params), losses, model)
  return results


@pytest.mark.slow
def test_sparse_and_dense_task_updates_agree_when_every_task_is_in_every_batch():
  results = _train_modes(_every_task_batches(4))
  np.testing.assert_allclose(results["sparse"][1], results["dense"][1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               results["sparse"][0], results["dense"][0])


@pytest.mark.slow
def test_absent_tasks_sparse_keeps_them_dense_decays_them():
  """The documented difference (optim.py): with a task absent from every batch, "sparse" leaves
  its head exactly as it was, "dense" (plain AdamW) decays its kernel by (1 - lr * wd) each step
  (zero gradient, zero moments: no Adam step) and leaves its bias; present tasks agree."""
  absent = (1, 4)
  num_steps = 4
  results = _train_modes(_every_task_batches(num_steps, absent),
                         **{"optimizer.weight_decay": 0.1})
  init = jax.device_get(tiny_model().create_state(jax.random.key(0)).params["tasks"]["heads"])
  sparse, dense = results["sparse"][0]["tasks"]["heads"], results["dense"][0]["tasks"]["heads"]
  model = results["dense"][2]
  factor = np.prod([1 - float(model.schedule(s)) * 0.1 for s in range(num_steps)])
  rows = lambda tasks: np.concatenate([model.head_layout.task_rows(t) for t in tasks])
  for t in map(rows, [[t] for t in absent]):
    np.testing.assert_array_equal(sparse["kernel"][t], init["kernel"][t])
    np.testing.assert_array_equal(sparse["bias"][t], init["bias"][t])
    np.testing.assert_allclose(dense["kernel"][t], init["kernel"][t] * factor, rtol=1e-6)
    np.testing.assert_array_equal(dense["bias"][t], init["bias"][t])
    assert not np.array_equal(dense["kernel"][t], init["kernel"][t])
  present = [t for t in range(len(NUM_CLASSES)) if t not in absent]
  np.testing.assert_allclose(sparse["kernel"][rows(present)], dense["kernel"][rows(present)],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(results["sparse"][1], results["dense"][1], rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters_and_remat_keeps_the_loss():
  batches = [random_batch(i) for i in range(2)]
  losses = {}
  for dtype, remat in (("float32", "none"), ("float32", "dots"), ("bfloat16", "none")):
    model = tiny_model(tiny_config(**{"model.dtype": dtype, "model.remat": remat,
                                      "model.dropout": 0.0}))
    state, losses[dtype, remat] = run(model, batches)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
  np.testing.assert_allclose(losses["float32", "dots"], losses["float32", "none"], rtol=1e-5)
  np.testing.assert_allclose(losses["bfloat16", "none"], losses["float32", "none"], rtol=3e-2)


def test_unrolling_the_layer_scan_keeps_the_encoder():
  """`model.scan_unroll` changes how the layers loop, not what they compute: the same outputs
  and gradients, dropout included."""
  batch = {k: v for k, v in random_batch(0).items() if k not in ("task_id", "label")}
  results, params = [], None
  for unroll in (1, 2):
    model = tiny_model(tiny_config(**{"model.num_layers": 2, "model.scan_unroll": unroll}))
    if params is None:  # The same parameters for both: unrolling does not change their layout.
      params = nn.unbox(jax.jit(model.encoder.init)(jax.random.key(0), batch)["params"])

    def loss(p, model=model):
      pooled, _ = model.encoder.apply({"params": p}, batch, deterministic=False,
                                      rngs={"dropout": jax.random.key(1)})
      return (pooled ** 2).sum()

    results.append(jax.jit(jax.value_and_grad(loss))(params))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               results[1][1], results[0][1])


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() > 1, reason="already on a multi-device mesh")
def test_passes_on_an_8_device_mesh():
  """Every test above, again on 8 fake CPU devices (a subprocess: a fake-device deadlock, should
  one happen, cannot take the suite down). The file's slow tests run there too: this test is itself
  slow, so it runs only where they do."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=15")
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
       "--run-slow", "-k", "not 8_device"], env=env, capture_output=True, text=True, timeout=600,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]


@pytest.mark.slow
def test_the_block_size_does_not_change_training():
  """Heads of one block per task (the layout of one row per task padded to `max_classes`) and
  of 4-class blocks, started from the same head values, train to the same losses and heads."""
  results = {}
  for block in (tiny_config().model.max_classes, 4):
    model = tiny_model(tiny_config(**{"model.classes_per_block": block, "model.dropout": 0.0}))
    state = model.create_state(jax.random.key(0))
    results[block] = [model, state]
  (wide, wide_state), (narrow, narrow_state) = results.values()
  blocks = lambda model, heads, t: model.head_layout.task_head(heads, t)
  heads = jax.device_get(narrow_state.params["tasks"]["heads"])
  wide_heads = jax.tree.map(np.array, jax.device_get(wide_state.params["tasks"]["heads"]))
  for t in range(len(NUM_CLASSES)):  # The wide heads take the narrow heads' values.
    task = blocks(narrow, heads, t)
    row = wide.head_layout.task_rows(t)[0]
    width = task["bias"].shape[-1]
    wide_heads["kernel"][row, :, :width] = task["kernel"]
    wide_heads["bias"][row, :width] = task["bias"]
  wide_state = wide_state.replace(params={**wide_state.params, "tasks": {
      **wide_state.params["tasks"], "heads": jax.device_put(wide_heads)}})
  batches = [random_batch(i) for i in range(4)]
  wide_state, wide_losses = run(wide, batches, wide_state)
  narrow_state, narrow_losses = run(narrow, batches, narrow_state)
  np.testing.assert_allclose(narrow_losses, wide_losses, rtol=1e-5)
  for t in range(len(NUM_CLASSES)):
    got = blocks(narrow, jax.device_get(narrow_state.params["tasks"]["heads"]), t)
    want = blocks(wide, jax.device_get(wide_state.params["tasks"]["heads"]), t)
    k = NUM_CLASSES[t]  # The task's classes; columns past them are masked in both.
    np.testing.assert_allclose(got["kernel"][:, :k], want["kernel"][:, :k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["bias"][:k], want["bias"][:k], rtol=1e-4, atol=1e-6)
