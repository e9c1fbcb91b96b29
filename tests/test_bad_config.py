"""Bad configs fail before anything is built or compiled, with a message naming the field and
the fix.

Most cases call `config_base.validate_config` / `validate_against_data` in-process (what
`train_and_evaluate` calls first). Two run `python -m mtl_jax.main` on 4 fake CPU devices to check
the same errors come out of the real command, with JAX logging any compilation.
"""
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from mtl_jax import catalogue as cat
from mtl_jax import config_base, synthetic, train
from tests.helpers import tiny_config
from tests.reliability_helpers import CompileCounter, main_args, run_main, subprocess_env


def fails(config, num_devices=1, process_count=1) -> str:
  with pytest.raises(ValueError) as error:
    config_base.validate_config(config, num_devices, process_count)
  return str(error.value)


# (override, text the message must hold: the field, the bad value, and the fix)
BAD_FIELDS = [
    ({"sampling.alpha": 1.5}, ["config.sampling.alpha: 1.5 is outside [0, 1]", "Fix:"]),
    ({"sampling.alpha_start": -0.1}, ["config.sampling.alpha_start: -0.1 is outside [0, 1]"]),
    ({"sampling.alpha_end": 2.0}, ["config.sampling.alpha_end: 2.0 is outside [0, 1]"]),
    ({"sampling.kind": "softmax"},
     ["config.sampling.kind: unknown kind 'softmax'", "Fix: use one of", "'alpha_decay'"]),
    ({"sampling.schedule": "exponential"},
     ["config.sampling.schedule: unknown schedule 'exponential'", "Fix: use one of", "'cosine'"]),
    ({"augment.kind": "cutmix"},
     ["config.augment.kind: unknown 'cutmix'", "Fix: use one of", "'soft_stitchup'"]),
    ({"augment.inputs": "pooled,audio"},
     ["config.augment.inputs: unknown inputs ['audio']", "Fix: use a comma-separated subset"]),
    ({"dypa.select": "random"},
     ["config.dypa.select: unknown 'random'", "Fix: use one of", "'lowest_accuracy'"]),
    ({"dypa.at_steps": "100,two"}, ["config.dypa.at_steps: '100,two' is not a list of steps"]),
    ({"optimizer.nonfinite": "ignore"}, ["config.optimizer.nonfinite: unknown 'ignore'",
                                          "Fix: use 'stop' or 'skip'"]),
    ({"data.on_bad_record": "drop"}, ["config.data.on_bad_record: unknown 'drop'",
                                       "Fix: use 'fail' or 'skip'"]),
]


@pytest.mark.parametrize("override,expected", BAD_FIELDS,
                         ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                              for o, _ in BAD_FIELDS])
def test_bad_field_is_named_with_its_fix(override, expected):
  message = fails(tiny_config(**override))
  for text in expected:
    assert text in message, message


def test_batch_not_divisible_by_the_devices():
  message = fails(tiny_config(batch_size=6), num_devices=4)
  assert "config.batch_size: 6 is not a positive multiple of the 4 data-parallel devices" in message
  assert "Fix: use a multiple of 4" in message
  # Processes count too: each host feeds an equal slice.
  assert "use a multiple of 8" in fails(tiny_config(batch_size=12), 4, process_count=2)


def test_mesh_larger_than_the_devices():
  config = tiny_config(**{"mesh.data": 8})
  message = fails(config, num_devices=4)
  assert "config.mesh: data=8 x model=1 does not fit 4 devices" in message
  assert "--config.mesh.data=-1" in message


def test_class_counts_above_the_head_size(tmp_path):
  data = tiny_config().data.synthetic
  synthetic.generate_catalogue(tmp_path / "catalogue", data)
  table = cat.read_task_table(tmp_path / "catalogue")
  widest = int(table.num_classes.max())
  config = tiny_config(**{"model.max_classes": 2,
                          "data.catalogue_dir": str(tmp_path / "catalogue")})
  config_base.validate_config(config, 1)  # Only the data can tell.
  with pytest.raises(ValueError) as error:
    config_base.validate_against_data(config, table)
  message = str(error.value)
  assert f"config.model.max_classes: 2 is smaller than the {widest} classes of task" in message
  assert f"Fix: set --config.model.max_classes={widest} or more" in message
  # The run checks it once the data is prepared, before building or compiling the model.
  with CompileCounter() as compiles, pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(error.value) == message
  assert compiles.events == []
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_misspelt_override_names_the_field_and_suggests_the_right_one(monkeypatch):
  # ml_collections reads overrides from sys.argv, as `python -m mtl_jax.main` gets them.
  argv = ["main", "--config=configs/demo.py:tiny", "--config.optimizer.learnig_rate=0.1"]
  monkeypatch.setattr(sys, "argv", argv)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
  with pytest.raises(AttributeError) as error:
    flag_values(argv)
  assert 'Did you mean "learning_rate" instead of "learnig_rate"?' in str(error.value)


@pytest.mark.parametrize("override,expected", [
    ({"batch_size": 6}, "config.batch_size: 6 is not a positive multiple of the 4 data-parallel "
                        "devices x 1 processes. Fix: use a multiple of 4"),
    ({"mesh__data": 8}, "config.mesh: data=8 x model=1 does not fit 4 devices; set "
                        "--config.mesh.data=-1"),
], ids=["batch_size", "mesh"])
def test_main_on_four_devices_fails_before_compiling(tmp_path, override, expected):
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                       JAX_LOG_COMPILES="1")
  run = run_main(main_args(tmp_path / "run", tmp_path / "no_catalogue_needed", **override),
                 tmp_path / "stderr", env=env, timeout=300)
  stderr = run.stderr()
  assert run.proc.returncode != 0 and expected in stderr, stderr[-3000:]
  assert "Compiling" not in stderr  # JAX_LOG_COMPILES logs every compilation.
  assert not (tmp_path / "run" / "checkpoints").exists()
