"""The 100-task study set: a 100-site synthetic catalogue and a MiniLM-sized model.

  python -m mtl_jax.main --config=configs/mtl100.py --workdir=runs/mtl100

Meant for one accelerator (it also runs on CPU, slowly). Expected result: mean per-task test
accuracy well above the mean chance level, and above single-task models on the small tasks.
Variants: `:cpu` (a narrower model and fewer steps that finish on a laptop CPU in minutes).
"""
from configs import common


def _cpu(c):
  common.small_cpu_model(c)
  c.data.synthetic.max_products = 3000
  c.batch_size = 64
  c.eval_batch_size = 256
  common.schedule(c, total_steps=1000, eval_every=500)


def get_config(variant: str = ""):
  c = common.base_config()
  c.data.synthetic.num_tasks = 100
  c.data.synthetic.max_products = 20000
  c.data.synthetic.max_classes = 64
  c.data.synthetic.image_dim = 64
  c.data.synthetic.max_images = 4
  c.data.vocab_size = 8000
  c.data.max_text_len = 64
  common.minilm(c)
  c.model.max_classes = 64
  c.model.adapter_size = 64
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 500
  c.batch_size = 256
  c.eval_batch_size = 512
  common.schedule(c, total_steps=20000, eval_every=2000, checkpoint_every=1000, log_every=100)
  return common.apply_variant(c, variant, {"cpu": _cpu}, "mtl100")
