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
    raise ValueError("config.mesh: at most one of mesh.data, mesh.model may be -1.")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got data={shape[0]}, "
                     f"model={shape[1]}.")
  if num_devices % fixed:
    raise ValueError(
        f"config.mesh: data={shape[0]} x model={shape[1]} does not fit {num_devices} devices; "
        f"set --config.mesh.data=-1 to use all of them, or sizes whose product divides "
        f"{num_devices}.")
  shape = [num_devices // fixed if s == -1 else s for s in shape]
  if int(np.prod(shape)) != num_devices:
    raise ValueError(
        f"config.mesh: data={shape[0]} x model={shape[1]} = {int(np.prod(shape))} devices, but "
        f"{num_devices} are available; set --config.mesh.data=-1 to use all of them.")
  return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: shardings are placement hints that XLA propagates (classic GSPMD/pjit mode).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def logical_to_sharding(logical_specs, mesh: Mesh, rules) -> object:
  """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, [tuple(r) for r in rules])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Every batch array is split over `data` along its leading (example) axis."""
  return NamedSharding(mesh, P("data"))
