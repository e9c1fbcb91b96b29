"""What the experiment scripts share: config overrides, runs, reading a run back, JSON.

Every training goes through `train.train_and_evaluate`; a finished run is read back the way
every command reads one, `workdir.open_run` (its config, task table, tokenizer and
`state.Model`, and `Run.restore_inference` for the verified arrays), and evaluated by the
library's one evaluation loop, `steps.evaluate` over `input_pipeline.eval_batches`, scored by
`evaluation.evaluate_outputs`. The scripts re-implement neither the model, nor the training,
nor the evaluation.

Runs of one experiment share a catalogue and its prepared TFDS data and tokenizer: they are made
once under `<root>/shared` and linked into every run's workdir, so a run only trains.
"""
import contextlib
import dataclasses
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
import types

import jax
import numpy as np

from configs.common import set_fields  # noqa: F401  (the experiments' one way to set fields)
from mtl_jax import catalogue
from mtl_jax import evaluation
from mtl_jax import input_pipeline
from mtl_jax import linear_probe
from mtl_jax import prepare
from mtl_jax import steps
from mtl_jax import synthetic
from mtl_jax import train
from mtl_jax import workdir as workdir_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "experiments", "results")

# The line `train_and_evaluate` prints after each validation evaluation (evaluation.format_table).
_VALIDATION_LINE = re.compile(r"^validation at step (\d+): \d+ tasks, mean accuracy ([0-9.]+|-)")


def cpu_model() -> str:
  """The CPU's model name as Linux reports it (/proc/cpuinfo), else what `platform` gives."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


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
          "processor": cpu_model(),
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


BLANK_TITLE = "product"  # The neutral title of products whose only input is an embedding.


def write_embedding_catalogue(out_dir: str, tasks: dict, splits: dict, info: dict,
                              info_file: str, keep_text: bool = False, max_len: int = 128,
                              batch_size: int = linear_probe.TEXT_BATCH) -> dict:
  """Writes a catalogue whose one image per product is the all-MiniLM-L6-v2 embedding of its
  title and description (`linear_probe.TextEmbedder`, the linear probe's text features).

  Args:
    out_dir: the catalogue directory; written under a temporary name, then moved in place.
    tasks: {task name: [class names]}, in order.
    splits: {split: [{"id", "task", "label", "title", "description"}]}.
    info: what the catalogue is, written to `<out_dir>/<info_file>` with the embedding's
      settings, the product count and the time taken added.
    keep_text: keep titles and descriptions; False: every title is `BLANK_TITLE`, no
      description, so the embedding is the only input.

  Returns:
    The info written.
  """
  start = time.perf_counter()
  ordered = [p for split in catalogue.SPLITS for p in splits[split]]
  embedder = linear_probe.TextEmbedder(max_len, batch_size)
  embeddings = embedder([p["title"] for p in ordered],
                        [p.get("description", "") for p in ordered])
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  np.save(os.path.join(tmp, catalogue.EMBEDDINGS_FILE), embeddings)
  with open(os.path.join(tmp, catalogue.TASKS_FILE), "w") as f:
    json.dump({"format_version": catalogue.FORMAT_VERSION, "image_dim": embeddings.shape[1],
               "max_images": 1,
               "tasks": [{"name": n, "classes": list(c)} for n, c in tasks.items()]}, f, indent=1)
  row = 0
  for split in catalogue.SPLITS:
    with open(os.path.join(tmp, catalogue.split_file(split)), "w", encoding="utf-8") as f:
      for p in splits[split]:
        text = ({"title": p["title"], "description": p.get("description", "")} if keep_text
                else {"title": BLANK_TITLE, "description": ""})
        f.write(json.dumps({"id": p["id"], "task": p["task"], "label": p["label"], **text,
                            "images": [row]}) + "\n")
        row += 1
  info = {**info, "embedding": f"{embedder.name}, mean pooling, L2-normalised, of [CLS] title "
          "[SEP] description [SEP]", "max_len": max_len, "products": row,
          "embedding_seconds": round(time.perf_counter() - start, 1)}
  with open(os.path.join(tmp, info_file), "w") as f:
    json.dump(info, f, indent=1)
  open(os.path.join(tmp, catalogue.COMPLETE_MARKER), "w").close()
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  return info


def prepare_data(config, workdir: str):
  """`prepare.prepare_data` (catalogue and tokenizer), its printout sent to stderr."""
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress.
    return prepare.prepare_data(config, workdir_lib.resolve(workdir))


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
  matches = map(_VALIDATION_LINE.match, log_text.splitlines())
  return [(int(m.group(1)), float(m.group(2))) for m in matches if m and m.group(2) != "-"]


def report_rows(workdir: str) -> list[dict]:
  """Per-task rows of the run's test report (`reports/test.json`)."""
  with open(os.path.join(workdir, "reports", "test.json")) as f:
    return json.load(f)["tasks"]


def read_run(workdir: str, step: int | None = None):
  """A finished run's checkpoint: (`workdir.Run`, its verified inference arrays).

  Returns:
    (run, arrays): `run` from `workdir.open_run` (closed: its `config`, `task_table`,
    `tokenizer`, `model`, `meta` and `step` stay readable) and `arrays`, a namespace with
    `params`, `adapter_map` and `num_classes` (`Run.restore_inference`), which
    `dypa.allocation_summary` and `steps.evaluate` read like a train state.
  """
  run = workdir_lib.open_run(workdir, step)
  try:
    arrays = run.restore_inference()
  finally:
    run.close()
  return run, types.SimpleNamespace(**arrays)


@dataclasses.dataclass
class RunEvaluation:
  """One split of a finished run, evaluated from its checkpoint.

  Attributes:
    run: the `workdir.Run` (closed; see `read_run`).
    arrays: its inference arrays (`params`, `adapter_map`, `num_classes`).
    outputs: `steps.evaluate`'s {"logits" [N, C], "label" [N], "task_id" [N]} of the real
      examples of the split.
    result: `evaluation.evaluate_outputs` of those outputs (`rows`, `summary`, `calibration`),
      the numbers of the run's own `reports/<split>.json`.
  """
  run: workdir_lib.Run
  arrays: types.SimpleNamespace
  outputs: dict
  result: evaluation.SplitResult


def evaluate_run(workdir: str, split: str = "test", step: int | None = None) -> RunEvaluation:
  """Re-evaluates `split` of a finished run from its (latest, or `step`) checkpoint.

  The catalogue is the run's own (`prepare.prepare_data` with the run's saved config, reusing
  its prepared data); the tokenizer and model are those `workdir.open_run` reads.

  Raises:
    RuntimeError: the catalogue's tasks differ from those the checkpoint was trained on.
  """
  run, arrays = read_run(workdir, step)
  catalogue, _ = prepare_data(run.config, os.fspath(run.workdir))
  table = catalogue.task_table
  if list(table.names) != list(run.task_table.names) or not np.array_equal(
      table.num_classes, run.task_table.num_classes):
    raise RuntimeError(f"{run.workdir}: the catalogue {run.config.data.catalogue_dir} no longer "
                       "holds the tasks this run trained on; re-train the run.")
  outputs = steps.evaluate(run.model, arrays.params, arrays.adapter_map,
                           input_pipeline.eval_batches(catalogue, split, run.tokenizer,
                                                       run.config))
  result = evaluation.evaluate_outputs(
      table, outputs, np.asarray(jax.device_get(arrays.num_classes)),
      catalogue.num_examples("train"),
      catalogue.skipped.get(split, {}), catalogue.skipped.get("train", {}))
  return RunEvaluation(run=run, arrays=arrays, outputs=outputs, result=result)


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
