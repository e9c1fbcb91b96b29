"""The device mesh and the rules that place parameters and batches on it.

The model names every parameter axis logically (`embed`, `mlp`, `heads`, `task`, ...); the config's
`sharding_rules` map logical names to mesh axes (`data`, `model`). Data parallelism shards `batch`
over `data`; tensor parallelism maps `mlp`/`heads`/`vocab` to `model`; the stacked task heads can
be split over devices by mapping `task` (and `adapter`) to a mesh axis.
"""
import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "model")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int]:
  """Resolves -1 entries and checks the mesh fits the devices, naming the field to fix."""
  shape = [mesh_cfg.data, mesh_cfg.model]
  fixed = int(np.prod([s for s in shape if s != -1]))
  if shape.count(-1) > 1:
    raise ValueError("config.mesh: at most one of mesh.data, mesh.model may be -1. Fix: give "
                     "the other a size.")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got data={shape[0]}, "
                     f"model={shape[1]}. Fix: use positive sizes, or -1 for the rest.")
  if num_devices % fixed:
    raise ValueError(
        f"config.mesh: data={shape[0]} x model={shape[1]} does not fit {num_devices} devices. "
        f"Fix: set --config.mesh.data=-1 to use all of them, or sizes whose product divides "
        f"{num_devices}.")
  shape = [num_devices // fixed if s == -1 else s for s in shape]
  if int(np.prod(shape)) != num_devices:
    raise ValueError(
        f"config.mesh: data={shape[0]} x model={shape[1]} = {int(np.prod(shape))} devices, but "
        f"{num_devices} are available. Fix: set --config.mesh.data=-1 to use all of them.")
  return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: shardings are placement hints that XLA propagates (classic GSPMD/pjit mode).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


AUTO = "auto"


def resolve_rules(rules, mesh: Mesh, num_rows: int, head_params: int, encoder_params: int):
  """The rules with `("task", "auto")` decided for this model and mesh.

  The stacked head blocks (and their two AdamW moments) are split by block row over `data` when
  that pays and is possible: the heads hold at least a tenth as many parameters as the encoder
  (below that, the memory saved is small next to the rows gathered across devices each step),
  `data` has more than one device and the row count (`num_rows`, a multiple of
  `task_layers.ROW_MULTIPLE`) divides by it (JAX refuses uneven splits). Otherwise each device
  holds them whole.
  """
  resolved = []
  for name, axis in rules:
    if axis == AUTO:
      if name != "task":
        raise ValueError(f"config.sharding_rules: {name!r} -> 'auto'; only 'task' may be 'auto'.")
      data = mesh.shape["data"]
      pays = 10 * head_params >= encoder_params and data > 1 and num_rows % data == 0
      axis = "data" if pays else None
    resolved.append((name, axis))
  return tuple(resolved)


def logical_to_sharding(logical_specs, mesh: Mesh, rules) -> object:
  """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, [tuple(r) for r in rules])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Every batch array is split over `data` along its leading (example) axis."""
  return NamedSharding(mesh, P("data"))
