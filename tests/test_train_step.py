"""The train step: one compilation for many steps and task mixes; it learns; sparse == dense
where every task is present; absent tasks untouched."""
import chex
import jax
import numpy as np

from tests.helpers import NUM_CLASSES, random_batch, tiny_config, tiny_trainer


def run(trainer, batches, state=None):
  state = state or trainer.create_state(jax.random.key(0))
  step = trainer.jitted_train_step(1)
  losses = []
  for b in batches:
    state, metrics = step(state, trainer.global_batch(b))
    losses.append(float(metrics["loss"]))
  return state, losses


def test_one_compilation_for_many_steps_and_task_mixes():
  trainer = tiny_trainer()
  trainer.train_step = chex.assert_max_traces(trainer.train_step, n=1)
  # Different task mixes (one task, all tasks, a few) must not retrace.
  batches = [random_batch(i, tasks=[i % 6] if i % 3 == 0 else None) for i in range(8)]
  state, _ = run(trainer, batches)
  assert int(state.step) == 8


def test_loss_falls_on_a_repeated_batch():
  trainer = tiny_trainer(tiny_config(**{"model.dropout": 0.0, "optimizer.warmup_steps": 1,
                                     "optimizer.learning_rate": 1e-2}))
  _, losses = run(trainer, [random_batch(0)] * 40)
  assert losses[-1] < 0.5 * losses[0], losses


def test_absent_tasks_keep_their_head_bit_for_bit():
  trainer = tiny_trainer()
  state = trainer.create_state(jax.random.key(0))
  before = jax.device_get(state.params["tasks"]["heads"])
  state, _ = run(trainer, [random_batch(i, tasks=[0, 2]) for i in range(3)], state)
  after = jax.device_get(state.params["tasks"]["heads"])
  for t in (1, 3, 4, 5):
    np.testing.assert_array_equal(after["kernel"][t], before["kernel"][t])
  for t in (0, 2):
    assert not np.array_equal(after["kernel"][t], before["kernel"][t])
  np.testing.assert_array_equal(jax.device_get(state.task_opt_state["heads"].count),
                                [3, 0, 3, 0, 0, 0])


def test_sparse_and_dense_task_updates_agree_when_every_task_is_in_every_batch():
  batches = []
  for i in range(4):
    b = random_batch(i, batch_size=12)
    b["task_id"] = np.arange(12, dtype=np.int32) % 6  # Every task in every batch.
    b["label"] = (b["label"] % NUM_CLASSES[b["task_id"]]).astype(np.int32)
    batches.append(b)
  results = {}
  for mode in ("sparse", "dense"):
    trainer = tiny_trainer(tiny_config(**{"optimizer.task_update": mode}))
    state, losses = run(trainer, batches)
    results[mode] = (jax.device_get(state.params), losses)
  np.testing.assert_allclose(results["sparse"][1], results["dense"][1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               results["sparse"][0], results["dense"][0])


def test_bfloat16_compute_keeps_float32_parameters_and_remat_keeps_the_loss():
  batches = [random_batch(i) for i in range(2)]
  losses = {}
  for dtype, remat in (("float32", "none"), ("float32", "dots"), ("bfloat16", "none")):
    trainer = tiny_trainer(tiny_config(**{"model.dtype": dtype, "model.remat": remat,
                                          "model.dropout": 0.0}))
    state, losses[dtype, remat] = run(trainer, batches)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
  np.testing.assert_allclose(losses["float32", "dots"], losses["float32", "none"], rtol=1e-5)
  np.testing.assert_allclose(losses["bfloat16", "none"], losses["float32", "none"], rtol=3e-2)
