"""Multi-process start-up on JAX's own runtime (jax.distributed).

Single-process runs (the default) only apply config.distributed.num_cpu_devices.
Several processes join one global mesh when

  - config.distributed.coordinator_address (or $JAX_COORDINATOR_ADDRESS)
    names process 0's host:port; num_processes and process_id come from the
    config, or from $JAX_NUM_PROCESSES / $JAX_PROCESS_ID, or are detected;
  - or, with config.distributed.autodetect, JAX's cluster detection finds a
    SLURM job step (srun), an Open MPI job or a multi-host Cloud TPU slice,
    and jax.distributed.initialize() fills in every argument itself.

Everything here must run before the first JAX computation: both
jax.distributed.initialize and the forced number of CPU devices are refused
once XLA's backends exist. train.run calls `initialize` first.

After start-up every process runs the same program (multi-controller SPMD):
one jax.sharding.Mesh over jax.devices() of all processes, each process
feeding only the rows of a batch that its own devices hold (`process_rows`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent in jax 0.10

from rcfd_jax.errors import UserError

# Environment variables that JAX's cluster detection reads (jax/_src/clusters):
# a SLURM job step started by srun, an Open MPI launch, a multi-host TPU slice.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI_VAR = "OMPI_MCA_orte_hnp_uri"
_TPU_VARS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def cluster_detected() -> str | None:
  """The kind of cluster whose environment JAX can read its arguments from, if any.

  Cloud TPU VMs started through launch/tpu_vm.sh set RCFD_TPU_SLICE=1: JAX then
  asks the VM's metadata server for the workers (jax/_src/clusters/cloud_tpu_cluster.py).
  """
  if all(v in os.environ for v in _SLURM_VARS):
    return "slurm"
  if _OMPI_VAR in os.environ:
    return "ompi"
  if os.environ.get("RCFD_TPU_SLICE") == "1" or any(v in os.environ for v in _TPU_VARS):
    return "tpu"
  return None


def _env_int(name: str, value: int, unset: int) -> int | None:
  """value unless it is the config's 'unset' marker; then $name; else None."""
  if value != unset:
    return value
  return int(os.environ[name]) if os.environ.get(name) else None


def initialize(c) -> None:
  """Forces CPU devices and joins the multi-process runtime, per config.distributed.

  Idempotent; call before any JAX computation (train.run does so first).

  Raises:
    UserError: JAX was already in use, or the arguments are incomplete.
  """
  if jax.distributed.is_initialized():
    return
  if xla_bridge.backends_are_initialized():
    if c.num_cpu_devices > 0 or c.coordinator_address:
      raise UserError("config.distributed needs to act before JAX starts its backends, but something "
                      "already ran a JAX computation in this process; call train.run in a fresh process")
    return
  if c.num_cpu_devices > 0:
    # Overrides --xla_force_host_platform_device_count; only CPU backends read it.
    jax.config.update("jax_num_cpu_devices", c.num_cpu_devices)
  address = c.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  timeouts = dict(initialization_timeout=c.initialization_timeout_s,
                  heartbeat_timeout_seconds=c.heartbeat_timeout_s,
                  shutdown_timeout_seconds=c.shutdown_timeout_s)
  if address:
    kind = "coordinator " + address
    num = _env_int("JAX_NUM_PROCESSES", c.num_processes, 0)
    pid = _env_int("JAX_PROCESS_ID", c.process_id, -1)
    if (num is None) != (pid is None) and cluster_detected() is None:
      raise UserError("config.distributed.coordinator_address is set; also set both "
                      "config.distributed.num_processes and config.distributed.process_id")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid, **timeouts)
  elif c.autodetect and (kind := cluster_detected()):
    jax.distributed.initialize(**timeouts)
  else:
    return
  logging.info("distributed (%s): process %d of %d, %d local and %d global devices", kind,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def shutdown() -> None:
  """Leaves the runtime together with the other processes (no-op when single-process).

  Waits up to config.distributed.shutdown_timeout_s for the others, so process
  0, which hosts the coordinator, does not vanish while they still use it.
  """
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def is_main() -> bool:
  """Whether this process writes logs, metrics, evaluations and caches."""
  return jax.process_index() == 0


def process_rows(sharding: jax.sharding.Sharding, num_rows: int) -> slice:
  """The rows of a [num_rows, ...] array that this process's devices hold.

  They are the rows this process must feed to
  jax.make_array_from_process_local_data. With the batch split over
  (data, fsdp) they are a contiguous block whose position follows the mesh's
  device order, not necessarily process_index; where the batch is replicated
  over processes (a tensor axis spanning hosts) they are every row.
  """
  indices = sharding.addressable_devices_indices_map((num_rows,))
  starts, stops = [], []
  for idx in indices.values():
    s = idx[0]
    start, stop, _ = s.indices(num_rows)
    starts.append(start)
    stops.append(stop)
  start, stop = min(starts), max(stops)
  covered = np.zeros(num_rows, bool)
  for a, b in zip(starts, stops):
    covered[a:b] = True
  if not covered[start:stop].all():
    raise UserError(f"this process's devices hold non-contiguous rows of the batch; order the mesh "
                    f"so each process's devices are neighbours on the (data, fsdp) axes "
                    f"(config.mesh.shape={_mesh_shape(sharding)})")
  return slice(start, stop)


def _mesh_shape(sharding) -> tuple:
  mesh = getattr(sharding, "mesh", None)
  return tuple(mesh.shape.values()) if mesh is not None else ()


def to_host(x) -> np.ndarray:
  """A global array (or tree) whole on the host of every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(x))
