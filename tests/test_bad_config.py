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
    ({"dypa.select": "randomly"},
     ["config.dypa.select: unknown 'randomly'", "Fix: use one of", "'lowest_accuracy'"]),
    ({"dypa.at_steps": "100,two"}, ["config.dypa.at_steps: '100,two' is not a list of steps"]),
    ({"optimizer.nonfinite": "ignore"}, ["config.optimizer.nonfinite: unknown 'ignore'",
                                          "Fix: use 'stop' or 'skip'"]),
    ({"data.on_bad_record": "drop"}, ["config.data.on_bad_record: unknown 'drop'",
                                       "Fix: use 'fail' or 'skip'"]),
    ({"model.head_init": "zeros"}, ["config.model.head_init: unknown 'zeros'",
                                     "Fix: use 'random' or 'probe'"]),
]


@pytest.mark.parametrize("override,expected", BAD_FIELDS,
                         ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                              for o, _ in BAD_FIELDS])
def test_bad_field_is_named_with_its_fix(override, expected):
  message = fails(tiny_config(**override))
  for text in expected:
    assert text in message, message


NAN, INF = float("nan"), float("inf")

# (field, bad value, the problem the message must state): every numeric field of base_config().
BAD_NUMBERS = [
    ("optimizer.learning_rate", -1e-3, "-0.001 must be > 0 (a negative rate trains backwards)"),
    ("optimizer.learning_rate", 0.0, "0.0 must be > 0"),
    ("optimizer.learning_rate", NAN, "nan is not a finite number"),
    ("optimizer.learning_rate", INF, "inf is not a finite number"),
    ("optimizer.encoder_lr_factor", -0.1, "-0.1 must be >= 0 (0 freezes the encoder's weights)"),
    ("optimizer.warmup_steps", -1, "-1 must be >= 0"),
    ("optimizer.end_learning_rate_factor", 1.5, "1.5 is outside [0, 1]"),
    ("optimizer.end_learning_rate_factor", -0.1, "-0.1 is outside [0, 1]"),
    ("optimizer.weight_decay", -0.01, "-0.01 must be >= 0"),
    ("optimizer.b1", 1.0, "1.0 is outside [0, 1)"),
    ("optimizer.b2", -0.1, "-0.1 is outside [0, 1)"),
    ("optimizer.eps", 0.0, "0.0 must be > 0"),
    ("optimizer.clip_norm", -1.0, "-1.0 must be > 0"),
    ("model.hidden_size", 0, "0 must be >= 1"),
    ("model.num_layers", 0, "0 must be >= 1"),
    ("model.scan_unroll", 0, "0 must be >= 1"),
    ("model.num_heads", -2, "-2 must be >= 1"),
    ("model.mlp_size", 0, "0 must be >= 1"),
    ("model.dropout", 1.0, "1.0 is outside [0, 1)"),
    ("model.dropout", -0.1, "-0.1 is outside [0, 1)"),
    ("model.max_classes", 1, "1 must be >= 2 (a task head needs at least two classes)"),
    ("model.classes_per_block", 0, "0 must be >= 1"),
    ("model.adapter_size", 0, "0 must be >= 1"),
    ("model.adapter_layers", 0, "0 must be >= 1"),
    ("data.max_text_len", 2, "2 must be >= 3 (room for [CLS] and two [SEP] tokens)"),
    ("data.vocab_size", 0, "0 must be >= 1"),
    ("data.prefetch", -1, "-1 must be >= 0"),
    ("data.synthetic.num_tasks", 0, "0 must be >= 1"),
    ("data.synthetic.seed", -1, "-1 must be >= 0"),
    ("data.synthetic.min_products", 0, "0 must be >= 1"),
    ("data.synthetic.max_products", 0, "0 must be >= 1"),
    ("data.synthetic.min_classes", 0, "0 must be >= 1"),
    ("data.synthetic.max_classes", 0, "0 must be >= 1"),
    ("data.synthetic.image_dim", 0, "0 must be >= 1"),
    ("data.synthetic.max_images", -1, "-1 must be >= 0"),
    ("data.synthetic.label_noise", 1.0, "1.0 is outside [0, 1)"),
    ("data.synthetic.label_noise", -0.1, "-0.1 is outside [0, 1)"),
    ("sampling.alpha", NAN, "nan is not a finite number"),
    ("sampling.alpha_start", 1.1, "1.1 is outside [0, 1]"),
    ("sampling.alpha_end", -0.5, "-0.5 is outside [0, 1]"),
    ("sampling.decay_steps", 0, "0 must be -1 or >= 1 (-1 decays over all of training)"),
    ("sampling.decay_steps", -2, "-2 must be -1 or >= 1"),
    ("augment.alpha", -0.1, "-0.1 must be >= 0"),
    ("augment.label_smoothing", 1.0, "1.0 is outside [0, 1)"),
    ("eval.holdout_classes", -1, "-1 must be >= 0"),
    ("dypa.every_evals", -1, "-1 must be >= 0"),
    ("dypa.fraction", 0.0, "0.0 is outside (0, 1]"),
    ("dypa.max_new_adapters", -1, "-1 must be >= 0 (0 means no cap)"),
    ("dypa.max_adapters", -1, "-1 must be >= 0"),
    ("dypa.max_new_params", -1, "-1 must be >= 0"),
    ("dypa.max_total_params", -5, "-5 must be >= 0"),
    ("seed", -1, "-1 must be >= 0"),
    ("batch_size", 0, "0 must be >= 1"),
    ("eval_batch_size", -64, "-64 must be >= 1"),
    ("total_steps", 0, "0 must be >= 1"),
    ("log_every", 0, "0 must be >= 1"),
    ("eval_every", -1, "-1 must be >= 1"),
    ("checkpoint_every", 0, "0 must be >= 1"),
    ("max_to_keep", 0, "0 must be >= 1"),
    ("early_stopping_patience", -1, "-1 must be >= 0 (0 turns early stopping off)"),
    ("early_stopping_min_delta", -0.01, "-0.01 must be >= 0"),
    ("mesh.data", 0, "0 must be -1 or >= 1 (-1 uses all remaining devices)"),
    ("mesh.model", -2, "-2 must be -1 or >= 1"),
]


@pytest.mark.parametrize("field,value,problem", BAD_NUMBERS,
                         ids=[f"{f}={v}" for f, v, _ in BAD_NUMBERS])
def test_numeric_field_out_of_range_is_named_with_its_fix(field, value, problem):
  with pytest.raises(config_base.ConfigError) as error:
    config_base.validate_config(tiny_config(**{field: value}), 1)
  message = str(error.value)
  assert isinstance(error.value, ValueError)  # `pytest.raises(ValueError)` callers still work.
  assert message.startswith(f"config.{field}: {problem}"), message
  default = config_base.base_config()
  for part in field.split("."):
    default = default[part]
  assert ". Fix: set a value " in message and f"--config.{field}={default!r}" in message


def test_the_numeric_ranges_cover_every_numeric_field():
  def numeric_leaves(tree, prefix=""):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from numeric_leaves(value, f"{prefix}{key}.")
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield f"{prefix}{key}"

  fields = set(numeric_leaves(config_base.base_config().to_dict()))
  assert fields == set(config_base.NUMERIC_RANGES)
  assert {f for f, _, _ in BAD_NUMBERS} == fields  # The table above tries every one of them.


def test_learning_rate_message_in_full():
  with pytest.raises(ValueError) as error:
    config_base.validate_config(tiny_config(**{"optimizer.learning_rate": -1e-3}), 1)
  assert str(error.value) == (
      "config.optimizer.learning_rate: -0.001 must be > 0 (a negative rate trains backwards). "
      "Fix: set a value > 0, e.g. --config.optimizer.learning_rate=0.001 (the default)")


def test_cross_field_and_list_ranges():
  message = fails(tiny_config(**{"data.synthetic.min_products": 500}))
  assert message == ("config.data.synthetic.min_products: 500 is above "
                     "data.synthetic.max_products=300. Fix: set data.synthetic.min_products <= "
                     "data.synthetic.max_products")
  message = fails(tiny_config(**{"data.synthetic.min_classes": 30}))
  assert message.startswith("config.data.synthetic.min_classes: 30 is above "
                            "data.synthetic.max_classes=24")
  message = fails(tiny_config(**{"dypa.at_steps": "0,100"}))
  assert message.startswith("config.dypa.at_steps: '0,100' holds a step <= 0")
  # Errors raised by sharding.mesh_shape come out as ConfigError too.
  with pytest.raises(config_base.ConfigError, match="config.mesh: at most one"):
    config_base.validate_config(tiny_config(**{"mesh.model": -1}), 1)


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
  assert (tmp_path / "run" / "prepared").is_dir()  # What the run wrote stays, with its workdir.


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
    ({"mesh__data": 8}, "config.mesh: data=8 x model=1 does not fit 4 devices. Fix: set "
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
