"""Bytes per device of parameters, optimizer state and a compiled step's temporaries.

Two sources, both cheap and neither allocating anything:
  - `tree_bytes`: the bytes one device holds of a pytree of jax.Arrays or
    jax.ShapeDtypeStructs with shardings (each leaf's shard shape times its
    itemsize), so 7B-parameter trees can be measured as abstract values;
  - `compiled_stats`: XLA's own buffer assignment for a jitted function,
    jax.jit(f).lower(*args).compile().memory_analysis(), which is per device
    for SPMD programs. Lowering accepts ShapeDtypeStructs, so a 7B step can
    be analysed without its weights.

rcfd_jax.programs adds up, per program, what a device holds while it runs
(train.run checks it at start-up, rcfd_jax.aot for TPU topologies);
benchmarks/memory.py uses the same functions for the scaling table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np

GiB = 1024**3
MiB = 1024**2


def _leaf_bytes(x: Any) -> int:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    return 0
  dtype = np.dtype(x.dtype) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(np.uint32)
  sharding = getattr(x, "sharding", None)
  shape = sharding.shard_shape(tuple(x.shape)) if sharding is not None else tuple(x.shape)
  return math.prod(shape) * dtype.itemsize


def tree_bytes(tree: Any) -> int:
  """Bytes of `tree` on one device (the largest shard of each leaf; shards are even)."""
  return int(sum(_leaf_bytes(x) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class CompiledStats:
  """XLA's buffer assignment of one compiled program, per device, in bytes."""
  arguments: int
  outputs: int
  aliased: int     # outputs written into donated arguments
  temporaries: int
  code: int

  @property
  def peak_estimate(self) -> int:
    """Arguments + outputs not aliased into arguments + temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries


def compiled_stats(jitted: Callable, *args) -> CompiledStats | None:
  """Memory analysis of jitted(*args); args may be arrays or ShapeDtypeStructs.

  Returns None where the backend gives no analysis.
  """
  m = jitted.lower(*args).compile().memory_analysis()
  if m is None:
    return None
  return CompiledStats(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                       m.temp_size_in_bytes, m.generated_code_size_in_bytes)


def fmt(n: float) -> str:
  """Bytes as a short human string."""
  return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"
