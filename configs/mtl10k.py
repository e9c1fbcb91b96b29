"""10,000 tasks: a long-tailed 10,000-site catalogue (about 4 million products) and one model.

  python -m mtl_jax.main --config=configs/mtl10k.py:cpu --workdir=/tmp/mtl10k

The catalogue is generated into <workdir>/catalogue, prepared into <workdir>/prepared and a
WordPiece vocabulary trained on it, then one model trains on every task, is evaluated on every
task's validation and test records, and writes its report to <workdir>/reports. Re-running the
command resumes (the catalogue, prepared data and tokenizer are reused).

Sizes: products per site are log-uniform in [20, 2000] (all splits; a long tail: the median
site has ~200, the largest 2000), 3-48 classes per site, 3 image embeddings of width 32 at most.
That is ~4.3 M products, ~3.4 M of them for training and ~0.43 M in each of validation and test.

Variants:
  `:cpu`  a 2-layer x 64-hidden encoder, batch 128, 3000 steps, every task evaluated once at the
          end (validation and test).
  (none)  the accelerator configuration: a 4-layer x 512 encoder and a longer run.

Expected result, as measured for `:cpu` on 2026-12-01 on a 2-core CPU shared with other jobs
(load 5-8; the run at low priority): 50 min end to end: generation 6 min, preparation 9 min,
tokenizer 15 s, 3000 training steps in ~20 min, then the evaluation of all 10,000 tasks'
validation and test records. Test mean per-task accuracy 0.225 (validation 0.224) against a mean
uniform chance of 0.123, but below the majority-class baseline (0.285: each site's most frequent
training class), and mean macro AUROC 0.50: 3000 steps of 128 products see 11% of the 3.4 M
training products once, most sites a few dozen times, so at this budget the model has learnt
the class priors and little else. `:cpu` checks that data, training, evaluation and reports
work at 10,000 tasks on one host; learning them needs the accelerator configuration's budget.
Data stage numbers: benchmarks/data_prep.py and benchmarks/results/data_prep.json.
"""
from configs import common
from mtl_jax import config_base


def _cpu(c):
  common.small_cpu_model(c, learning_rate=2e-3, warmup_steps=100)
  c.batch_size = 128
  c.eval_batch_size = 256
  # Validation and test of every task once, at the end.
  common.schedule(c, total_steps=3000, eval_every=3000, checkpoint_every=1000, log_every=100)


def get_config(variant: str = ""):
  c = config_base.base_config()
  s = c.data.synthetic
  s.num_tasks = 10000
  s.min_products = 20
  s.max_products = 2000
  s.min_classes = 3
  s.max_classes = 48
  s.image_dim = 32
  s.max_images = 3
  c.data.vocab_size = 8000
  c.data.max_text_len = 48
  c.model.max_classes = 48
  c.model.hidden_size = 512
  c.model.num_layers = 4
  c.model.num_heads = 8
  c.model.mlp_size = 2048
  c.model.adapter_size = 64
  c.model.dtype = "bfloat16"
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 1000
  c.batch_size = 512
  c.eval_batch_size = 2048
  common.schedule(c, total_steps=20000, eval_every=5000, checkpoint_every=2000, log_every=200)
  c.max_to_keep = 2
  return common.apply_variant(c, variant, {"cpu": _cpu}, "mtl10k")
