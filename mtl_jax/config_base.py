"""The default config every experiment starts from, and its validation.

Configs in `configs/` call `base_config()` and change what they need. Every field a run can use
is defined here, so that `lock_config=True` turns a misspelt override into an error.
"""
import math

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data. `catalogue_dir` empty: generate the synthetic catalogue into `<workdir>/catalogue`.
  c.data = ml_collections.ConfigDict()
  c.data.catalogue_dir = ""
  c.data.on_bad_record = "fail"  # "fail" | "skip" (skipped records are counted per task).
  c.data.max_text_len = 48  # Tokens of [CLS] title [SEP] description [SEP].
  c.data.tokenizer_dir = ""  # Empty: a WordPiece vocabulary trained on the catalogue's train split.
  c.data.vocab_size = 4000  # Size of that generated vocabulary.
  c.data.prefetch = 2  # Batches prepared ahead on a host thread.
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_tasks = 12
  c.data.synthetic.seed = 0
  c.data.synthetic.min_products = 60  # Per task, all splits together; sizes follow a long tail.
  c.data.synthetic.max_products = 3000
  c.data.synthetic.min_classes = 3
  c.data.synthetic.max_classes = 24
  c.data.synthetic.image_dim = 32
  c.data.synthetic.max_images = 3
  c.data.synthetic.label_noise = 0.03  # Upper bound of each site's label-noise rate.

  # Task sampling: p_i proportional to n_i ** alpha(step).
  c.sampling = ml_collections.ConfigDict()
  c.sampling.kind = "alpha_decay"  # "uniform" | "proportional" | "fixed_alpha" | "alpha_decay"
  c.sampling.alpha = 0.5  # For "fixed_alpha".
  c.sampling.alpha_start = 1.0  # For "alpha_decay".
  c.sampling.alpha_end = 0.5
  c.sampling.schedule = "linear"  # "linear" | "cosine" | "step"
  c.sampling.decay_steps = -1  # -1: over all of training.

  # Model.
  c.model = ml_collections.ConfigDict()
  c.model.hidden_size = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_size = 128
  c.model.dropout = 0.1
  c.model.max_classes = 32  # Logits' width: the widest task's class count or more.
  # Heads are stored in blocks of this many classes: a task of C_t classes holds
  # ceil(C_t / classes_per_block) blocks, so head memory follows the real class counts.
  c.model.classes_per_block = 8
  # A DyPa adapter: `adapter_layers` residual blocks x + up(gelu(down(x))) of width
  # `adapter_size` on the pooled state before the task's head. Narrower than hidden_size: a
  # bottleneck adapter; wider or deeper: a bigger task-specific head path.
  c.model.adapter_size = 32
  c.model.adapter_layers = 1
  c.model.pooling = "cls"  # "cls" | "mean"
  c.model.dtype = "float32"  # Activations and matmuls; parameters stay float32.
  # Activation recomputation in the backward pass, per encoder layer: "none"; "full" (keep
  # only each layer's input); "dots" (keep matmul outputs, recompute the rest).
  c.model.remat = "none"
  # Encoder layers per iteration of the layer scan; num_layers unrolls the whole stack: no loop
  # overhead in the step (about 10% on CPU at 2 x 128) for a longer compile.
  c.model.scan_unroll = 1
  c.model.text_init = ""  # A local BERT-family checkpoint directory; empty: random init.
  # "probe": a fresh run starts with every task's head set to its linear probe on the initial
  # encoder's head inputs (linear_probe.heads_from_probe, L2 chosen on validation), then trains
  # everything: "linear probe, then fine-tune"; the probe heads are evaluated at step 0 and count
  # for the best checkpoint. "random": heads drawn at random.
  c.model.head_init = "random"

  # Optimisation.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  # The shared encoder's rate as a share of `learning_rate` (the heads and adapters keep the
  # full rate): below 1 keeps the encoder's features close to where they started, e.g. after
  # model.head_init=probe.
  c.optimizer.encoder_lr_factor = 1.0
  c.optimizer.warmup_steps = 50
  c.optimizer.end_learning_rate_factor = 0.01
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.clip_norm = 1.0
  # "sparse": a task's head and adapter are updated only on steps whose batch holds that task
  # (no decay or momentum drift while absent; Adam bias correction per task). "dense": every
  # head every step, like plain AdamW.
  c.optimizer.task_update = "sparse"
  # A step whose loss or gradient is NaN/Inf: "stop" the run with a report, or "skip" it (the
  # state is left as it was, and skipped steps are counted in the metrics).
  c.optimizer.nonfinite = "stop"

  # DyPa (dypa.py): give the tasks that need capacity an adapter of their own, between steps.
  c.dypa = ml_collections.ConfigDict()
  c.dypa.at_steps = ""  # Comma-separated steps at which to allocate, e.g. "2000,4000".
  c.dypa.every_evals = 0  # Also after every k-th validation evaluation (0: never).
  c.dypa.select = "lowest_accuracy"  # | "highest_loss" | "baseline_gap" | "explicit" | "random"
  c.dypa.fraction = 0.1  # Share of the candidate tasks selected per allocation.
  c.dypa.tasks = ""  # "explicit": comma-separated task names.
  c.dypa.baseline = ""  # "baseline_gap": JSON {task: accuracy} or a report with "tasks" rows.
  c.dypa.max_new_adapters = 0  # Per allocation (0: no cap).
  c.dypa.max_adapters = 0  # In total (0: no cap).
  c.dypa.max_new_params = 0  # Task-specific parameters added per allocation (0: no cap).
  c.dypa.max_total_params = 0  # Adapter parameters in total (0: no cap).

  # Embedding augmentations (augment.py), applied inside the train step.
  c.augment = ml_collections.ConfigDict()
  c.augment.kind = "none"  # "none" | "mixup" | "stitchup" | "soft_mixup" | "soft_stitchup"
  c.augment.inputs = "pooled"  # Comma-separated subset of "image", "text", "pooled".
  c.augment.alpha = 0.2  # lambda ~ Beta(alpha, alpha).
  c.augment.label_smoothing = 0.1  # eps of the soft forms.

  # Evaluation.
  c.eval = ml_collections.ConfigDict()
  # Hold out each task's last k classes from training (never in the softmax, no loss), to
  # measure detection of unseen classes. Only tasks keeping >= 2 seen classes hold any out.
  c.eval.holdout_classes = 0
  # "last": just those. "shared": their names are also held out of every other task that has
  # a class of the same name, so no site teaches the model a held-out class (state.holdout_plan).
  c.eval.holdout_mode = "last"

  # Loop.
  c.batch_size = 32  # Global batch.
  c.eval_batch_size = 128
  c.total_steps = 400
  c.log_every = 50
  c.eval_every = 200  # Validation evaluation of every task; the test split is evaluated at the end.
  c.checkpoint_every = 200
  c.max_to_keep = 2  # The latest checkpoints kept; the best one (below) is kept besides them.
  # Best checkpoint (early_stopping.py): a validation summary value, "validation/<key>" as
  # logged, or "" for none. A validation evaluation that improves on it saves its step, which
  # is kept whatever `max_to_keep` rotates out; `--step=best` reads it.
  c.best_metric = "validation/mean_accuracy"
  c.best_mode = "max"  # "max" | "min" (e.g. for "validation/mean_loss").
  c.eval_on_best = True  # The end-of-training reports read the best checkpoint (if any).
  # Stop after this many validation evaluations without an improvement of the best metric by
  # more than `early_stopping_min_delta` (0: never stop early). Needs best_metric.
  c.early_stopping_patience = 0
  c.early_stopping_min_delta = 0.0

  # Devices: mesh shape (-1: all remaining devices) and logical-axis -> mesh-axis rules.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.model = 1
  c.sharding_rules = (
      ("batch", "data"),
      ("vocab", "model"),
      ("embed", None),
      ("mlp", "model"),
      ("heads", "model"),
      ("kv", None),
      ("layers", None),
      ("task", "auto"),  # Head blocks split over `data` where they outweigh the encoder.
      ("adapter", None),
      ("classes", None),
      ("bottleneck", None),
      ("image", None),
  )
  return c


class ConfigError(ValueError):
  """A config value that cannot work. The message reads `config.<field>: <problem>. Fix: <fix>`.
  A ValueError, so that callers catching ValueError keep working."""


def _fail(field: str, problem: str, fix: str):
  raise ConfigError(f"config.{field}: {problem}. Fix: {fix}")


_INF = float("inf")


class _Range:
  """The values a numeric field accepts: an interval (each end open or closed), optionally
  integers only, plus `extra` special values (e.g. -1 for "all")."""

  def __init__(self, low=-_INF, high=_INF, low_open=False, high_open=False, integer=False,
               extra=(), why=""):
    self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
    self.integer, self.extra, self.why = integer, tuple(extra), why

  def contains(self, v) -> bool:
    if v in self.extra:
      return True
    above = v > self.low if self.low_open else v >= self.low  # False for NaN.
    below = v < self.high if self.high_open else v <= self.high
    return above and below

  def text(self) -> str:
    if self.high == _INF:
      interval = f"{'>' if self.low_open else '>='} {self.low:g}"
    elif self.low == -_INF:
      interval = f"{'<' if self.high_open else '<='} {self.high:g}"
    else:
      interval = (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                  f"{')' if self.high_open else ']'}")
    extra = " or ".join(f"{x:g}" for x in self.extra)
    return f"{extra} or {interval}" if extra else interval


def _int(low, **kw):
  return _Range(low, integer=True, **kw)


_POSITIVE = dict(low=0.0, low_open=True)
_FRACTION = dict(low=0.0, high=1.0)  # [0, 1]
_UNIT = dict(low=0.0, high=1.0, high_open=True)  # [0, 1)

# Every numeric field of `base_config()` and the values it accepts (tests/test_bad_config.py
# checks that none is missing). Checked first, before any check that computes with them.
NUMERIC_RANGES = {
    "seed": _int(0),
    "data.max_text_len": _int(3, why="room for [CLS] and two [SEP] tokens"),
    "data.vocab_size": _int(1),
    "data.prefetch": _int(0),
    "data.synthetic.num_tasks": _int(1),
    "data.synthetic.seed": _int(0),
    "data.synthetic.min_products": _int(1),
    "data.synthetic.max_products": _int(1),
    "data.synthetic.min_classes": _int(1),
    "data.synthetic.max_classes": _int(1),
    "data.synthetic.image_dim": _int(1),
    "data.synthetic.max_images": _int(0),
    "data.synthetic.label_noise": _Range(**_UNIT, why="the upper bound of a site's label-flip rate"),
    "sampling.alpha": _Range(**_FRACTION, why="0 samples tasks uniformly, 1 by their size"),
    "sampling.alpha_start": _Range(**_FRACTION, why="0 samples tasks uniformly, 1 by their size"),
    "sampling.alpha_end": _Range(**_FRACTION, why="0 samples tasks uniformly, 1 by their size"),
    "sampling.decay_steps": _int(1, extra=(-1,), why="-1 decays over all of training"),
    "model.hidden_size": _int(1),
    "model.num_layers": _int(1),
    "model.scan_unroll": _int(1, why="1 loops over every layer"),
    "model.num_heads": _int(1),
    "model.mlp_size": _int(1),
    "model.dropout": _Range(**_UNIT),
    "model.max_classes": _int(2, why="a task head needs at least two classes"),
    "model.classes_per_block": _int(1),
    "model.adapter_size": _int(1),
    "model.adapter_layers": _int(1, why="1 is one residual block"),
    "optimizer.learning_rate": _Range(**_POSITIVE, why="a negative rate trains backwards"),
    "optimizer.encoder_lr_factor": _Range(0.0, why="0 freezes the encoder's weights"),
    "optimizer.warmup_steps": _int(0),
    "optimizer.end_learning_rate_factor": _Range(**_FRACTION,
                                                 why="the final rate as a share of the peak"),
    "optimizer.weight_decay": _Range(0.0),
    "optimizer.b1": _Range(**_UNIT),
    "optimizer.b2": _Range(**_UNIT),
    "optimizer.eps": _Range(**_POSITIVE),
    "optimizer.clip_norm": _Range(**_POSITIVE, why="the largest global gradient norm"),
    "dypa.every_evals": _int(0, why="0 never allocates after evaluations"),
    "dypa.fraction": _Range(0.0, 1.0, low_open=True),
    "dypa.max_new_adapters": _int(0, why="0 means no cap"),
    "dypa.max_adapters": _int(0, why="0 means no cap"),
    "dypa.max_new_params": _int(0, why="0 means no cap"),
    "dypa.max_total_params": _int(0, why="0 means no cap"),
    "augment.alpha": _Range(0.0, why="the Beta(alpha, alpha) parameter"),
    "augment.label_smoothing": _Range(**_UNIT),
    "eval.holdout_classes": _int(0),
    "batch_size": _int(1),
    "eval_batch_size": _int(1),
    "total_steps": _int(1),
    "log_every": _int(1),
    "eval_every": _int(1),
    "checkpoint_every": _int(1),
    "max_to_keep": _int(1),
    "early_stopping_patience": _int(0, why="0 turns early stopping off"),
    "early_stopping_min_delta": _Range(0.0, why="the smallest change that counts as an "
                                       "improvement"),
    "mesh.data": _int(1, extra=(-1,), why="-1 uses all remaining devices"),
    "mesh.model": _int(1, extra=(-1,), why="-1 uses all remaining devices"),
}


def _get(c, field: str):
  node = c
  for part in field.split("."):
    node = node[part]
  return node


def _check_numbers(c) -> None:
  defaults = base_config()
  for field, allowed in NUMERIC_RANGES.items():
    value = _get(c, field)
    default = _get(defaults, field)
    example = f"e.g. --config.{field}={default!r} (the default)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      _fail(field, f"{value!r} is not a number", f"set a number {allowed.text()}, {example}")
    if allowed.integer and not isinstance(value, int):
      _fail(field, f"{value!r} is not an integer", f"set an integer {allowed.text()}, {example}")
    if not math.isfinite(value):
      _fail(field, f"{value!r} is not a finite number", f"set a value {allowed.text()}, {example}")
    if not allowed.contains(value):
      bounded = allowed.low != -_INF and allowed.high != _INF and not allowed.extra
      problem = (f"{value!r} is outside {allowed.text()[3:]}" if bounded
                 else f"{value!r} must be {allowed.text()}")
      if allowed.why:
        problem += f" ({allowed.why})"
      _fail(field, problem, f"set a value {allowed.text()}, {example}")
  synth = c.data.synthetic
  for low, high in (("min_products", "max_products"), ("min_classes", "max_classes")):
    if synth[low] > synth[high]:
      _fail(f"data.synthetic.{low}", f"{synth[low]} is above data.synthetic.{high}={synth[high]}",
            f"set data.synthetic.{low} <= data.synthetic.{high}")


def validate_config(c, num_devices: int, process_count: int = 1) -> None:
  """Checks values before anything is built or compiled; errors (`ConfigError`, a ValueError)
  name the field and the fix. Every numeric field is range-checked first (`NUMERIC_RANGES`)."""
  from mtl_jax import sampling, sharding  # Local: keeps config files importable on their own.
  _check_numbers(c)
  try:
    shape = sharding.mesh_shape(c.mesh, num_devices)
  except ConfigError:
    raise
  except ValueError as e:  # sharding's own messages already name config.mesh and the fix.
    raise ConfigError(str(e)) from e
  if c.batch_size <= 0 or c.batch_size % (shape[0] * process_count):
    _fail("batch_size", f"{c.batch_size} is not a positive multiple of the {shape[0]} data-"
          f"parallel devices x {process_count} processes",
          f"use a multiple of {shape[0] * process_count}")
  if c.eval_batch_size <= 0 or c.eval_batch_size % (shape[0] * process_count):
    _fail("eval_batch_size", f"{c.eval_batch_size} is not a positive multiple of "
          f"{shape[0] * process_count}", f"use a multiple of {shape[0] * process_count}")
  if c.sampling.kind not in sampling.KINDS:
    _fail("sampling.kind", f"unknown kind {c.sampling.kind!r}", f"use one of {sampling.KINDS}")
  if c.sampling.schedule not in sampling.SCHEDULES:
    _fail("sampling.schedule", f"unknown schedule {c.sampling.schedule!r}",
          f"use one of {sampling.SCHEDULES}")
  if c.optimizer.nonfinite not in ("stop", "skip"):
    _fail("optimizer.nonfinite", f"unknown {c.optimizer.nonfinite!r}", "use 'stop' or 'skip'")
  from mtl_jax import augment  # Local, as above.
  if c.eval.holdout_mode not in ("last", "shared"):
    _fail("eval.holdout_mode", f"unknown {c.eval.holdout_mode!r}",
          "use 'last' (each task's last classes) or 'shared' (also every same-named class)")
  if c.augment.kind not in augment.KINDS:
    _fail("augment.kind", f"unknown {c.augment.kind!r}", f"use one of {augment.KINDS}")
  unknown = set(augment_inputs(c)) - {"image", "text", "pooled"}
  if unknown:
    _fail("augment.inputs", f"unknown inputs {sorted(unknown)}",
          "use a comma-separated subset of image,text,pooled")
  from mtl_jax import dypa  # Local, as above.
  if c.dypa.select not in dypa.SELECTORS:
    _fail("dypa.select", f"unknown {c.dypa.select!r}", f"use one of {dypa.SELECTORS}")
  try:
    at_steps = dypa.scheduled_steps(c)
  except ValueError:
    _fail("dypa.at_steps", f"{c.dypa.at_steps!r} is not a list of steps", "use e.g. '2000,4000'")
  if any(step <= 0 for step in at_steps):
    _fail("dypa.at_steps", f"{c.dypa.at_steps!r} holds a step <= 0, which never comes",
          "use positive steps, e.g. '2000,4000'")
  if c.dypa.select == "explicit" and not c.dypa.tasks:
    _fail("dypa.tasks", "is empty but dypa.select='explicit'", "name the tasks, comma-separated")
  if c.dypa.select == "baseline_gap" and not c.dypa.baseline:
    _fail("dypa.baseline", "is empty but dypa.select='baseline_gap'",
          "give a JSON file of single-task accuracies")
  if c.optimizer.task_update not in ("sparse", "dense"):
    _fail("optimizer.task_update", f"unknown {c.optimizer.task_update!r}",
          "use 'sparse' or 'dense'")
  if c.model.hidden_size % c.model.num_heads:
    _fail("model.hidden_size", f"{c.model.hidden_size} is not divisible by model.num_heads="
          f"{c.model.num_heads}", "choose sizes with hidden_size % num_heads == 0")
  if c.model.pooling not in ("cls", "mean"):
    _fail("model.pooling", f"unknown {c.model.pooling!r}", "use 'cls' or 'mean'")
  if c.model.head_init not in ("random", "probe"):
    _fail("model.head_init", f"unknown {c.model.head_init!r}", "use 'random' or 'probe'")
  from mtl_jax import model  # Local, as above.
  if c.model.remat not in model.REMAT_POLICIES:
    _fail("model.remat", f"unknown {c.model.remat!r}", f"use one of {tuple(model.REMAT_POLICIES)}")
  if c.model.dtype not in ("float32", "bfloat16"):
    _fail("model.dtype", f"unknown {c.model.dtype!r}", "use 'float32' or 'bfloat16'")
  if c.data.on_bad_record not in ("fail", "skip"):
    _fail("data.on_bad_record", f"unknown {c.data.on_bad_record!r}", "use 'fail' or 'skip'")
  if c.best_metric and (not c.best_metric.startswith("validation/")
                        or not c.best_metric[len("validation/"):]):
    _fail("best_metric", f"{c.best_metric!r} is not a validation value",
          "use 'validation/<key>' of the validation summary, e.g. "
          "'validation/mean_accuracy' (the default), or '' for no best checkpoint")
  if c.best_mode not in ("max", "min"):
    _fail("best_mode", f"unknown {c.best_mode!r}",
          "use 'max' (accuracies, AUROC) or 'min' (losses, ECE)")
  if c.early_stopping_patience and not c.best_metric:
    _fail("early_stopping_patience", f"{c.early_stopping_patience} needs a metric to watch, but "
          "best_metric is ''", "set --config.best_metric (e.g. 'validation/mean_accuracy') or "
          "--config.early_stopping_patience=0")


def validate_against_data(c, task_table) -> None:
  widest = int(task_table.num_classes.max())
  if widest > c.model.max_classes:
    name = task_table.names[int(task_table.num_classes.argmax())]
    _fail("model.max_classes", f"{c.model.max_classes} is smaller than the {widest} classes of "
          f"task {name!r}", f"set --config.model.max_classes={widest} or more")


def augment_inputs(c) -> tuple[str, ...]:
  return tuple(x.strip() for x in c.augment.inputs.split(",") if x.strip())
