"""Memory before allocation: what a config's train state weighs, in all and on each device.

  python -m mtl_jax.dry_run --config=configs/mtl1000.py [--num_devices=8] [--compile]

Nothing is allocated and no data is generated. The shapes come from `jax.eval_shape` of the
trainer's own `init_state`, the sizes the data would fix come from the config (the task count,
class counts, image size and images per product from `data.synthetic`, whose sites are drawn
without making any product, or from `tasks.json` when `data.catalogue_dir` is set; the class
counts less `eval.holdout_classes` size the head blocks; the vocabulary from `data.vocab_size`,
an upper bound of the generated vocabulary, or from `data.tokenizer_dir` / `model.text_init`
when set), and the placement comes from `state.Model.state_shardings`, the same shardings
training uses, on a mesh of `--num_devices` devices (fake CPU devices when more than this
machine has). Each leaf's bytes on one device are its sharding's `shard_shape`; a sharded
dimension that does not divide evenly (which JAX refuses at init) is reported as an error
naming the leaf.

Reported per group (encoder, task heads, adapters, their optimiser states, bookkeeping): the
element count, the bytes of the whole array and the bytes on one device. `--compile` also
lowers and compiles the train step for one global batch of ShapeDtypeStructs and prints XLA's
memory analysis of the per-device program (arguments, outputs, temporaries such as
activations and gradients). It is compiled for CPU, so it is an estimate for accelerators
(their fusion and layouts differ), and compiling a large model on CPU takes minutes.

`--adapter_slots` sizes the adapter array as DyPa would have grown it (1: the initial "no
adapter" slot only).
"""
import dataclasses
import json
import math
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from mtl_jax import catalogue as catalogue_lib
from mtl_jax import cli
from mtl_jax import config_base
from mtl_jax import sharding
from mtl_jax import state as state_lib
from mtl_jax import steps
from mtl_jax import synthetic as synthetic_lib

# Groups of the train state, as (name, path into TrainState).
GROUPS = (
    ("encoder", ("params", "encoder")),
    ("task heads", ("params", "tasks", "heads")),
    ("adapters", ("params", "tasks", "adapters")),
    ("encoder optimizer", ("opt_state",)),
    ("heads optimizer", ("task_opt_state", "heads")),
    ("adapters optimizer", ("task_opt_state", "adapters")),
    ("bookkeeping", None),  # step, adapter_map, num_classes.
)


@dataclasses.dataclass(frozen=True)
class DataSizes:
  """What the data fixes about the model's shapes."""
  num_tasks: int
  image_dim: int
  max_images: int
  vocab_size: int
  num_classes: np.ndarray  # [T] trained class counts; they size the head blocks.
  source: str  # Where these sizes came from, for the printed table.


def data_sizes(config) -> DataSizes:
  """Task count, image sizes and vocabulary without generating or preparing any data."""
  if config.data.catalogue_dir:
    table = catalogue_lib.read_task_table(config.data.catalogue_dir)
    config_base.validate_against_data(config, table)
    num_classes, _ = state_lib.holdout_for(config, table)
    image_dim, max_images = table.image_dim, table.max_images
    source = f"task table of {config.data.catalogue_dir}"
  else:
    synthetic = config.data.synthetic
    num_classes, _ = state_lib.holdout_plan(
        synthetic_lib.task_class_names(synthetic), config.eval.holdout_classes,
        config.eval.holdout_mode)
    image_dim, max_images = synthetic.image_dim, synthetic.max_images
    source = "config.data.synthetic"
  if config.data.tokenizer_dir:
    from mtl_jax import tokenizer as tokenizer_lib  # Local: only this case reads a vocabulary.
    vocab_size = len(tokenizer_lib.load_tokenizer(config.data.tokenizer_dir))
  else:
    vocab_size = config.data.vocab_size  # model.text_init, if set, overrides it in model_spec.
  return DataSizes(num_tasks=len(num_classes), image_dim=image_dim, max_images=max_images,
                   vocab_size=vocab_size, num_classes=num_classes, source=source)


def per_device_shape(name: str, sharding_, shape) -> tuple:
  """A leaf's shape on one device; a clear error where a sharded dimension does not divide."""
  try:
    return tuple(sharding_.shard_shape(shape))
  except ValueError:
    # JAX needs every sharded dimension to divide evenly: training would fail at init.
    mesh_sizes = dict(sharding_.mesh.shape)
    spec = tuple(sharding_.spec) + (None,) * (len(shape) - len(sharding_.spec))
    for dim, (size, axes) in enumerate(zip(shape, spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh_sizes[a] for a in axes)
      if size % ways:
        raise config_base.ConfigError(  # A ValueError, said in one line by `main`.
            f"config.sharding_rules: {name} of shape {tuple(shape)} is split {ways} ways along "
            f"dimension {dim} (mesh axes {axes}), which does not divide {size}. Fix: make that "
            f"size a multiple of {ways} (e.g. --config.data.vocab_size for the word table), or "
            "map its logical axis to None in config.sharding_rules.") from None
    raise


def _leaf_sizes(shape_tree, sharding_tree, prefix: str = "") -> dict:
  shapes = jax.tree_util.tree_leaves_with_path(shape_tree)
  shardings = jax.tree.leaves(sharding_tree)
  assert len(shapes) == len(shardings), (len(shapes), len(shardings))
  count = sum(math.prod(s.shape) for _, s in shapes)
  nbytes = sum(math.prod(s.shape) * s.dtype.itemsize for _, s in shapes)
  per_device = sum(
      math.prod(per_device_shape(prefix + jax.tree_util.keystr(path), sh, s.shape))
      * s.dtype.itemsize for (path, s), sh in zip(shapes, shardings))
  return {"count": int(count), "bytes": int(nbytes), "bytes_per_device": int(per_device)}


def _select(tree, path):
  for key in path:
    tree = getattr(tree, key) if not isinstance(tree, dict) else tree[key]
  return tree


def abstract_batch(model, batch_size: int) -> dict:
  """ShapeDtypeStructs of one global train batch, sharded as training shards it."""
  shapes = jax.eval_shape(lambda: state_lib.dummy_batch(model.spec, batch_size))
  shapes["task_id"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  shapes["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=model.batch_sharding)
          for k, v in shapes.items()}


def summarize(config, devices=None, num_adapter_slots: int = 1, compile_step: bool = False,
              device_memory_gib: float = 16.0) -> dict:
  """Parameter counts and bytes of the config's train state, in all and per device.

  Args:
    config: a run config (`configs/*.py`).
    devices: the devices of the mesh (default: all of this process's backend).
    num_adapter_slots: the adapter array's rows (1: no task has an adapter yet).
    compile_step: also compile the train step for one batch and report its memory analysis.

  Returns:
    {"mesh", "num_devices", "data", "spec", "groups": [{"name", "count", "bytes",
     "bytes_per_device"}], "params", "state", "batch", "compiled" (or None)}.
  """
  devices = jax.devices() if devices is None else devices
  config_base.validate_config(config, len(devices))
  sizes = data_sizes(config)
  table_shape = types.SimpleNamespace(image_dim=sizes.image_dim, max_images=sizes.max_images)
  spec = state_lib.model_spec(config, table_shape, sizes.vocab_size)
  mesh = sharding.make_mesh(config.mesh, devices)
  model = state_lib.Model(config, spec, sizes.num_classes, mesh)
  shapes = jax.eval_shape(lambda: model.init_state(jax.random.key(0), num_adapter_slots))
  shardings = model.state_shardings()

  groups = []
  for name, path in GROUPS:
    if path is None:
      part = lambda t: (t.step, t.adapter_map, t.num_classes)
      groups.append({"name": name, **_leaf_sizes(part(shapes), part(shardings))})
    else:
      groups.append({"name": name, **_leaf_sizes(
          _select(shapes, path), _select(shardings, path), "state." + ".".join(path))})
  batch = abstract_batch(model, config.batch_size)
  summary = {
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "num_devices": len(devices),
      "data": {"num_tasks": sizes.num_tasks, "image_dim": sizes.image_dim,
               "max_images": sizes.max_images, "vocab_size": spec.vocab_size,
               "source": sizes.source},
      "spec": dataclasses.asdict(spec),
      "num_adapter_slots": num_adapter_slots,
      "groups": groups,
      "params": _leaf_sizes(shapes.params, shardings.params),
      "state": _leaf_sizes(shapes, shardings),
      "batch": _leaf_sizes(batch, jax.tree.map(lambda s: s.sharding, batch)),
      "batch_size": config.batch_size,
      "heads_split_over": shardings.params["tasks"]["heads"]["kernel"].spec[0],
      "compiled": None,
  }
  if compile_step:
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    start = time.perf_counter()
    compiled = steps.jitted_train_step(model, num_adapter_slots).lower(abstract_state, batch).compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    summary["compiled"] = {
        "platform": devices[0].platform, "compile_seconds": seconds,
        **({k: int(getattr(analysis, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")} if analysis else {})}
  needed = summary["state"]["bytes_per_device"] + summary["batch"]["bytes_per_device"]
  temp = (summary["compiled"] or {}).get("temp_size_in_bytes")
  summary["fit"] = {"device_bytes": int(device_memory_gib * 2**30),
                    "needed_bytes": needed + (temp or 0), "includes_temporaries": temp is not None,
                    "fits": needed + (temp or 0) <= device_memory_gib * 2**30}
  return summary


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024


def format_table(summary: dict) -> str:
  mesh = " x ".join(f"{k}={v}" for k, v in summary["mesh"].items())
  data = summary["data"]
  lines = [
      f"mesh {mesh} ({summary['num_devices']} devices); {data['num_tasks']} tasks, vocabulary "
      f"{data['vocab_size']}, images {data['max_images']} x {data['image_dim']} (from "
      f"{data['source']}); {summary['num_adapter_slots']} adapter slot(s)",
      f"{'group':<20} {'elements':>15} {'bytes':>12} {'per device':>12}",
  ]
  rows = summary["groups"] + [{"name": "parameters", **summary["params"]},
                              {"name": "train state", **summary["state"]},
                              {"name": f"batch of {summary['batch_size']}", **summary["batch"]}]
  for i, row in enumerate(rows):
    if i == len(summary["groups"]):
      lines.append("-" * 62)
    lines.append(f"{row['name']:<20} {row['count']:>15,} {_human(row['bytes']):>12} "
                 f"{_human(row['bytes_per_device']):>12}")
  heads = summary["heads_split_over"]
  lines.append("task heads and their optimizer state: "
               + (f"split by block row over '{heads}'" if heads else "whole on every device"))
  compiled = summary["compiled"]
  if compiled:
    lines.append(f"compiled train step ({compiled['platform']}, "
                 f"{compiled['compile_seconds']:.1f} s to compile), per device:")
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes"):
      if key in compiled:
        lines.append(f"  {key.replace('_in_bytes', ''):<28} {_human(compiled[key]):>12}")
  fit = summary["fit"]
  what = ("train state, batch and the compiled step's temporaries" if fit["includes_temporaries"]
          else "train state and batch; activations not included (--compile adds them)")
  share = fit["needed_bytes"] / fit["device_bytes"]
  lines.append(
      f"{'FITS' if fit['fits'] else 'DOES NOT FIT'} a {_human(fit['device_bytes'])} device: "
      f"{_human(fit['needed_bytes'])} per device ({share:.0%}) for the {what}"
      + ("" if fit["fits"] else "; use more devices, split more axes in config.sharding_rules "
         "(e.g. embed over data), or a smaller batch"))
  return "\n".join(lines)


config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).", lock_config=True)
MAX_DEVICES = 16384  # More than the largest accelerator slices; each is a fake CPU device here.
flags.DEFINE_integer("num_devices", 0, "Devices of the mesh; more than this machine has are "
                     "simulated with CPU devices (0: this machine's devices; at most "
                     f"{MAX_DEVICES}, which covers the largest accelerator slices).")
flags.DEFINE_integer("adapter_slots", 1, "Rows of the adapter array (1: none allocated yet; "
                     "slot 0 is the 'no adapter' identity, so at least 1).")
flags.DEFINE_bool("compile", False, "Also compile the train step and print its memory analysis.")
flags.DEFINE_string("json", "", "Also write the summary to this JSON file.")
flags.DEFINE_float("device_memory_gib", 16.0, "Memory of one device in GiB (> 0), for the fit "
                   "check.")
FLAGS = flags.FLAGS


class FlagError(ValueError):
  """A bad flag value; the message names the flag and the fix."""


def check_flags(num_devices: int, adapter_slots: int, device_memory_gib: float,
                json_path: str) -> None:
  """Refuses bad flag values before any backend starts or any work is done."""
  def bad(flag, value, problem, fix):
    raise FlagError(f"--{flag}={value}: {problem}. Fix: {fix}.")
  if num_devices < 0:
    bad("num_devices", num_devices, "a device count cannot be negative",
        f"give 0 for this machine's devices, or a count from 1 to {MAX_DEVICES}")
  if num_devices > MAX_DEVICES:
    bad("num_devices", num_devices, f"more than {MAX_DEVICES} devices (each would be a fake CPU "
        "device, which takes minutes to create)", f"give a count from 1 to {MAX_DEVICES}")
  if adapter_slots < 1:
    bad("adapter_slots", adapter_slots, "the adapter array needs at least one row, slot 0 "
        "(the 'no adapter' identity)", "give 1 (no adapter allocated yet) or more")
  if not device_memory_gib > 0:  # Also refuses NaN.
    bad("device_memory_gib", device_memory_gib, "a device's memory must be positive",
        "give the memory of one device in GiB, e.g. 16 or 80")
  parent = os.path.dirname(os.path.abspath(json_path))
  if json_path and os.path.isdir(json_path):
    bad("json", json_path, "is a directory",
        f"give a file path, e.g. {os.path.join(json_path, 'dry_run.json')}")
  if json_path and not os.path.isdir(parent):
    bad("json", json_path, f"its directory {parent} does not exist",
        "create it first, or give a path in an existing directory")


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    check_flags(FLAGS.num_devices, FLAGS.adapter_slots, FLAGS.device_memory_gib, FLAGS.json)
    if FLAGS.num_devices:
      # Before any backend starts: CPU devices stand in for the accelerators being planned for.
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", FLAGS.num_devices)
    devices = jax.devices()
    if FLAGS.num_devices and len(devices) != FLAGS.num_devices:
      raise FlagError(
          f"--num_devices={FLAGS.num_devices}: JAX started with {len(devices)} devices, as "
          "XLA_FLAGS' --xla_force_host_platform_device_count says. Fix: unset that XLA flag "
          "(or set it to the same count).")
    summary = summarize(FLAGS.config, devices, FLAGS.adapter_slots, FLAGS.compile,
                        FLAGS.device_memory_gib)
    print(format_table(summary))
    if FLAGS.json:
      try:
        with open(FLAGS.json, "w") as f:
          json.dump(summary, f, indent=1)
      except OSError as e:
        raise FlagError(f"--json={FLAGS.json}: cannot write it ({e.strerror}). Fix: give a "
                        "writable file path.") from None
  except (FlagError, *cli.user_errors()) as e:
    sys.exit(cli.report(e))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=lambda argv: cli.parse_flags(FLAGS, argv))
