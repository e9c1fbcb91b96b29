"""DyPa: expansion keeps outputs, grows the optimiser state, recompiles once, resumes."""
import chex
import jax
import numpy as np
import pytest

from mtl_jax import dypa, state as state_lib, steps, train
from mtl_jax.dypa import __main__ as dypa_cli
from tests.helpers import NUM_CLASSES, random_batch, tiny_config, tiny_model

NAMES = [f"task{t}" for t in range(len(NUM_CLASSES))]


def rows(accuracy, loss=None):
  loss = loss if loss is not None else [1.0] * len(accuracy)
  return [{"task": n, "accuracy": a, "loss": l} for n, a, l in zip(NAMES, accuracy, loss)]


def trained(config, num_steps=3):
  model = tiny_model(config)
  state = model.create_state(jax.random.key(0))
  step = steps.jitted_train_step(model, 1)
  for i in range(num_steps):
    state, _ = step(state, model.global_batch(random_batch(i)))
  return model, state


def probs(model, state, batch):
  return np.asarray(steps.jitted_predict_step(model, state_lib.num_adapter_slots(state))(
      state.params, state.adapter_map, state.num_classes, model.global_batch(batch)))


@pytest.mark.slow
def test_expansion_keeps_every_output_and_grows_the_optimiser_state():
  config = tiny_config(**{"dypa.fraction": 0.5})
  model, state = trained(config)
  batch = random_batch(99, batch_size=24)
  before = probs(model, state, batch)
  old_map = np.asarray(state.adapter_map)
  state, event = dypa.expand(model, state, rows([0.9, 0.2, 0.8, 0.1, 0.5, 0.95]), step=3)
  # The lowest half (3 of 6) by accuracy: task3, task1, task4.
  assert event["tasks"] == ["task1", "task3", "task4"]
  assert event["adapters_before"] == 0 and event["adapters_after"] == 3
  assert event["parameters_after"] > event["parameters_before"]
  np.testing.assert_array_equal(probs(model, state, batch), before)  # Bit for bit.
  new_map = np.asarray(state.adapter_map)
  assert sorted(new_map[[1, 3, 4]]) == [1, 2, 3]
  np.testing.assert_array_equal(new_map[[0, 2, 5]], old_map[[0, 2, 5]])
  adapters, moments = state.params["tasks"]["adapters"], state.task_opt_state["adapters"]
  for tree in (moments.mu, moments.nu):
    jax.tree.map(lambda p, m: np.testing.assert_equal(p.shape, m.shape), adapters, tree)
  assert moments.count.shape == (4,)
  # The next step runs on the grown state and moves the new adapters of tasks in the batch.
  step = steps.jitted_train_step(model, 4)
  state, metrics = step(state, model.global_batch(random_batch(5, tasks=[1, 3])))
  assert np.isfinite(float(metrics["loss"]))
  up = np.asarray(state.params["tasks"]["adapters"]["up"])
  assert np.abs(up[new_map[1]]).sum() > 0 and np.abs(up[new_map[4]]).sum() == 0
  np.testing.assert_array_equal(np.asarray(state.task_opt_state["adapters"].count),
                                [0, 1, 1, 0])


def test_a_task_never_gets_two_adapters_and_budgets_cap_selection():
  config = tiny_config(**{"dypa.fraction": 1.0, "dypa.max_new_adapters": 2})
  model, state = trained(config, num_steps=1)
  state, first = dypa.expand(model, state, rows([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), step=1)
  assert first["tasks"] == ["task0", "task1"]
  state, second = dypa.expand(model, state, rows([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), step=2)
  assert second["tasks"] == ["task2", "task3"]  # The neediest tasks without an adapter.
  per_slot = dypa.task_layers.adapter_params_per_slot(config.model.hidden_size,
                                                      config.model.adapter_size, 1)
  config.dypa.max_new_adapters = 0
  config.dypa.max_total_params = 5 * per_slot
  state, third = dypa.expand(model, state, rows([0.1] * 6), step=3)
  assert len(third["tasks"]) == 1 and third["adapters_after"] == 5


@pytest.mark.parametrize("select,expected", [
    ("highest_loss", ["task2"]), ("explicit", ["task0", "task5"]), ("baseline_gap", ["task4"])])
def test_selectors(select, expected, tmp_path):
  baseline = tmp_path / "single.json"
  baseline.write_text('{"task0": 0.5, "task4": 0.9, "task5": 0.6}')
  config = tiny_config(**{"dypa.select": select, "dypa.fraction": 0.1,
                          "dypa.tasks": "task0,task5", "dypa.baseline": str(baseline)})
  scores = dypa.task_scores(config, rows([0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
                                         loss=[1, 2, 3, 1, 1, 1]))
  selected = dypa.select_tasks(config, scores, np.zeros(6, int), 1, 100)
  assert [NAMES[t] for t in selected] == expected


def test_random_selector_draws_the_same_count_from_candidates_by_seed_and_step():
  # task1 has no validation accuracy and task2 has an adapter: neither is a candidate.
  accuracy, adapter_map = [0.9, None, 0.1, 0.2, 0.8, 0.5], np.array([0, 0, 1, 0, 0, 0])

  def select(select="random", seed=0, step=400):
    config = tiny_config(**{"dypa.select": select, "dypa.fraction": 0.5, "seed": seed})
    return tuple(dypa.select_tasks(config, dypa.task_scores(config, rows(accuracy)),
                                   adapter_map, 2, 100, step=step))

  count = len(select("lowest_accuracy"))
  assert count == 3  # ceil(0.5 x 5 tasks without an adapter), the shared count logic.
  draws = {select(seed=seed) for seed in range(20)}
  assert all(len(d) == count and set(d) <= {0, 3, 4, 5} for d in draws)
  assert len(draws) > 1  # Differs across seeds,
  assert set().union(*draws) == {0, 3, 4, 5}  # reaches every candidate,
  assert select(seed=3) == select(seed=3)  # and is the same for a seed and step.
  assert len({select(step=s) for s in range(20)}) > 1


def test_explicit_unknown_task_is_an_error():
  config = tiny_config(**{"dypa.select": "explicit", "dypa.tasks": "task0,nosuch"})
  with pytest.raises(ValueError, match="nosuch"):
    dypa.task_scores(config, rows([0.5] * 6))


def test_one_extra_compilation_per_expansion(monkeypatch):
  monkeypatch.setattr(steps, "train_step", chex.assert_max_traces(steps.train_step, n=2))
  model = tiny_model(tiny_config(**{"dypa.fraction": 0.5}))
  state = model.create_state(jax.random.key(0))
  for i in range(6):
    if i == 3:
      state, _ = dypa.expand(model, state, rows([0.1, 0.9, 0.2, 0.9, 0.3, 0.9]), step=i)
    step = steps.jitted_train_step(model, state_lib.num_adapter_slots(state))
    state, _ = step(state, model.global_batch(random_batch(i)))
  assert state_lib.num_adapter_slots(state) == 4


@pytest.mark.slow
def test_resume_before_and_after_an_expansion_matches_an_uninterrupted_run(
    catalogue_dir, tmp_path, capsys):
  def config():
    return tiny_config(**{"data.catalogue_dir": str(catalogue_dir), "total_steps": 6,
                          "dypa.at_steps": "2", "dypa.fraction": 0.5, "checkpoint_every": 10})
  straight, stopped = tmp_path / "straight", tmp_path / "stopped"
  train.train_and_evaluate(config(), str(straight))
  train.train_and_evaluate(config(), str(stopped), stop_at_step=1)  # Before the expansion.
  train.train_and_evaluate(config(), str(stopped), stop_at_step=4)  # After it.
  capsys.readouterr()
  train.train_and_evaluate(config(), str(stopped))
  assert "Resumed from step 4" in capsys.readouterr().out
  from tests.test_end_to_end import _leaves, final_params
  a, b = dict(_leaves(final_params(straight, 6))), dict(_leaves(final_params(stopped, 6)))
  assert a["/tasks/adapters/up"].shape[0] == 4  # 3 of 6 tasks got adapters at step 2.
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  dypa_cli.main(["--workdir", str(stopped)])
  printed = capsys.readouterr().out
  assert "3 adapters" in printed and "step 2: +3 adapters (lowest_accuracy)" in printed
