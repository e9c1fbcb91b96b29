"""Orbax checkpoints in the workdir: train state plus a JSON record of everything else.

A checkpoint at step s holds `state` (params, optimizer state, step, the task -> adapter map and
class counts) and `meta` (data-iterator position, config, task table, adapter count, DyPa
events). Saves are asynchronous and committed atomically by Orbax; a step directory that fails to
restore is reported with its path and skipped in favour of the previous one, never deleted.
"""
import logging

import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
  pass


def manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      epath.Path(workdir) / "checkpoints",
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True),
      item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_latest(mngr: ocp.CheckpointManager, abstract_state_fn):
  """Restores the newest checkpoint that reads back whole; None if there is none.

  `abstract_state_fn(meta)` returns the state's ShapeDtypeStructs (with shardings) for that
  checkpoint: shapes can depend on the checkpoint (DyPa grows the adapter array).
  Returns (step, state, meta) or None.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  for step in steps:
    path = epath.Path(mngr.directory) / str(step)
    try:
      meta = read_meta(mngr, step)
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state_fn(meta))))
      return step, restored.state, meta
    except Exception as e:  # A damaged checkpoint must not stop the resume from an older one.
      logging.error("Checkpoint %s could not be restored (%s: %s); it is left in place. "
                    "Trying the previous one.", path, type(e).__name__, e)
      if jax.process_index() == 0:
        print(f"WARNING: skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
  if steps:
    raise CheckpointError(
        f"None of the checkpoints in {mngr.directory} (steps {steps}) could be restored; "
        "see the errors above. Move them aside to start from scratch.")
  return None
