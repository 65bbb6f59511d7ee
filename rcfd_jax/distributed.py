"""Multi-process start-up on JAX's own runtime (jax.distributed).

Single-process runs (the default) do nothing here. Several processes join one
global mesh when config.distributed names a coordinator, or when JAX can
autodetect the cluster (TPU VM pods, SLURM).
"""

from __future__ import annotations

import os

import jax
from absl import logging

_STARTED = False


def _cluster_detected() -> bool:
  return any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(c) -> None:
  """Calls jax.distributed.initialize once, from config or autodetection."""
  global _STARTED
  if _STARTED:
    return
  if c.coordinator_address:
    jax.distributed.initialize(
        coordinator_address=c.coordinator_address,
        num_processes=c.num_processes or None,
        process_id=c.process_id if c.process_id >= 0 else None)
  elif _cluster_detected() and os.environ.get("RCFD_SINGLE_PROCESS") != "1":
    jax.distributed.initialize()
  else:
    return
  _STARTED = True
  logging.info("process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
               jax.device_count())
