"""What every causal LM family shares: the call, the seq-cls pooling and KV-cache decoding.

A family subclasses CausalLM and provides `_trunk(ids, positions, mask,
cache, index) -> (hidden, cache)`, `head(hidden) -> float32 logits`,
`score` (a Dense, or None unless task == "seq_cls") and `_cache_shape(batch,
max_len)` ([L, B, Hkv, S, D]: layers stacked like the block parameters, so
the layer scan carries it; head-major, see layers.write_cache).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rcfd_jax.models import layers as L


class CausalLM(nnx.Module):
  remat = False  # jax.checkpoint on the decoder-layer scan (config.model.remat; layers.scan_layers)

  def __call__(self, input_ids, attention_mask=None, *, positions=None, return_hidden=False):
    """[B, T, V] float32 logits (or (logits, hidden)); [B, labels] for task seq_cls."""
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
      positions = L.positions_from_mask(attention_mask)
    slots = jnp.arange(t)
    hidden, _ = self._trunk(input_ids, positions, L.causal_mask(slots, slots, attention_mask))
    if self.task == "seq_cls":  # the score at the last non-padding token, as transformers reads it
      pooled = hidden[jnp.arange(b), L.last_token_index(attention_mask)]
      return self.score(pooled).astype(jnp.float32)
    logits = self.head(hidden)
    return (logits, hidden) if return_hidden else logits

  def init_cache(self, batch: int, max_len: int, dtype=None):
    """Zeroed (k, v) buffers [L, B, Hkv, max_len, D] for `max_len` cache slots of every layer."""
    shape = self._cache_shape(batch, max_len)
    return (jnp.zeros(shape, dtype or self.dtype), jnp.zeros(shape, dtype or self.dtype))

  def decode(self, input_ids, positions, cache, key_valid, index):
    """Runs T new tokens at cache slots [index, index+T); returns (logits, cache)."""
    hidden, cache = self.decode_hidden(input_ids, positions, cache, key_valid, index)
    return self.head(hidden), cache

  def decode_hidden(self, input_ids, positions, cache, key_valid, index):
    """decode's final hidden states [B, T, H] instead of logits (head(hidden) gives them)."""
    t = input_ids.shape[1]
    mask = L.causal_mask(index + jnp.arange(t), jnp.arange(key_valid.shape[1]), key_valid)
    return self._trunk(input_ids, positions, mask, cache, index)
