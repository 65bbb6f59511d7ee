"""Jitted autoregressive sampling with a fixed-size KV cache.

    ids, mask = pad_prompts(token_lists, pad_id, max_new_tokens=64, max_positions=...)
    out = sample(model, ids, mask, rng, max_new_tokens=64, temperature=1.0,
                 top_k=0, top_p=1.0, eos_id=eos, pad_id=pad)      # inside any jit
    out = Sampler(model, mesh)(ids, mask, rng, max_new_tokens=64)   # standalone

`sample` is a pure function of an NNX module, so the RL step calls it inside
its own jit after nnx.merge. Shapes are static (batch B, padded prompt length
P, max_new_tokens N); everything the user tunes between calls (temperature,
top_k, top_p, eos_id, pad_id) is a traced scalar, so changing them never
recompiles.

The work is one prefill call that writes the whole left-padded prompt into
the cache, then one decode call per new token inside a single
lax.while_loop. A while loop (rather than scan or fori_loop) because it can
stop as soon as every row has produced EOS; every XLA loop is a while loop
underneath, so the only extra cost is an all-reduce of B booleans per step,
which is nothing next to the decode itself.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from rcfd_jax import sharding
from rcfd_jax.errors import UserError
from rcfd_jax.models import layers as L


@struct.dataclass
class SampleOutput:
  """Completions of a batch; N = max_new_tokens.

  tokens_bn: int32 sampled ids; pad_id after a row's first EOS.
  logprobs_bn: float32 log-prob of each sampled token under the model's
    unmodified distribution log_softmax(logits), i.e. before temperature,
    top-k and top-p. This is the behaviour policy's log-prob that RL
    objectives and KL terms use; 0 where mask_bn is False.
  mask_bn: bool, True for completion tokens up to and including the first EOS.
  lengths_b: int32 number of True entries of mask_bn per row.
  values_bn: with sample's value_fn, float32 value_fn of the final hidden
    state that predicted each token (what a value head reads on a full
    forward of the sequence); 0 where mask_bn is False. None without it.
  """
  tokens_bn: jax.Array
  logprobs_bn: jax.Array
  mask_bn: jax.Array
  lengths_b: jax.Array
  values_bn: jax.Array | None = None


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None, *,
                max_new_tokens: int = 0, max_positions: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token-id lists to one length; returns (ids int32 [B, P], mask bool [B, P]).

  Left padding puts every prompt's last token in the last column, which is
  where `sample` reads the first next-token distribution from. `length`
  defaults to the longest prompt. With max_positions given, a prompt whose
  padded length plus max_new_tokens does not fit the model's context is
  rejected here, on the host, with a message naming the fix, instead of
  silently producing garbage positions on the device.
  """
  if not prompts:
    raise UserError("no prompts given; pass at least one prompt")
  lens = [len(p) for p in prompts]
  if min(lens) == 0:
    raise UserError(f"prompt {lens.index(0)} is empty; every prompt needs at least one token")
  longest = max(lens)
  length = longest if length is None else length
  if longest > length:
    raise UserError(f"a prompt has {longest} tokens but the prompt length is {length}; "
                    "raise the prompt length or truncate the prompt")
  if max_positions is not None and length + max_new_tokens > max_positions:
    raise UserError(
        f"prompt length {length} + max_new_tokens {max_new_tokens} = {length + max_new_tokens} "
        f"exceeds the model's context of {max_positions} positions; shorten the prompt or lower "
        "max_new_tokens")
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    if len(p):
      ids[i, length - len(p):] = np.asarray(p, np.int32)
      mask[i, length - len(p):] = True
  return ids, mask


def _sortable(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (IEEE bits, negatives flipped)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where((bits >> 31) != 0, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(key_bv: jax.Array, ok) -> jax.Array:
  """Per row, the largest t in [min, max] of key_bv with ok(t) [B, 1] true.

  ok must be monotone (true up to some t, false beyond). Bisection over the
  32-bit keys is exact after 32 steps, each one compare-and-reduce pass over
  the vocabulary: plain reductions, where a sort of [B, V] would need XLA's
  comparator sort, and no static k.
  """
  lo = key_bv.min(-1, keepdims=True)
  hi = key_bv.max(-1, keepdims=True)

  def step(_, bounds):
    lo, hi = bounds
    gap = hi - lo
    mid = lo + gap // 2 + gap % 2  # ceil midpoint without uint32 overflow
    good = ok(mid)
    return jnp.where(good, mid, lo), jnp.where(good, hi, jnp.where(mid > lo, mid - 1, lo))

  return jax.lax.fori_loop(0, 32, step, (lo, hi))[0]


def truncate_logits(logits_bv: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Sets logits outside the top-k, then nucleus (top-p), set to -inf.

  top_k <= 0 and top_p >= 1 each disable their filter. The top-k set is
  every token at or above the k-th largest logit; the nucleus is the
  smallest set of most likely tokens (after top-k, renormalised) whose mass
  reaches top_p, as in transformers. Both are found as thresholds by
  bisection, so k and p stay traced. The top token is always kept; ties at
  a threshold are all kept.
  """
  key_bv = _sortable(logits_bv)
  k_thresh = _largest_threshold(key_bv, lambda t: (key_bv >= t).sum(-1, keepdims=True) >= top_k)
  logits_bv = jnp.where((top_k <= 0) | (key_bv >= k_thresh), logits_bv, -jnp.inf)
  probs_bv = jax.nn.softmax(logits_bv, axis=-1)
  key_bv = _sortable(logits_bv)
  p_thresh = _largest_threshold(
      key_bv, lambda t: jnp.where(key_bv >= t, probs_bv, 0.0).sum(-1, keepdims=True) >= top_p)
  return jnp.where((top_p >= 1.0) | (key_bv >= p_thresh), logits_bv, -jnp.inf)


def _argmax(x_bv: jax.Array) -> jax.Array:
  """First index of the row maximum; two plain reductions vectorise on CPU where
  jnp.argmax's (value, index) reduction does not."""
  top = x_bv.max(-1, keepdims=True)
  v = x_bv.shape[-1]
  return jnp.where(x_bv == top, jnp.arange(v), v).min(-1)


def choose(logits_bv: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One token per row and its log-prob under the unmodified distribution.

  temperature 0 means greedy. The threshold search of truncate_logits
  runs only when top-k or top-p is switched on (lax.cond on the traced
  values). Drawing is by inverse CDF, one uniform per row: the Gumbel-max
  trick (jax.random.categorical) needs a random number per vocabulary entry,
  and threefry for [B, V] bits cost more than the whole decode step of a
  small model on CPU. A token of probability 0 (filtered out) is never
  drawn: u < total mass, and the first cumulative sum above u sits on a
  token whose own probability is positive.
  """
  logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
  greedy = _argmax(logits_bv)
  scaled = logits_bv / jnp.where(temperature > 0, temperature, 1.0)
  scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0), truncate_logits, lambda x, *_: x,
                        scaled, top_k, top_p)
  cdf_bv = jnp.cumsum(jax.nn.softmax(scaled, axis=-1), axis=-1)
  total_b1 = cdf_bv[:, -1:]
  u_b1 = jnp.minimum(jax.random.uniform(key, total_b1.shape) * total_b1,
                     jnp.nextafter(total_b1, jnp.zeros_like(total_b1)))
  drawn = (cdf_bv <= u_b1).sum(-1)
  tok = jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
  return tok, jnp.take_along_axis(logp_bv, tok[:, None], axis=-1)[:, 0]


def sample(model: nnx.Module, prompt_ids_bp: jax.Array, prompt_mask_bp: jax.Array,
           rng: jax.Array, *, max_new_tokens: int, temperature: float | jax.Array = 1.0,
           top_k: int | jax.Array = 0, top_p: float | jax.Array = 1.0,
           eos_id: int | jax.Array = -1, pad_id: int | jax.Array = 0,
           value_fn: Callable[[jax.Array], jax.Array] | None = None) -> SampleOutput:
  """Samples max_new_tokens tokens after left-padded prompts; pure and jittable.

  Args:
    model: a causal LM implementing init_cache, decode_hidden and head (rcfd_jax.models).
    prompt_ids_bp: int [B, P], left-padded so each prompt ends in column P-1.
    prompt_mask_bp: bool [B, P], True on real prompt tokens.
    rng: a jax.random key; step i uses fold_in(rng, i).
    max_new_tokens: N, static.
    temperature: traced; 0 means greedy.
    top_k: traced; 0 disables.
    top_p: traced; 1.0 disables.
    eos_id: traced; generation of a row ends after it. -1 (or any id
      outside the vocabulary) means never stop, for fixed-length runs.
    pad_id: traced; written after a row's EOS.
    value_fn: optional map from final hidden states [B, H] to [B] (a value
      head), evaluated at every step on the states the logits come from, so
      PPO's rollout needs no second forward pass for its values.

  Returns:
    SampleOutput; see its docstring for what each field holds.
  """
  b, p = prompt_ids_bp.shape
  n = max_new_tokens
  max_positions = model.config.max_positions
  if p + n > max_positions:
    raise UserError(f"prompt length {p} + max_new_tokens {n} exceeds the model's context of "
                    f"{max_positions} positions; shorten the prompts or lower max_new_tokens")
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  eos_id = jnp.asarray(eos_id, jnp.int32)
  pad_id = jnp.asarray(pad_id, jnp.int32)
  mask_bp = prompt_mask_bp.astype(bool)
  prompt_len_b = mask_bp.sum(-1).astype(jnp.int32)

  # Slots: [0, P) the prompt, [P, P+N-1) the fed-back completion (the last
  # sampled token is never fed back). Generated slots are always valid keys:
  # the causal rule (key slot <= query slot) already hides future ones.
  slots = p + n - 1
  key_valid_bs = jnp.concatenate([mask_bp, jnp.ones((b, n - 1), bool)], axis=1)
  cache = model.init_cache(b, slots)

  def decode(ids_bt, positions_bt, cache, index):
    """Hidden state of the last of the T tokens [B, H] (the one that predicts the next), cache."""
    hidden_bth, cache = model.decode_hidden(ids_bt, positions_bt, cache, key_valid_bs, index)
    return hidden_bth[:, -1], cache

  def record(buf_bn, i, x_b, alive_b):
    return jax.lax.dynamic_update_slice_in_dim(buf_bn, jnp.where(alive_b, x_b, 0)[:, None], i, axis=1)

  def emit(i, h_bh, done_b, tokens_bn, logp_bn, values_bn, len_b):
    """Samples token i from h_bh's logits and records it for rows that have not finished.

    values_bn is None without value_fn: nothing is computed or carried for it.
    """
    tok_b, lp_b = choose(model.head(h_bh), jax.random.fold_in(rng, i), temperature, top_k, top_p)
    alive_b = ~done_b
    tok_b = jnp.where(alive_b, tok_b, pad_id)
    tokens_bn = jax.lax.dynamic_update_slice_in_dim(tokens_bn, tok_b[:, None], i, axis=1)
    logp_bn = record(logp_bn, i, lp_b, alive_b)
    if values_bn is not None:
      values_bn = record(values_bn, i, value_fn(h_bh).astype(jnp.float32), alive_b)
    return (tok_b, done_b | (alive_b & (tok_b == eos_id)), tokens_bn, logp_bn, values_bn,
            len_b + alive_b)

  h_bh, cache = decode(prompt_ids_bp, L.positions_from_mask(mask_bp), cache, 0)
  tokens_bn = jnp.full((b, n), pad_id, jnp.int32)
  logp_bn = jnp.zeros((b, n), jnp.float32)
  values_bn = jnp.zeros((b, n), jnp.float32) if value_fn is not None else None
  first = emit(0, h_bh, jnp.zeros((b,), bool), tokens_bn, logp_bn, values_bn, jnp.zeros((b,), jnp.int32))

  def cond(carry):
    i, _, _, done_b, *_ = carry
    return (i < n) & ~done_b.all()

  def body(carry):
    i, cache, tok_b, done_b, tokens_bn, logp_bn, values_bn, len_b = carry
    # Feed token i-1 back at slot P+i-1 and position prompt_len+i-1.
    h_bh, cache = decode(tok_b[:, None], (prompt_len_b + i - 1)[:, None], cache, p + i - 1)
    return (i + 1, cache, *emit(i, h_bh, done_b, tokens_bn, logp_bn, values_bn, len_b))

  carry = (jnp.int32(1), cache, *first)
  _, _, _, _, tokens_bn, logp_bn, values_bn, len_b = jax.lax.while_loop(cond, body, carry)
  mask_bn = jnp.arange(n)[None, :] < len_b[:, None]
  return SampleOutput(tokens_bn=tokens_bn, logprobs_bn=logp_bn, mask_bn=mask_bn, lengths_b=len_b,
                      values_bn=values_bn)


def _mesh_of(state: Any) -> Mesh:
  for leaf in jax.tree.leaves(state):
    s = getattr(leaf, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding):
      return s.mesh
  return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


class Sampler:
  """`sample` compiled once per (batch, prompt_len, max_new_tokens) for standalone use.

  Parameters keep their logical shardings (sharding.state_shardings) and
  the batch is split over ("data", "fsdp"), so the same object runs on one
  CPU device and on a pod slice. The function is jitted over (graphdef,
  state) from nnx.split rather than with nnx.jit, which avoids NNX's
  per-call graph traversal; each shape is compiled ahead of time and kept
  in `compiled`. `traces` counts how often the Python function was traced,
  so tests can check that changing temperature/top-k/top-p does not
  recompile.
  """

  def __init__(self, model: nnx.Module, mesh: Mesh | None = None):
    self.graphdef, state = nnx.split(model)
    self.mesh = mesh or _mesh_of(state)
    self.max_positions = model.config.max_positions
    self._state_shardings = sharding.state_shardings(state, self.mesh)
    self.state = jax.device_put(state, self._state_shardings)
    self.compiled: dict[tuple[int, int, int], Any] = {}
    self.traces = 0

  def _compile(self, b: int, p: int, n: int):
    rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if b % rows:
      raise UserError(f"batch {b} does not divide over the mesh's data x fsdp = {rows} devices; "
                      f"use a batch that is a multiple of {rows}")
    graphdef = self.graphdef

    def run(state, ids, mask, rng, temperature, top_k, top_p, eos_id, pad_id):
      self.traces += 1
      return sample(nnx.merge(graphdef, state), ids, mask, rng, max_new_tokens=n,
                    temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id)

    b2, b1 = sharding.batch_sharding(self.mesh, 2), sharding.batch_sharding(self.mesh, 1)
    rep = sharding.replicated(self.mesh)
    out = SampleOutput(tokens_bn=b2, logprobs_bn=b2, mask_bn=b2, lengths_b=b1)
    fn = jax.jit(run, in_shardings=(self._state_shardings, b2, b2) + (rep,) * 6, out_shardings=out)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
    return fn.lower(self.state, jax.ShapeDtypeStruct((b, p), jnp.int32),
                    jax.ShapeDtypeStruct((b, p), jnp.bool_), jax.random.key(0),
                    scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32),
                    scalar(jnp.int32), scalar(jnp.int32)).compile()

  def __call__(self, prompt_ids_bp, prompt_mask_bp, rng, *, max_new_tokens: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int = -1,
               pad_id: int = 0) -> SampleOutput:
    """Samples on the mesh; `rng` is a typed key (jax.random.key) or a seed int."""
    b, p = np.shape(prompt_ids_bp)
    if p + max_new_tokens > self.max_positions:
      raise UserError(f"prompt length {p} + max_new_tokens {max_new_tokens} exceeds the model's "
                      f"context of {self.max_positions} positions; shorten the prompts or lower "
                      "max_new_tokens")
    shape = (b, p, max_new_tokens)
    if shape not in self.compiled:
      self.compiled[shape] = self._compile(*shape)
    if isinstance(rng, int):
      rng = jax.random.key(rng)
    elif not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)
    b2 = sharding.batch_sharding(self.mesh, 2)
    rep = sharding.replicated(self.mesh)
    ids = jax.device_put(jnp.asarray(prompt_ids_bp, jnp.int32), b2)
    mask = jax.device_put(jnp.asarray(prompt_mask_bp, bool), b2)
    scalars = [jax.device_put(np.asarray(x, d), rep) for x, d in (
        (temperature, np.float32), (top_k, np.int32), (top_p, np.float32), (eos_id, np.int32),
        (pad_id, np.int32))]
    return self.compiled[shape](self.state, ids, mask, jax.device_put(rng, rep), *scalars)
