"""1000 tasks, a BERT-base-sized model in bfloat16: the accelerator configuration.

  python -m mtl_jax.main --config=configs/mtl1000.py --workdir=runs/mtl1000
  # multi-host (TPU pod, SLURM): add --distributed; see launch/.

Expected result: on a 1000-site synthetic catalogue, mean per-task test accuracy well above the
mean chance level; the step time is set by the encoder and batch, not the number of tasks.
Variants: `:cpu` (same task count, a tiny model and few steps, to check the pipeline on CPU).
"""
from configs import common


def _cpu(c):
  common.small_cpu_model(c)
  c.data.synthetic.max_products = 400
  c.batch_size = 64
  c.eval_batch_size = 512
  common.schedule(c, total_steps=300, eval_every=300)


def get_config(variant: str = ""):
  c = common.base_config()
  c.data.synthetic.num_tasks = 1000
  c.data.synthetic.min_products = 40
  c.data.synthetic.max_products = 20000
  c.data.synthetic.max_classes = 128
  c.data.synthetic.image_dim = 64
  c.data.synthetic.max_images = 4
  c.data.vocab_size = 16000
  c.data.max_text_len = 64
  # BERT-base sizes. No BERT-base checkpoint ships in a package, so the text side starts
  # random; --config.model.text_init=/path/to/bert-base loads one a user has on disk.
  c.model.hidden_size = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.mlp_size = 3072
  c.model.max_classes = 128
  c.model.adapter_size = 128
  c.model.dtype = "bfloat16"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 2000
  c.batch_size = 512
  c.eval_batch_size = 1024
  common.schedule(c, total_steps=100000, eval_every=10000, checkpoint_every=2000,
                  log_every=100)
  c.max_to_keep = 3
  return common.apply_variant(c, variant, {"cpu": _cpu}, "mtl1000")
