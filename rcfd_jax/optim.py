"""The optimizer the trainers share, and where its state lives on the mesh.

The RL stage (rcfd_jax.train) and the supervised stages (rcfd_jax.supervised)
both train with AdamW after optional global-norm clipping; they differ in the
learning rate (constant, or warmup + cosine) and in which weights decay.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from rcfd_jax import sharding


def adamw(learning_rate: float | optax.Schedule, max_grad_norm: float, weight_decay: float,
          b1: float = 0.9, b2: float = 0.999, mask: Callable | None = None) -> optax.GradientTransformation:
  """AdamW, after global-norm clipping at max_grad_norm (0 disables the clipping)."""
  parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask))
  return optax.chain(*parts)


def shardings(tx: optax.GradientTransformation, params: Any, mesh: Mesh) -> tuple[Any, Any]:
  """(parameter shardings, optimizer-state shardings) of `params` (concrete or abstract).

  Each moment of the optimizer state is laid out as its parameter is; the
  other leaves (step counts) are replicated. A train state built under
  these shardings (sharding.run_placed) is never whole on one device.
  """
  rep = sharding.replicated(mesh)
  param_sh = sharding.state_shardings(params, mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, params), param_sh,
                                 transform_non_params=lambda _: rep)
  return param_sh, opt_sh
