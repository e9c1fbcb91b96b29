"""Orbax checkpoints in the workdir: train state plus a JSON record of everything else.

A checkpoint at step s holds `state` (params, optimizer state, step, the task -> adapter map and
class counts) and `meta` (data-iterator position, config, task table, adapter count, DyPa
events, the best-checkpoint and early-stopping record of early_stopping.py, and a fingerprint of
every state array). Saves are asynchronous and committed
atomically by Orbax: a save cut short leaves only a `<step>.orbax-checkpoint-tmp*` directory,
which listing ignores and the next save of that step replaces.

Damage is caught on restore. Orbax reports truncated or missing files, but a flipped byte in an
array file can decode into wrong numbers without any error, so every save records per-array
integer fingerprints and every restore recomputes and compares them. A step that fails either
way is reported with its path and skipped for the previous one. When an older step restores, the
damaged newer ones are moved (never deleted) to `checkpoints/corrupt/<step>-<time>`, so that the
resumed run can save those step numbers again; when none restores, nothing is moved and the run
stops with the list of paths.
"""
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

FINGERPRINT_KEY = "state_fingerprint"
CORRUPT_DIR = "corrupt"  # Under the checkpoint directory; not a step name, so Orbax skips it.
_MAX_ERROR_CHARS = 400  # TensorStore errors embed a whole spec; the head says what went wrong.


class CheckpointError(RuntimeError):
  pass


# --- Fingerprints ------------------------------------------------------------------------------

def _as_uint32(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 (narrower types widened; 64-bit ones split in two)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize
  if width == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # Adds a trailing axis of 2.
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """[2] uint32: the sum of the array's bit patterns and a position-weighted sum.

  Integer sums wrap modulo 2**32 and are exact in any order, so the result does not depend on
  how the array is sharded or reduced. The position weights make moved values count too. Each
  term is elementwise, so a sharded array is never gathered onto one device.
  """
  bits = _as_uint32(x)
  shape = bits.shape
  position = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride = (stride * shape[axis]) % (1 << 32)
  weight = position * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


_FINGERPRINT_FNS = {}  # Output sharding -> jitted fingerprint function.


def _fingerprint_fn(state):
  """The jitted fingerprint of a state; its outputs are replicated on the state's mesh, so that
  every process of a multi-host run can read them."""
  out_sharding = None
  for leaf in jax.tree.leaves(state):
    if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):
      out_sharding = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
      break
  if out_sharding not in _FINGERPRINT_FNS:
    fingerprints = lambda tree: jax.tree.map(_leaf_fingerprint, tree)
    _FINGERPRINT_FNS[out_sharding] = (jax.jit(fingerprints) if out_sharding is None else
                                      jax.jit(fingerprints, out_shardings=out_sharding))
  return _FINGERPRINT_FNS[out_sharding]


def state_fingerprint(state) -> dict[str, list[int]]:
  """{leaf path: [sum, weighted sum]} (uint32 values) of every array of `state`, for the
  checkpoint's meta."""
  sums = jax.device_get(_fingerprint_fn(state)(state))
  # Plain paths ("params/encoder/..."), the same whether the tree is a TrainState or a dict.
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          [int(v) for v in np.asarray(value)]
          for path, value in jax.tree_util.tree_leaves_with_path(sums)}


def _check_fingerprint(state, meta: dict, path: epath.Path) -> None:
  """Compares the restored arrays (all of a state, or the part a partial restore read) with the
  fingerprints saved with them."""
  saved = meta.get(FINGERPRINT_KEY)
  if saved is None:  # Written before fingerprints existed: nothing to compare.
    return
  restored = state_fingerprint(state)
  missing = sorted(restored.keys() - saved.keys())
  differ = sorted(k for k in restored.keys() & saved.keys() if saved[k] != restored[k])
  if missing or differ:
    bad = differ + missing
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise CheckpointError(f"{path}: the bytes of {len(bad)} state arrays differ from when they "
                          f"were saved ({shown}): the files were damaged after the save.")


# --- Save and restore --------------------------------------------------------------------------

def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False,
         metrics: dict | None = None) -> bool:
  """Saves `state` and `meta` at `step`; `metrics` (Orbax's, for a manager that keeps the best
  checkpoint) rank this step against the others."""
  meta = {**meta, FINGERPRINT_KEY: state_fingerprint(state)}
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force,
      metrics=metrics)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore(mngr: ocp.CheckpointManager, step: int, target, meta: dict | None = None,
            partial: bool = False):
  """The arrays of checkpoint `step`, checked against their saved fingerprints.

  Every restore goes through here, whatever the command, so that a damaged file is never read
  as valid numbers. `target` holds ShapeDtypeStructs (with shardings) of the whole state or,
  with `partial`, of a subset of its top-level fields (a dict: e.g. params for inference).

  Raises:
    CheckpointError: the files do not read back, or their bytes differ from when saved.
  """
  path = epath.Path(mngr.directory) / str(step)
  meta = read_meta(mngr, step) if meta is None else meta
  try:
    if partial:
      args = ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)
    else:
      args = ocp.args.StandardRestore(target)
    state = mngr.restore(step, args=ocp.args.Composite(state=args)).state
  except Exception as e:  # Orbax/TensorStore errors on truncated or missing files.
    raise CheckpointError(f"{path} does not read back: {_short(e)}") from e
  _check_fingerprint(state, meta, path)
  return state


def _short(error: Exception) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."


def _move_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves damaged step directories to `corrupt/<step>-<time>` and re-lists the steps."""
  directory = epath.Path(mngr.directory)
  if jax.process_index() == 0:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step in steps:
      source = directory / str(step)
      target = directory / CORRUPT_DIR / f"{step}-{stamp}"
      suffix = 1
      while target.exists():
        target = directory / CORRUPT_DIR / f"{step}-{stamp}-{suffix}"
        suffix += 1
      try:
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
      except OSError as e:  # Left in place, the next save of this step would fail anyway.
        raise CheckpointError(
            f"Checkpoint {source} is damaged (see the warning above) and could not be moved to "
            f"{target} ({e}). Move or remove it by hand, then run the same command again.") from e
      print(f"WARNING: moved unreadable checkpoint {source} to {target} (kept, not deleted) so "
            f"that step {step} can be saved again.", flush=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mtl_jax.checkpointing.move_aside")
  mngr.reload()


def _report_unreadable(path, error) -> None:
  logging.error("Checkpoint %s could not be restored: %s", path, error)
  if jax.process_index() == 0:
    print(f"WARNING: skipping unreadable checkpoint {path}: {_short(error)}", flush=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state_fn, check_meta=None):
  """Restores the newest checkpoint that reads back whole; None if there is none.

  `abstract_state_fn(meta)` returns the state's ShapeDtypeStructs (with shardings) for that
  checkpoint: shapes can depend on the checkpoint (DyPa grows the adapter array). A step that
  fails to restore, or whose arrays do not match the fingerprints saved with them, is reported
  (with its path) and the previous step is tried; see the module docstring for what happens to it.
  `check_meta(meta, path)` runs before any array is read and its errors pass through: a
  checkpoint of another run is refused, never mistaken for a damaged one and moved aside.

  Returns:
    (step, state, meta) or None.

  Raises:
    CheckpointError: there are checkpoints but none of them restores.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  unreadable = []
  for step in steps:
    path = epath.Path(mngr.directory) / str(step)
    try:
      meta = read_meta(mngr, step)
    except Exception as e:  # A damaged checkpoint must not stop the resume from an older one.
      _report_unreadable(path, e)
      unreadable.append(step)
      continue
    if check_meta is not None:
      check_meta(meta, path)
    try:
      state = restore(mngr, step, abstract_state_fn(meta), meta)
    except Exception as e:
      _report_unreadable(path, e)
      unreadable.append(step)
      continue
    if unreadable:
      _move_aside(mngr, unreadable)
    return step, state, meta
  if steps:
    paths = ", ".join(str(epath.Path(mngr.directory) / str(s)) for s in steps)
    raise CheckpointError(
        f"None of the checkpoints in {mngr.directory} could be restored ({paths}); see the "
        "warnings above. If the config changed, use a new --workdir; otherwise move the damaged "
        f"step directories aside (e.g. into {epath.Path(mngr.directory) / CORRUPT_DIR}) to "
        "start from scratch.")
  return None
