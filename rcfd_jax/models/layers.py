"""Building blocks shared by every model family.

Weights are stored in JAX layout ([in, out] kernels) with logical axis names
in their `out_sharding` metadata (see rcfd_jax.sharding). Parameters are
float32 or bfloat16 (`param_dtype`); matmuls run in `dtype`; callers cast
logits to float32.

Dense layers can carry a LoRA adapter (nnx.LoRAParam lora_a, lora_b). The
adapter is added after construction by rcfd_jax.models.lora; with lora_b set
to zeros the layer computes exactly the base weights, which is how the
reference policy is evaluated without a second copy of the model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rcfd_jax import sharding

Names = tuple[str | None, ...]


def _param(rngs: nnx.Rngs, init, shape, dtype, names: Names) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] @ w [in, out], as one 2-D matmul over the flattened leading axes.

  The same product, but XLA's CPU backward of a dot with several leading
  axes (the weight gradient contracts over all of them) measured ~1.7x
  slower than of the 2-D one; on accelerators the reshapes are free.
  """
  return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


class Dense(nnx.Module):
  """y = x @ kernel (+ bias) (+ LoRA); kernel is [in, out]."""

  def __init__(self, din: int, dout: int, names: Names, *, use_bias: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
               rngs: nnx.Rngs):
    self.kernel = _param(rngs, nnx.initializers.normal(init_std), (din, dout), param_dtype, names)
    self.bias = (_param(rngs, nnx.initializers.zeros, (dout,), param_dtype, (names[1],))
                 if use_bias else None)
    self.dtype = dtype
    # nnx.data: the slots hold parameters once lora.apply fills them, so they
    # must be pytree data, not static attributes (NNX refuses that switch).
    self.lora_a: nnx.LoRAParam | None = nnx.data(None)
    self.lora_b: nnx.LoRAParam | None = nnx.data(None)
    self.lora_scale = 0.0

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = matmul(x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      a = self.lora_a[...].astype(self.dtype)
      b = self.lora_b[...].astype(self.dtype)
      y = y + matmul(matmul(x, a), b) * self.lora_scale
    return y


class Embed(nnx.Module):
  """Token (or position) embedding table [num, features]."""

  def __init__(self, num: int, features: int, names: Names, *, dtype=jnp.float32,
               param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
    self.embedding = _param(rngs, nnx.initializers.normal(init_std), (num, features), param_dtype, names)
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """x @ embedding.T, the tied output head."""
    return matmul(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32, with scale and bias."""

  def __init__(self, features: int, *, eps: float, use_bias: bool = True,
               param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = _param(rngs, nnx.initializers.ones, (features,), param_dtype, ("norm",))
    self.bias = (_param(rngs, nnx.initializers.zeros, (features,), param_dtype, ("norm",))
                 if use_bias else None)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32 (Llama, Qwen2, Mistral)."""

  def __init__(self, features: int, *, eps: float, param_dtype=jnp.float32,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = _param(rngs, nnx.initializers.ones, (features,), param_dtype, ("norm",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def activation(name: str):
  """Hugging Face activation names used by the supported families."""
  table = {
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
      "tanh": jnp.tanh,
  }
  if name not in table:
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
  return table[name]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              scale: float | None = None) -> jax.Array:
  """Softmax attention with grouped-query support.

  q: [B, T, H, D]; k, v: [B, S, Hkv, D] with H a multiple of Hkv;
  mask: [B, T, S] (True = may attend). Softmax in float32; a query with no
  allowed key (a padding row) gets zeros, not NaN.
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  groups = h // hkv
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  qg = q.reshape(b, t, hkv, groups, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * scale
  big_neg = jnp.finfo(jnp.float32).min
  logits = jnp.where(mask[:, None, None, :, :], logits, big_neg)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask[:, None, None, :, :], probs, 0.0).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def causal_mask(query_slots: jax.Array, key_slots: jax.Array, key_valid: jax.Array) -> jax.Array:
  """[B, T, S] mask: key slot <= query slot and the key is valid.

  query_slots: [T] or [B, T]; key_slots: [S]; key_valid: [B, S] bool.
  """
  if query_slots.ndim == 1:
    query_slots = query_slots[None]
  return (key_slots[None, None, :] <= query_slots[:, :, None]) & key_valid[:, None, :]


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position ids for a (left-)padded batch: count of real tokens before each."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def last_token_index(mask: jax.Array) -> jax.Array:
  """Index of the last non-padding token of each row of a [B, T] mask."""
  t = mask.shape[-1]
  idx = jnp.where(mask.astype(bool), jnp.arange(t)[None, :], -1)
  return jnp.maximum(idx.max(-1), 0)


def write_cache(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
  """Writes new [B, T, Hkv, D] into layer `layer` of a stacked cache [L, B, Hkv, S, D] at slot `index`.

  The whole stacked cache rides in the layer scan's carry and is updated in
  place, so a decode step writes T slots per layer instead of copying the
  cache through the scan's outputs. Head-major because attention contracts
  over D with (B, Hkv) as batch dimensions, and XLA's CPU dot wants batch
  dimensions major: with a slot-major [B, S, Hkv, D] cache it transposed the
  whole cache on every decode step, which made sampling 1.3-1.9x slower.
  """
  new = new.swapaxes(1, 2).astype(cache.dtype)[None]
  zero = jnp.zeros((), jnp.int32)
  return jax.lax.dynamic_update_slice(cache, new, (layer, zero, zero, jnp.asarray(index, jnp.int32), zero))


def cache_view(cache: jax.Array, layer: jax.Array) -> jax.Array:
  """Layer `layer` of a stacked cache as attention's [B, S, Hkv, D]; XLA folds the transpose."""
  return jax.lax.dynamic_index_in_dim(cache, layer, axis=0, keepdims=False).swapaxes(1, 2)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """One module whose parameters are n independently initialised copies stacked [n, ...].

  Every parameter's logical names gain a leading "layers" (replicated, see
  sharding.RULES), so init_sharded still creates the stack sharded. Decoder
  and encoder layers are stored this way so that `scan_layers` traces and
  compiles one layer, not n: compile time no longer grows with depth.
  """

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def one(r):
    return make(r)

  return one(rngs)


def scan_layers(blocks: nnx.Module, fn: Callable[[nnx.Module, Any, jax.Array, Any], Any], carry: Any,
                xs: Any = None, *, remat: bool = False) -> Any:
  """carry = fn(block_i, carry, i, xs[i]) for every layer i of a `stacked` module, as one lax.scan.

  The block graph is split once and merged with each layer's slice of the
  parameters inside the scan body; gradients flow to the stacked parameters.
  `i` is the traced layer index (for per-layer scales and cache writes).
  remat: wrap the body in jax.checkpoint, so a backward pass keeps only each
  layer's input carry and recomputes the layer's activations from it (one
  more forward of the layers, a layer's activations live at a time instead
  of all of them). Without differentiation it changes nothing.
  """
  graphdef, state = nnx.split(blocks)
  n = jax.tree.leaves(state)[0].shape[0]

  def step(c, layer):
    params, i, x_i = layer
    return fn(nnx.merge(graphdef, params), c, i, x_i), None

  if remat:  # prevent_cse=False: inside scan the recomputation cannot be merged away
    step = jax.checkpoint(step, prevent_cse=False)
  carry, _ = jax.lax.scan(step, carry, (state, jnp.arange(n, dtype=jnp.int32), xs))
  return carry


def activations(x: jax.Array) -> jax.Array:
  """A layer's input [B, T, D], rows split over (data, fsdp) when T > 1 (sharding.constrain).

  With many tokens per row, gathering each layer's weights once (FSDP) moves
  far less than splitting the hidden dimension like the weights, which
  all-reduces a partial [B, T, out] after every matmul; the compiler picks
  the latter for the backward pass if left alone. With one token per row
  (decoding) keeping the weights in place and moving the activations is the
  better trade, and the compiler is left to find it.
  """
  return sharding.constrain(x, ("batch", None, None)) if x.shape[1] > 1 else x


def split_heads(x: jax.Array, heads: int) -> jax.Array:
  b, t, _ = x.shape
  return x.reshape(b, t, heads, -1)


def merge_heads(x: jax.Array) -> jax.Array:
  b, t = x.shape[:2]
  return x.reshape(b, t, -1)


def as_tuple(x: Sequence | None) -> tuple:
  return tuple(x) if x is not None else ()
