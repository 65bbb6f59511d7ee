"""The one home for meshes and sharding rules.

Every parameter carries logical axis names in its `out_sharding` metadata
(for example ("embed", "mlp")). RULES maps each logical name to mesh axes;
`spec_for` turns names into a PartitionSpec for a concrete shape, leaving a
dimension replicated when the mesh axes do not divide it (tiny test models
on 8 devices, odd vocabularies). Parameters are created directly with their
sharding: `init_sharded` jits the constructor with out_shardings, and the
checkpoint readers place each array with `place`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rcfd_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes. Parameters are sharded FSDP-style over
# "fsdp" on their embedding dimension and Megatron-style over "tensor" on
# heads / MLP / vocabulary. Activations split their batch over data and fsdp.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "lora": ("fsdp",),  # lora_b [rank, out]: the rank dim is the one left for FSDP
    "positions": (),
    "labels": (),
    "norm": (),
    "buckets": (),
    "layers": (),  # the stacked decoder layers' axis; scanned over, so never split
}


def make_mesh(shape: Sequence[int] | None = None, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; shape None puts every device on fsdp.

  A -1 entry takes whatever devices the others leave.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if shape is None:
    shape = (1, n, 1)
  shape = list(shape)
  if len(shape) != 3:
    raise UserError(f"mesh shape {tuple(shape)} must have 3 entries (data, fsdp, tensor)")
  if shape.count(-1) > 1:
    raise UserError(f"mesh shape {tuple(shape)} may have at most one -1")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if rest <= 0 or n % rest:
      raise UserError(f"mesh shape {tuple(shape)} does not divide the {n} devices; set config.mesh.shape")
    shape[shape.index(-1)] = n // rest
  if math.prod(shape) != n or min(shape) < 1:
    raise UserError(
        f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {n} are visible; "
        "set config.mesh.shape so its product equals the device count")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def spec_for(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> P:
  """PartitionSpec for logical `names` on an array of `shape`.

  A mesh axis is used at most once per array and only where it divides the
  dimension; otherwise that dimension stays replicated on it.
  """
  if not names:
    return P()
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match shape {tuple(shape)}")
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    axes = []
    size = 1
    for axis in RULES.get(name, ()) if name else ():
      n = mesh.shape[axis]
      if axis in used or n == 1 or dim % (size * n):
        continue
      axes.append(axis)
      size *= n
    used.update(axes)
    out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """x laid out by logical `names` on the mesh being compiled for (the abstract mesh that
  rcfd_jax.programs traces under); unchanged where there is none (a plain jit, one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh))


def variable_names(v: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names a variable was annotated with, or None."""
  return v.get_metadata().get("out_sharding")


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedSharding for each leaf of an nnx.State (abstract or concrete).

  Leaves without logical names (scalars, RNG counters) are replicated.
  """

  def one(v):
    if isinstance(v, nnx.Variable):
      value = v.get_value()
      return v.replace(NamedSharding(mesh, spec_for(variable_names(v), value.shape, mesh)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding for a [batch, ...] activation: batch over (data, fsdp)."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def rows_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a [rows, ...] array the trainer feeds or returns: rows over (data, fsdp) where they
  divide, replicated where they do not (spec_for's rule for the "batch" name)."""
  return NamedSharding(mesh, spec_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def put_rows(local: np.ndarray, n: int, mesh: Mesh) -> jax.Array:
  """The global [n, ...] array on rows_sharding whose rows this process holds are `local`.

  Which rows those are is the caller's choice of feeding order (each trainer
  reads only its own rows of the global batch).
  """
  local = np.asarray(local)
  shape = (n,) + local.shape[1:]
  return jax.make_array_from_process_local_data(rows_sharding(mesh, shape), local, shape)


def is_abstract(tree: Any) -> bool:
  """Whether a pytree holds jax.ShapeDtypeStruct leaves: a model or state built without weights."""
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def abstract(tree: Any, shardings: Any) -> Any:
  """The tree's leaves as ShapeDtypeStructs carrying `shardings` (a matching tree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def run_placed(fn: Callable, out_shardings: Any, *args) -> Any:
  """fn(*args) with its outputs born on `out_shardings`, never whole on one device.

  With abstract arguments (ShapeDtypeStruct leaves, see is_abstract) nothing
  runs: the result is fn's output shapes carrying out_shardings. So the same
  construction code builds a trainer for real devices and, without weights,
  for a TPU topology that is only compiled for (rcfd_jax.aot).
  """
  if is_abstract(args):
    return abstract(jax.eval_shape(fn, *args), out_shardings)
  return jax.jit(fn, out_shardings=out_shardings)(*args)


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds whole, as a global array on `sharding`."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def abstract_module(make: Callable[[], nnx.Module]) -> nnx.Module:
  """The module's structure with ShapeDtypeStruct leaves; nothing allocated."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(make)


def init_sharded(make: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
  """Builds a module whose parameters are born sharded on `mesh`.

  The constructor runs inside jit with out_shardings, so no parameter is
  ever materialised whole on one device.
  """
  abstract = abstract_module(make)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh)

  def build():
    with nnx.use_eager_sharding(False):
      return nnx.state(make())

  state = jax.jit(build, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def place(array: np.ndarray | Callable[[tuple], np.ndarray], shape, dtype, names, mesh: Mesh) -> jax.Array:
  """Puts a host array (or a slice reader) on `mesh` with its logical sharding.

  `array` may be a callable taking an index tuple, so each device reads only
  its own slice of a checkpoint (safetensors get_slice).
  """
  sharding = NamedSharding(mesh, spec_for(names, shape, mesh))
  if callable(array):
    read = lambda idx: np.asarray(array(idx), dtype=dtype)
  else:
    host = np.asarray(array)
    read = lambda idx: np.asarray(host[idx], dtype=dtype)
  return jax.make_array_from_callback(tuple(shape), sharding, read)


def mesh_from_config(c) -> Mesh:
  """The mesh of config.mesh: its shape over all devices, or over the first c.devices."""
  devices = jax.devices()
  if c.devices:
    if c.devices > len(devices):
      raise UserError(f"config.mesh.devices={c.devices} but only {len(devices)} devices are visible")
    devices = devices[:c.devices]
  return make_mesh(tuple(c.shape), devices)
