"""Every config and variant loads, validates, and documents its command and expected result."""
import importlib

import pytest

from mtl_jax import config_base

CONFIGS = {"demo": ["", "tiny", "pretrained"], "mtl100": ["", "cpu"], "mtl1000": ["", "cpu"],
           "embeddings": [""]}


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in CONFIGS.items() for v in vs])
def test_config_validates(name, variant):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(variant)
  config_base.validate_config(config, num_devices=1)
  assert f"python -m mtl_jax.main --config=configs/{name}.py" in module.__doc__
  assert "Expected result" in module.__doc__


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unknown_variant_is_an_error(name):
  module = importlib.import_module(f"configs.{name}")
  with pytest.raises(ValueError, match="Unknown variant"):
    module.get_config("nosuch")


def test_base_config_is_locked_against_typos():
  config = config_base.base_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.optimizer.learnig_rate = 0.1
