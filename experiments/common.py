"""What the experiment scripts share: config overrides, runs, restoring a run, predictions, JSON.

Every training goes through `train.train_and_evaluate`; a finished run is read back from its
last checkpoint with the library's own pieces (`train.prepare_data`, `train.model_spec`,
`train.Trainer`, `Trainer.abstract_state`, `checkpointing.read_meta`), so the scripts
re-implement neither the model nor the training.

Runs of one experiment share a catalogue and its prepared TFDS data and tokenizer: they are made
once under `<root>/shared` and linked into every run's workdir, so a run only trains.
"""
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mtl_jax import checkpointing, input_pipeline, sharding, synthetic, train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "experiments", "results")

# The line `train_and_evaluate` prints after each validation evaluation (evaluation.format_table).
_VALIDATION_LINE = re.compile(r"^validation: \d+ tasks, mean accuracy ([0-9.]+|-)")
_STEP_LINE = re.compile(r"^step (\d+)/\d+: loss")


def set_fields(config, overrides: dict):
  """Sets dotted fields (`{"model.hidden_size": 64}`) on a locked-or-not ConfigDict, in place.

  Raises:
    KeyError: a field the config does not define (a misspelt override).
  """
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise KeyError(f"config has no field {key!r}; see mtl_jax/config_base.py.")
    node[leaf] = value
  return config


def run_metadata(argv=None) -> dict:
  """The exact command, the date and the hardware, for a result file."""
  argv = sys.argv if argv is None else argv
  device = jax.devices()[0]
  return {
      "command": shlex.join(["python", *argv]),
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "hardware": {
          "backend": jax.default_backend(),
          "device": str(getattr(device, "device_kind", device)),
          "device_count": jax.device_count(),
          "cpu_count": os.cpu_count(),
          "machine": platform.machine(),
          "processor": platform.processor() or platform.machine(),
          "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
      },
      "versions": {"python": platform.python_version(), "jax": jax.__version__},
  }


def make_catalogue(root: str, synthetic_fields: dict, base_config) -> str:
  """Generates (or reuses) the experiment's synthetic catalogue in `<root>/catalogue`."""
  synthetic_config = base_config.data.synthetic.copy_and_resolve_references()
  set_fields(synthetic_config, synthetic_fields)
  out = os.path.join(root, "catalogue")
  synthetic.generate_catalogue(out, synthetic_config)
  return out


def prepare_data(config, workdir: str):
  """`train.prepare_data` (catalogue and tokenizer), its printout sent to stderr."""
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress.
    return train.prepare_data(config, epath.Path(workdir))


def prepare_shared(config, root: str):
  """Prepares the catalogue and tokenizer of `config` once, in `<root>/shared`."""
  shared = os.path.join(root, "shared")
  os.makedirs(shared, exist_ok=True)
  return prepare_data(config, shared)


def fresh_workdir(root: str, name: str) -> str:
  """An empty run directory that links the shared prepared data and tokenizer."""
  workdir = os.path.join(root, "runs", name)
  if os.path.exists(workdir):
    shutil.rmtree(workdir)  # A fresh run, never a resume of an older config.
  os.makedirs(workdir)
  for part in ("prepared", "tokenizer"):
    target = os.path.join(root, "shared", part)
    if os.path.exists(target):
      os.symlink(os.path.abspath(target), os.path.join(workdir, part))
  return workdir


def train_run(config, workdir: str) -> dict:
  """`train.train_and_evaluate` with its printout in `<workdir>/train.log`.

  Returns:
    {"test": test summary, "seconds": wall time, "validation_curve": [(step, mean accuracy)],
     "log": the printout}.
  """
  log_path = os.path.join(workdir, "train.log")
  start = time.perf_counter()
  with open(log_path, "w") as log, contextlib.redirect_stdout(log):
    summary = train.train_and_evaluate(config, workdir)
  seconds = time.perf_counter() - start
  with open(log_path) as f:
    text = f.read()
  return {"test": summary, "seconds": seconds, "validation_curve": validation_curve(text),
          "log": text}


def validation_curve(log_text: str) -> list[tuple[int, float]]:
  """(step, mean per-task validation accuracy) of every evaluation printed during a run."""
  curve, step = [], 0
  for line in log_text.splitlines():
    match = _STEP_LINE.match(line)
    if match:
      step = int(match.group(1))
    match = _VALIDATION_LINE.match(line)
    if match and match.group(1) != "-":
      curve.append((step, float(match.group(1))))
  return curve


def report_rows(workdir: str) -> list[dict]:
  """Per-task rows of the run's test report (`reports/test.json`)."""
  with open(os.path.join(workdir, "reports", "test.json")) as f:
    return json.load(f)["tasks"]


def restore_run(config, workdir: str):
  """The finished run's trainer, last state, checkpoint meta, catalogue and tokenizer.

  Reads the latest checkpoint with Orbax directly into `trainer.abstract_state` (as the
  end-to-end test does): the run was just written by this process's library version.
  """
  workdir = os.path.abspath(workdir)  # Orbax wants absolute checkpoint paths.
  catalogue, tokenizer = prepare_data(config, workdir)
  task_table = catalogue.task_table
  spec = train.model_spec(config, task_table, len(tokenizer))
  trainer = train.Trainer(
      config, spec, train.trained_num_classes(task_table.num_classes,
                                              config.eval.holdout_classes),
      sharding.make_mesh(config.mesh))
  mngr = ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", item_names=("state", "meta"))
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint; train the run first.")
  meta = checkpointing.read_meta(mngr, step)
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
      trainer.abstract_state(meta["num_adapter_slots"])))).state
  mngr.close()
  return trainer, state, meta, catalogue, tokenizer


def predict_split(trainer, state, catalogue, tokenizer, split: str) -> dict:
  """Class probabilities of every real example of `split` (`Trainer.predict_probs`).

  Returns:
    {"probs": [N, C] over each example's trained task classes, "labels": [N], "task_ids": [N]}.
  """
  predict = jax.jit(trainer.predict_probs)
  probs, labels, task_ids = [], [], []
  for local in input_pipeline.eval_batches(catalogue, split, tokenizer, trainer.config):
    real = local.pop("example_mask").astype(bool)
    batch = trainer.global_batch(local)
    out = np.asarray(jax.device_get(predict(state.params, state.adapter_map, state.num_classes,
                                            batch)))
    probs.append(out[real])
    labels.append(local["label"][real])
    task_ids.append(local["task_id"][real])
  return {"probs": np.concatenate(probs), "labels": np.concatenate(labels),
          "task_ids": np.concatenate(task_ids)}


def mean_std(values) -> dict:
  """Mean and sample standard deviation (ddof=1) over seeds, ignoring NaN."""
  values = np.asarray([v for v in values if v is not None], np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return {"mean": None, "std": None, "n": 0}
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return {"mean": float(values.mean()), "std": std, "n": int(values.size)}


def fmt(stat: dict, digits: int = 3) -> str:
  if stat["mean"] is None:
    return "-"
  return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
  """A plain-text table, columns padded to their widest cell."""
  widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating, float)):
    return None if not math.isfinite(float(value)) else float(value)
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  return value


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(_jsonable(payload), f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def default_out(name: str) -> str:
  return os.path.join(RESULTS_DIR, f"{name}.json")
