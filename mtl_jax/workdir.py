"""The run directory (`--workdir`): what a run keeps, and the one way every command opens it.

    <workdir>/
      LOCK                 the writer's pid, host and command while a run writes here
      checkpoints/<step>/  Orbax: `state` (arrays) and `meta` (config, task table, data
                           position, adapter count, DyPa events, array fingerprints, the
                           best-checkpoint record); `metrics` on a step saved as the best
      checkpoints/corrupt/ damaged checkpoints moved aside (never deleted)
      tokenizer/           the vocabulary the run trained with (predict and new_task need it)
      catalogue/           the generated synthetic catalogue (when none is configured)
      prepared/            the TFDS (array_record) form of the catalogue
      reports/             {validation,test}.{json,csv}, calibration.json, report.html
      *.tfevents*          TensorBoard scalars (clu)

Contract:
- Paths are made absolute here (Orbax refuses relative ones); a workdir that is a file, or
  cannot be written, is refused at the start with the path and the fix; one that a failed run
  created and left empty is removed.
- One writer at a time: `writer_lock` creates `LOCK` atomically and refuses a second writer,
  naming the process that holds it; a lock left by a process that is gone (same host, pid not
  running) is taken over with a warning. In a multi-host job only process 0 takes it.
- A resumed run must be the same run: `check_resume` compares the config and the task table with
  what the checkpoint saved and refuses any change that is not safe, with a diff and the fix.
- Every checkpoint read verifies the arrays' fingerprints (`checkpointing.restore`), whichever
  command reads it: training, predict, new_task, dypa.
- Task names never become paths as they are: `task_dir_name` maps them to safe directory
  names, and `inside` refuses any path that resolves outside the workdir.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import socket
import sys
import time
import unicodedata
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from mtl_jax import catalogue as cat
from mtl_jax import checkpointing
from mtl_jax import config_base
from mtl_jax import early_stopping
from mtl_jax import evaluation
from mtl_jax import sharding
from mtl_jax import state as state_lib
from mtl_jax import tokenizer as tokenizer_lib
from mtl_jax.model import ModelSpec

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"
REPORTS = "reports"
LOCK = "LOCK"

# Config fields that may differ between a checkpoint and the command that resumes it: they change
# how long the run goes on, how often it reports and saves, which checkpoint is kept as the best
# and when training stops early, and where arrays are placed, never what the saved arrays mean.
# Prefixes end with a dot.
RESUME_SAFE = ("total_steps", "log_every", "eval_every", "checkpoint_every", "max_to_keep",
               "eval_batch_size", "data.prefetch", "data.on_bad_record", "data.catalogue_dir",
               "mesh.", "sharding_rules", "dypa.", "best_metric", "best_mode", "eval_on_best",
               "early_stopping_patience", "early_stopping_min_delta")


class RunDirError(RuntimeError):
  """A workdir that cannot be used as asked; the message names the path and the fix."""


def resolve(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as an absolute path (cloud paths such as gs://... are left as they are)."""
  workdir = os.fspath(workdir)
  if not workdir:
    raise RunDirError("--workdir is empty. Fix: give the directory of the run, e.g. runs/demo.")
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


@contextlib.contextmanager
def prepared(workdir: str | os.PathLike):
  """The workdir of a run that will write, resolved and created; checks it can be written.

  A directory this run created is removed again if the run fails while it is still empty (a
  misspelt catalogue path leaves no empty run directory behind); anything written stays.
  """
  path = resolve(workdir)
  if path.exists() and not path.is_dir():
    raise RunDirError(f"--workdir={path} is a file, not a directory. Fix: give a directory "
                      "path (it is created if missing).")
  created = not path.exists()
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise RunDirError(f"--workdir={path} cannot be written ({e.strerror or e}). Fix: choose a "
                      "directory you can write, or fix its permissions.") from None
  try:
    yield path
  except BaseException:
    if created and jax.process_index() == 0 and "://" not in os.fspath(path):
      with contextlib.suppress(OSError):
        os.rmdir(path)  # Fails, and keeps the directory, if anything was written into it.
    raise


# --- One writer ---------------------------------------------------------------------------------

def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by someone else.
    return True
  return True


def _read_lock(path: epath.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


@contextlib.contextmanager
def writer_lock(workdir: epath.Path):
  """Holds `<workdir>/LOCK` for the duration; refuses a second writer (see the module doc)."""
  if jax.process_index() > 0:  # The job's process 0 owns the directory for all of them.
    yield
    return
  path = workdir / LOCK
  mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "command": " ".join(sys.argv)[:500]}
  for _ in range(3):
    try:
      if "://" in os.fspath(path):  # Object stores have no exclusive create: best effort.
        if path.exists():
          raise FileExistsError(path)
        path.write_text(json.dumps(mine))
      else:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
          f.write(json.dumps(mine))
      break
    except FileExistsError:
      holder = _read_lock(path)
      same_host = holder.get("host") == mine["host"]
      if same_host and isinstance(holder.get("pid"), int) and not _process_alive(holder["pid"]):
        # Gone without releasing (killed): move the stale lock aside and try again, so two
        # runs that find it stale at once cannot both take it.
        stale = workdir / f"{LOCK}.stale-{holder['pid']}-{os.getpid()}"
        try:
          path.rename(stale)
          stale.unlink()
          print(f"WARNING: removed the stale lock of process {holder['pid']} on {holder['host']} "
                f"(no longer running) from {path}.", flush=True)
        except OSError:
          pass
        continue
      started = holder.get("started")
      since = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started))
               if isinstance(started, (int, float)) else "")
      raise RunDirError(
          f"{workdir} is in use by process {holder.get('pid', '?')} on host "
          f"{holder.get('host', '?')}{since} ({holder.get('command', 'unknown command')}). "
          f"Fix: wait for that run to end, use another --workdir, or, if that process is gone "
          f"(e.g. its machine was lost), remove {path}.")
  else:
    raise RunDirError(f"Could not take {path} after 3 tries. Fix: remove it if no run uses "
                      f"{workdir}.")
  try:
    yield
  finally:
    if _read_lock(path).get("pid") == mine["pid"]:
      try:
        path.unlink()
      except OSError:
        pass


# --- Resuming the same run ----------------------------------------------------------------------

def _safe(field: str) -> bool:
  return any(field == s or (s.endswith(".") and field.startswith(s)) or
             field.startswith(s + ".") for s in RESUME_SAFE)


def _task_table_changes(saved: cat.TaskTable, now: cat.TaskTable) -> list[str]:
  changes = []
  if saved.names != now.names:
    added = [n for n in now.names if not saved.has_task(n)]
    removed = [n for n in saved.names if not now.has_task(n)]
    if added:
      changes.append(f"tasks added: {added[:5]}{' ...' if len(added) > 5 else ''}")
    if removed:
      changes.append(f"tasks removed: {removed[:5]}{' ...' if len(removed) > 5 else ''}")
    moved = [n for i, n in enumerate(now.names)
             if saved.has_task(n) and saved.task_index(n) != i]
    if moved and not added and not removed:
      changes.append(f"task order changed (e.g. {moved[0]!r} was task {saved.task_index(moved[0])}, "
                     f"now {now.task_index(moved[0])})")
  for name in now.names:
    if saved.has_task(name):
      old = saved.class_names[saved.task_index(name)]
      new = now.class_names[now.task_index(name)]
      if old != new:
        changes.append(f"classes of task {name!r} changed ({len(old)} -> {len(new)} classes"
                       f"{'; same names, new order' if sorted(old) == sorted(new) else ''})")
  for field in ("image_dim", "max_images"):
    if getattr(saved, field) != getattr(now, field):
      changes.append(f"{field}: {getattr(saved, field)} -> {getattr(now, field)}")
  return changes


def check_head_layout(meta: dict, checkpoint) -> None:
  """Refuses a checkpoint whose heads are one row per task padded to `model.max_classes` (saved
  before heads were stored in class blocks, `model.classes_per_block`): its arrays have other
  shapes, and read as damaged otherwise."""
  if "classes_per_block" not in json.loads(meta["config"]).get("model", {}):
    raise RunDirError(
        f"{checkpoint} stores its task heads as one row per task padded to model.max_classes, a "
        "layout this version of mtl_jax no longer reads (heads are now blocks of "
        "model.classes_per_block classes). Fix: train the run again in a new --workdir, or use "
        "the mtl_jax version that wrote it.")


def check_resume(meta: dict, config, task_table: cat.TaskTable, checkpoint: str) -> None:
  """Refuses to resume a checkpoint with another task table or an unsafe config change.

  Raises:
    RunDirError: with every change (saved -> now) and the fix.
  """
  check_head_layout(meta, checkpoint)
  problems = []
  saved_table = cat.TaskTable.from_json(meta["task_table"], source=f"{checkpoint} meta")
  problems += [f"catalogue: {c}" for c in _task_table_changes(saved_table, task_table)]
  saved = evaluation.flatten(json.loads(meta["config"]))
  now = evaluation.flatten(json.loads(config.to_json()))
  # A field added to the config after the checkpoint was saved is absent from it: at its
  # default, it means what the run did before the field existed.
  defaults = evaluation.flatten(json.loads(config_base.base_config().to_json()))
  for field in sorted(saved.keys() | now.keys()):
    if _safe(field) or saved.get(field) == now.get(field):
      continue
    if field not in saved and field in defaults and now.get(field) == defaults[field]:
      continue
    show = lambda d: repr(d[field]) if field in d else "(absent)"
    problems.append(f"config.{field}: {show(saved)} (saved) -> {show(now)} (now)")
  if problems:
    shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more"
                                        if len(problems) > 12 else "")
    raise RunDirError(
        f"{checkpoint} was saved by a different run: {shown}. Fix: run the command that made "
        "this run (only step counts, report/save cadence, the catalogue's location, mesh, "
        "sharding, DyPa schedule, best checkpoint and early stopping may change on resume), "
        "or use a new --workdir; add "
        "websites with `python -m mtl_jax.new_task`.")


# --- Tokenizer ----------------------------------------------------------------------------------

def _has_tokenizer(directory: epath.Path) -> bool:
  return (directory / tokenizer_lib.VOCAB_FILE).exists() or (directory / "tokenizer.json").exists()


def keep_tokenizer(workdir: epath.Path, tokenizer) -> None:
  """A copy of the run's tokenizer beside its checkpoints (written once, atomically), so that
  the run predicts and grows without the original directory or package."""
  local = workdir / TOKENIZER
  if local.exists() or jax.process_index() > 0:
    return
  tmp = workdir / f".{TOKENIZER}.tmp-{os.getpid()}"
  tokenizer.save_pretrained(os.fspath(tmp))
  tmp.rename(local)


def load_run_tokenizer(workdir: epath.Path, config) -> tuple[Any, str]:
  """The tokenizer a run trained with, and where it was found: `<workdir>/tokenizer`, else the
  config's `data.tokenizer_dir`, else its `model.text_init` checkpoint's tokenizer."""
  local = workdir / TOKENIZER
  if _has_tokenizer(local):
    return tokenizer_lib.load_tokenizer(os.fspath(local)), os.fspath(local)
  tried = [os.fspath(local)]
  if config.data.tokenizer_dir:
    if _has_tokenizer(epath.Path(config.data.tokenizer_dir)):
      return tokenizer_lib.load_tokenizer(config.data.tokenizer_dir), config.data.tokenizer_dir
    tried.append(f"data.tokenizer_dir={config.data.tokenizer_dir}")
  elif config.model.text_init:
    from mtl_jax import pretrained  # Local: only runs that started from weights need it.
    try:
      return (pretrained.load_tokenizer_for(config.model.text_init),
              f"model.text_init={config.model.text_init}")
    except FileNotFoundError as e:
      tried.append(f"model.text_init={config.model.text_init} ({e})")
  raise RunDirError(
      f"{workdir}: no tokenizer found (tried {'; '.join(tried)}). Fix: copy the vocabulary the "
      f"run trained with (vocab.txt or tokenizer.json) into {local}.")


# --- Reading a trained run ----------------------------------------------------------------------

def checkpoint_manager(workdir: epath.Path, max_to_keep: int | None = None,
                       create: bool = False, best_metric: str = "",
                       best_mode: str = "max") -> ocp.CheckpointManager:
  """The workdir's Orbax manager. Writers pass `max_to_keep`; with `best_metric` it also keeps
  the checkpoint saved with the best value of that metric (early_stopping.py)."""
  if best_metric and max_to_keep is not None:
    policy, best_fn = early_stopping.preservation_policy(best_metric, best_mode, max_to_keep)
    # best_fn makes Orbax write the metrics; the policy alone decides what is kept.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=best_fn,
                                           best_mode=best_mode, create=create,
                                           enable_async_checkpointing=create)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=create)
  return ocp.CheckpointManager(workdir / CHECKPOINTS, options=options,
                               item_names=("state", "meta"))


def _mesh_for(config):
  """The run's mesh where it fits the devices here, else data parallelism over all of them."""
  try:
    return sharding.make_mesh(config.mesh)
  except ValueError:
    return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "model": 1}))


def shared_holdout_error() -> RunDirError:
  """Why tasks cannot be added to a run with eval.holdout_mode='shared'."""
  # The shared plan depends on every task's class names: new tasks would change it.
  return RunDirError("Adding tasks to a run with eval.holdout_mode='shared' is not supported: "
                     "its held-out classes depend on every task's classes. Fix: train the run "
                     "again with the new tasks in its catalogue.")


def model_for(config, meta: dict, task_table: cat.TaskTable, vocab_size: int, mesh=None,
              **kwargs) -> state_lib.Model:
  """The Model of a saved run: its saved encoder sizes and its tasks' trained class counts."""
  known = {f.name for f in dataclasses.fields(ModelSpec)}
  if "model_spec" in meta and known >= set(meta["model_spec"]):
    # The sizes the run was built with, so a `model.text_init` checkpoint need not be present.
    spec = ModelSpec(**meta["model_spec"])
  else:
    spec = state_lib.model_spec(config, task_table, vocab_size)
  num_classes, class_order = state_lib.holdout_for(config, task_table)
  if class_order is not None and task_table.num_tasks != meta.get("num_tasks"):
    raise shared_holdout_error()
  return state_lib.Model(config, spec, num_classes, mesh or _mesh_for(config),
                         class_order=class_order, **kwargs)


@dataclasses.dataclass
class Run:
  """A trained run as read back from its workdir: everything but the arrays.

  Attributes:
    workdir: the run's directory (absolute).
    step: the checkpoint's step.
    steps: every checkpoint step of the run.
    meta: the checkpoint's `meta` (config JSON, task table JSON, adapter count, ...).
    config: the run's config.
    task_table: every task's name and class names, and the image-embedding shape.
    tokenizer: the run's text tokenizer, and `tokenizer_source`, where it was read from.
    model: a `state.Model` for the checkpoint's tasks.
    manager: the workdir's Orbax checkpoint manager (read-only).
  """
  workdir: epath.Path
  step: int
  steps: list
  meta: dict
  config: ml_collections.ConfigDict
  task_table: cat.TaskTable
  tokenizer: Any
  tokenizer_source: str
  model: state_lib.Model
  manager: ocp.CheckpointManager

  @property
  def num_adapter_slots(self) -> int:
    return int(self.meta["num_adapter_slots"])

  def _restore(self, target, partial):
    try:
      return checkpointing.restore(self.manager, self.step, target, self.meta, partial=partial)
    except checkpointing.CheckpointError as e:
      older = [s for s in self.steps if s < self.step]
      fix = (f"use an older checkpoint with --step={older[-1]} (this run has {older})"
             if older else "retrain the run, or restore its checkpoints from a backup")
      raise checkpointing.CheckpointError(f"{e} Fix: {fix}.") from None

  def restore_inference(self) -> dict:
    """{"params", "adapter_map", "num_classes"} of the checkpoint, placed by the config's
    sharding rules and verified; the optimiser state is not read."""
    abstract = self.model.abstract_state(self.num_adapter_slots)
    target = {"params": abstract.params, "adapter_map": abstract.adapter_map,
              "num_classes": abstract.num_classes}
    return self._restore(target, partial=True)

  def restore_state(self) -> state_lib.TrainState:
    """The whole train state (parameters and optimiser state) of the checkpoint, verified."""
    return self._restore(self.model.abstract_state(self.num_adapter_slots), partial=False)

  def close(self):
    self.manager.close()


STEP_HELP = ("The checkpoint to use: a step number, 'latest' (the default) or 'best' (the best "
             "validation checkpoint of a run trained with config.best_metric).")


def parse_step(step: int | str | None) -> int | str | None:
  """A `--step` value: None for the latest checkpoint, "best", or a step number.

  Raises:
    RunDirError: anything else.
  """
  if step is None or (isinstance(step, int) and not isinstance(step, bool)):
    return step
  text = str(step).strip().lower()
  if text in ("", "latest"):
    return None
  if text == "best":
    return "best"
  try:
    return int(text)
  except ValueError:
    raise RunDirError(f"--step={step!r}: not a checkpoint. Fix: give a step number, 'latest' "
                      "or 'best'.") from None


def _best_record(manager: ocp.CheckpointManager, steps: list[int]) -> dict:
  """The best-checkpoint record of the newest checkpoint whose meta reads back."""
  for step in reversed(steps):
    try:
      meta = checkpointing.read_meta(manager, step)
    except Exception:  # A damaged meta: an older checkpoint knows an older best.
      continue
    return meta.get(early_stopping.META_KEY) or {}
  return {}


def _resolve_step(manager, checkpoints: epath.Path, steps: list[int], step) -> int:
  if step is None:
    return steps[-1]
  if step == "best":
    record = _best_record(manager, steps)
    if record.get("step") is None:
      raise RunDirError(
          f"{checkpoints}: no best checkpoint recorded (the run was trained with "
          "config.best_metric='', or stopped before its first validation evaluation). Fix: use "
          f"--step=latest or one of {steps}.")
    if record["step"] not in steps:
      raise RunDirError(
          f"{checkpoints}: the best checkpoint, step {record['step']} ({record['metric']} "
          f"{record['value']}), is no longer there (moved aside or removed). Fix: use one of "
          f"{steps}.")
    return int(record["step"])
  if step not in steps:
    raise RunDirError(f"{checkpoints}: no checkpoint at step {step}. Fix: use one of {steps}.")
  return step


def open_run(workdir: str | os.PathLike, step: int | str | None = None) -> Run:
  """Reads a trained run's checkpoint metadata, tokenizer and model definition (not its arrays).

  `step`: a step number, None or "latest" for the latest checkpoint, or "best" for the best
  validation checkpoint recorded in the latest checkpoint's meta (early_stopping.py).

  Raises:
    RunDirError: no checkpoint, no such step, or no tokenizer.
  """
  workdir = resolve(workdir)
  checkpoints = workdir / CHECKPOINTS
  if not checkpoints.is_dir():
    raise RunDirError(f"{workdir}: no checkpoints directory. Fix: give the --workdir of a trained "
                      "run (it holds checkpoints/ and tokenizer/).")
  manager = checkpoint_manager(workdir)
  steps = sorted(manager.all_steps())
  if not steps:
    manager.close()
    raise RunDirError(f"{checkpoints}: no checkpoint. Fix: train the run first, or give the "
                      "workdir of a trained one.")
  try:
    step = _resolve_step(manager, checkpoints, steps, parse_step(step))
  except RunDirError:
    manager.close()
    raise
  try:
    meta = checkpointing.read_meta(manager, step)
  except Exception as e:  # A damaged meta file.
    manager.close()
    raise checkpointing.CheckpointError(
        f"{checkpoints / str(step)}: its metadata does not read back ({e}). Fix: use another "
        f"checkpoint with --step (this run has {steps}).") from None
  try:
    check_head_layout(meta, checkpoints / str(step))
  except RunDirError:
    manager.close()
    raise
  config = ml_collections.ConfigDict(json.loads(meta["config"]))
  task_table = cat.TaskTable.from_json(meta["task_table"],
                                       source=f"{checkpoints / str(step)} meta.task_table")
  tokenizer, tokenizer_source = load_run_tokenizer(workdir, config)
  model = model_for(config, meta, task_table, len(tokenizer))
  return Run(workdir=workdir, step=int(step), steps=steps, meta=meta, config=config,
             task_table=task_table, tokenizer=tokenizer, tokenizer_source=tokenizer_source,
             model=model, manager=manager)


def latest_meta(workdir: str | os.PathLike) -> dict | None:
  """The newest checkpoint's meta of a workdir, or None where it has no checkpoint."""
  workdir = resolve(workdir)
  if not (workdir / CHECKPOINTS).is_dir():
    return None
  manager = checkpoint_manager(workdir)
  try:
    step = manager.latest_step()
    return None if step is None else checkpointing.read_meta(manager, step)
  finally:
    manager.close()


# --- Task names as directory names --------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HASHED = re.compile(r"-[0-9a-f]{10}$")
MAX_SLUG = 60


class UnsafePathError(RunDirError, ValueError):
  """A path a command would write or delete lies outside its workdir."""


def task_dir_name(name: str) -> str:
  """The directory name of task `name`: `name` itself when it is a plain, safe file name, else a
  readable slug plus the first 10 hex digits of the SHA-256 of the exact name. Never "", ".",
  ".." and never holds a path separator; distinct names give distinct results (a safe name that
  ends like a hashed one, `-` and 10 hex digits, is hashed too)."""
  ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
  slug = _UNSAFE.sub("_", ascii_name).strip("._-")[:MAX_SLUG].rstrip("._-")
  if slug and slug == name and not _HASHED.search(name):
    return name
  digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
  return f"{slug or 'task'}-{digest}"


def inside(workdir: str | os.PathLike, path: str | os.PathLike) -> epath.Path:
  """`path` with symbolic links resolved; raises `UnsafePathError` unless it lies strictly inside
  `workdir` (also resolved)."""
  root = os.path.realpath(workdir)
  real = os.path.realpath(path)
  if real == root or os.path.commonpath([root, real]) != root:
    raise UnsafePathError(
        f"{os.fspath(path)!r} resolves to {real!r}, which is not inside the workdir {root!r}: "
        "refusing to write or delete it. Fix: keep the workdir's directories as plain "
        "directories inside it (no links out of it).")
  return epath.Path(real)
