"""LoRA adapters for any family, on the Dense layers named by attribute.

    lora.apply(model, rank=8, alpha=16, targets=("q_proj", "v_proj"), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)      # trains adapters only
    graphdef, state = nnx.split(model)
    ref_logits = nnx.merge(graphdef, lora.without_adapters(state))(ids)   # frozen base

The adapter lives on layers.Dense as lora_a [in, rank] and lora_b [rank, out]
(nnx.LoRAParam, a subclass of nnx.Param) and adds (x @ a @ b) * alpha / rank.
On the decoder layers, whose kernels are stacked [L, in, out] (layers.stacked),
the adapters are stacked too, [L, in, rank] and [L, rank, out], each layer
drawn independently, so the layer scan slices them with the kernels.
lora_b starts at zero, so a freshly adapted model computes the base model
exactly; zeroing the adapters in the state is how the reference policy is
evaluated without a second copy of the weights.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from rcfd_jax import sharding
from rcfd_jax.errors import UserError
from rcfd_jax.models import layers as L


def _denses(model: nnx.Module) -> Iterator[tuple[tuple, L.Dense]]:
  """(path, Dense) for every Dense reachable from `model`."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, L.Dense):
      yield path, node


def _mesh_of(x: Any):
  """The mesh a parameter lives on, or None when it is not NamedSharded."""
  s = getattr(x, "sharding", None)
  return s.mesh if isinstance(s, NamedSharding) else None


def _born(make, names, shape, mesh, like) -> jax.Array:
  """Runs `make()` with its output placed directly on its sharding, never whole on one device.

  Beside an abstract kernel (a jax.ShapeDtypeStruct, models.load_abstract) the
  adapter is abstract too: its shape and sharding, nothing computed.
  """
  if mesh is None:
    return make()
  out = NamedSharding(mesh, sharding.spec_for(names, shape, mesh))
  if isinstance(like, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(shape, like.dtype, sharding=out)
  return jax.jit(make, out_shardings=out)()


def apply(model: nnx.Module, *, rank: int, alpha: float, targets: Sequence[str],
          rngs: nnx.Rngs) -> nnx.Module:
  """Adds a LoRA adapter to every Dense whose attribute name is in `targets` (in place).

  Returns `model` for chaining. lora_a gets a normal(1/sqrt(in)) init and
  lora_b zeros, so the output is unchanged until lora_b is trained. The new
  parameters carry logical names (in_name, "lora") / ("lora", out_name) and
  are created with the sharding of the mesh the kernels live on.
  """
  if rank < 1:
    raise UserError(f"LoRA rank must be >= 1, got {rank}")
  targets = tuple(targets)
  found = list(_denses(model))
  hits = [(p, d) for p, d in found if p and p[-1] in targets]
  matched = {p[-1] for p, _ in hits}
  unmatched = [t for t in targets if t not in matched]
  if unmatched:
    available = sorted({str(p[-1]) for p, _ in found if p})
    raise UserError(f"LoRA targets {unmatched} match no Dense layer of {type(model).__name__}; "
                    f"available: {', '.join(available)}")
  for _, dense in hits:
    kernel = dense.kernel.get_value()
    *lead, din, dout = kernel.shape  # lead: (L,) on stacked decoder layers
    lead = tuple(lead)
    names = sharding.variable_names(dense.kernel) or (None,) * kernel.ndim
    lead_names, (in_name, out_name) = tuple(names[:-2]), names[-2:]
    mesh, dtype = _mesh_of(kernel), kernel.dtype
    a_names, b_names = lead_names + (in_name, "lora"), lead_names + ("lora", out_name)
    a_shape, b_shape = lead + (din, rank), lead + (rank, dout)
    key = rngs.params()
    a = _born(lambda: jax.random.normal(key, a_shape, jnp.float32).astype(dtype) * (din ** -0.5),
              a_names, a_shape, mesh, kernel)
    b = _born(lambda: jnp.zeros(b_shape, dtype), b_names, b_shape, mesh, kernel)
    with nnx.use_eager_sharding(False):  # already placed by _born; only record the names
      dense.lora_a = nnx.LoRAParam(a, out_sharding=a_names)
      dense.lora_b = nnx.LoRAParam(b, out_sharding=b_names)
    dense.lora_scale = float(alpha) / rank
  return model


def without_adapters(state: Any) -> Any:
  """The same nnx.State with every LoRAParam zeroed: merged, it is the frozen base model.

  Works inside jit (the zeros become constants) and outside, where each zero
  array keeps the sharding of the adapter it replaces.
  """

  def zero(v):
    if not isinstance(v, nnx.LoRAParam):
      return v
    x = v.get_value()
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      return v.replace(jnp.zeros(x.shape, x.dtype, device=x.sharding))
    return v.replace(jnp.zeros_like(x))

  return jax.tree.map(zero, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def merge(model: nnx.Module) -> nnx.Module:
  """A new module with each adapter folded into its kernel and removed; `model` is untouched.

  Kernels keep their sharding and dtype. Arrays not touched by a merge are
  shared with `model`, not copied.
  """
  graphdef, state = nnx.split(model)
  merged = nnx.merge(graphdef, state)  # fresh modules; Variables may still be shared with `model`
  for _, dense in _denses(merged):
    if dense.lora_a is None:
      continue
    kernel, a, b, scale = dense.kernel[...], dense.lora_a[...], dense.lora_b[...], dense.lora_scale
    # a @ b is batched over a leading layer axis when the kernel is stacked.
    fold = lambda k, a, b: (k.astype(jnp.float32) + (a.astype(jnp.float32) @ b.astype(jnp.float32))
                            * scale).astype(k.dtype)
    out = kernel.sharding if isinstance(kernel.sharding, NamedSharding) else None
    # A new Variable, not an in-place write, so `model`'s kernel is left alone.
    dense.kernel = dense.kernel.replace(jax.jit(fold, out_shardings=out)(kernel, a, b))
    dense.lora_a = None
    dense.lora_b = None
    dense.lora_scale = 0.0
  return merged
