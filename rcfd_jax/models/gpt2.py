"""GPT-2 family: learned positions, fused Conv1D q/k/v ([in, out] weights), tied head."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rcfd_jax.models import hf, layers as L
from rcfd_jax.models.causal import CausalLM
from rcfd_jax.models.hf import Tensor

MODEL_TYPES = ("gpt2",)
TASKS = ("causal_lm", "seq_cls")
PREFIXES = ("transformer.",)


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int
  n_positions: int
  n_embd: int
  n_layer: int
  n_head: int
  n_inner: int
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  num_labels: int = 2
  model_type: str = "gpt2"
  extra: tuple = ()  # other config.json fields, written back unchanged

  @property
  def max_positions(self) -> int:
    return self.n_positions

  def to_hf(self, task: str) -> dict[str, Any]:
    d = dict(self.extra)
    d.update({k: getattr(self, k) for k in (
        "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
        "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
        "bos_token_id", "eos_token_id", "pad_token_id", "model_type")})
    d["n_ctx"] = self.n_positions
    d["tie_word_embeddings"] = True
    d["architectures"] = ["GPT2LMHeadModel" if task == "causal_lm" else "GPT2ForSequenceClassification"]
    if task == "seq_cls":
      d["num_labels"] = self.num_labels
      d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
      d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
    return d


def config_from_hf(c: dict[str, Any]) -> Config:
  known = {f.name for f in dataclasses.fields(Config)}
  num_labels = c.get("num_labels") or len(c.get("id2label") or {}) or 2
  extra = hf.extra_fields(c, known | {"n_ctx", "tie_word_embeddings"})
  return Config(
      vocab_size=c["vocab_size"], n_positions=c["n_positions"], n_embd=c["n_embd"], n_layer=c["n_layer"],
      n_head=c["n_head"], n_inner=c.get("n_inner") or 4 * c["n_embd"],
      activation_function=c.get("activation_function", "gelu_new"),
      layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-5),
      scale_attn_weights=c.get("scale_attn_weights", True),
      scale_attn_by_inverse_layer_idx=c.get("scale_attn_by_inverse_layer_idx", False),
      bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
      pad_token_id=c.get("pad_token_id"), num_labels=num_labels, extra=extra)


def attn_scales(cfg: Config) -> np.ndarray:
  """Per-layer attention scale [L] in float32, rounded from float64 as a Python-float scale would be.

  A table scanned alongside the layers (not a static attribute of one
  block), since scale_attn_by_inverse_layer_idx differs per layer.
  """
  base = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
  div = [i + 1 if cfg.scale_attn_by_inverse_layer_idx else 1 for i in range(cfg.n_layer)]
  return np.array([base / d for d in div], np.float32)


class Block(nnx.Module):
  """One decoder layer; GPT2 holds all of them stacked [L, ...] (layers.stacked)."""

  def __init__(self, cfg: Config, *, dtype, param_dtype, rngs):
    d, kw = cfg.n_embd, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_1 = L.LayerNorm(d, eps=cfg.layer_norm_epsilon, **kw)
    self.c_attn = L.Dense(d, 3 * d, ("embed", "heads"), **kw)
    self.c_proj = L.Dense(d, d, ("heads", "embed"), **kw)
    self.ln_2 = L.LayerNorm(d, eps=cfg.layer_norm_epsilon, **kw)
    self.c_fc = L.Dense(d, cfg.n_inner, ("embed", "mlp"), **kw)
    self.mlp_proj = L.Dense(cfg.n_inner, d, ("mlp", "embed"), **kw)
    self.act = L.activation(cfg.activation_function)
    self.heads = cfg.n_head

  def __call__(self, x, mask, scale, layer, kv=None, index=None):
    q, k, v = jnp.split(self.c_attn(self.ln_1(x)), 3, axis=-1)
    q, k, v = (L.split_heads(t, self.heads) for t in (q, k, v))
    if kv is not None:
      kv = (L.write_cache(kv[0], k, layer, index), L.write_cache(kv[1], v, layer, index))
      k, v = L.cache_view(kv[0], layer), L.cache_view(kv[1], layer)
    a = L.attention(q, k, v, mask, scale=scale)
    x = x + self.c_proj(L.merge_heads(a))
    x = x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x))))
    return x, kv


class GPT2(CausalLM):
  """GPT-2 trunk + tied LM head (task causal_lm) or a score head (seq_cls)."""

  def __init__(self, cfg: Config, task: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config, self.task, self.dtype = cfg, task, dtype
    self.wte = L.Embed(cfg.vocab_size, cfg.n_embd, ("vocab", "embed"), **kw)
    self.wpe = L.Embed(cfg.n_positions, cfg.n_embd, ("positions", "embed"), **kw)
    self.h = L.stacked(lambda r: Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.n_layer, rngs)
    self.ln_f = L.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, **kw)
    self.score = (L.Dense(cfg.n_embd, cfg.num_labels, ("embed", "labels"), use_bias=False, **kw)
                  if task == "seq_cls" else None)

  def _trunk(self, ids, positions, mask, cache=None, index=None):
    x = self.wte(ids) + self.wpe(positions)

    def layer(block, carry, i, scale):
      x, kv = carry
      return block(L.activations(x), mask, scale, i, kv, index)

    x, cache = L.scan_layers(self.h, layer, (x, cache), jnp.asarray(attn_scales(self.config)), remat=self.remat)
    return self.ln_f(x), cache

  def head(self, hidden: jax.Array) -> jax.Array:
    """float32 logits from final hidden states."""
    return self.wte.attend(hidden).astype(jnp.float32)

  def _cache_shape(self, batch: int, max_len: int) -> tuple[int, ...]:
    c = self.config
    return (c.n_layer, batch, c.n_head, max_len, c.n_embd // c.n_head)


def build(cfg: Config, task: str, *, dtype, param_dtype, rngs) -> GPT2:
  return GPT2(cfg, task, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def tensors(cfg: Config, task: str) -> list[Tensor]:
  p = "transformer."
  out = [Tensor(("wte", "embedding"), p + "wte.weight"), Tensor(("wpe", "embedding"), p + "wpe.weight")]
  for i in range(cfg.n_layer):
    n = f"{p}h.{i}."
    out += [Tensor(("h",) + ours, n + theirs, layer=i) for ours, theirs in (
        (("ln_1", "scale"), "ln_1.weight"), (("ln_1", "bias"), "ln_1.bias"),
        (("c_attn", "kernel"), "attn.c_attn.weight"), (("c_attn", "bias"), "attn.c_attn.bias"),
        (("c_proj", "kernel"), "attn.c_proj.weight"), (("c_proj", "bias"), "attn.c_proj.bias"),
        (("ln_2", "scale"), "ln_2.weight"), (("ln_2", "bias"), "ln_2.bias"),
        (("c_fc", "kernel"), "mlp.c_fc.weight"), (("c_fc", "bias"), "mlp.c_fc.bias"),
        (("mlp_proj", "kernel"), "mlp.c_proj.weight"), (("mlp_proj", "bias"), "mlp.c_proj.bias"))]
  out += [Tensor(("ln_f", "scale"), p + "ln_f.weight"), Tensor(("ln_f", "bias"), p + "ln_f.bias")]
  if task == "seq_cls":
    out.append(Tensor(("score", "kernel"), "score.weight", lambda x: x.T, lambda x: x.T))
  return out
