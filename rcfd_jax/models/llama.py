"""Llama family (also Qwen2 and Mistral): RMSNorm, RoPE, grouped-query attention, SwiGLU.

The three model types share one decoder; they differ only in config fields:
Qwen2 always has q/k/v biases, Llama has optional `attention_bias` (q/k/v/o)
and `mlp_bias`, and Mistral / Qwen2 may declare a sliding window, which is
only accepted when it can never bind (see `_sliding_window`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rcfd_jax.errors import UserError
from rcfd_jax.models import hf, layers as L
from rcfd_jax.models.causal import CausalLM
from rcfd_jax.models.hf import Tensor, linear

MODEL_TYPES = ("llama", "qwen2", "mistral")
TASKS = ("causal_lm", "seq_cls")
PREFIXES = ("model.",)
ROPE_TYPES = ("default", "linear", "llama3")

_ARCH = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
# Fields config_from_hf interprets itself; everything else scalar rides along in `extra`.
_HANDLED = {
    "rope_parameters", "rope_scaling", "rope_theta", "use_sliding_window", "layer_types",
    "max_window_layers", "eos_token_id", "auto_map",
}


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  max_position_embeddings: int
  rms_norm_eps: float = 1e-6
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2: always; Llama: attention_bias
  o_bias: bool = False  # Llama attention_bias only
  mlp_bias: bool = False
  rope_type: str = "default"
  rope_theta: float = 10000.0
  rope_factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None  # a tuple keeps the config hashable
  pad_token_id: int | None = None
  num_labels: int = 2
  model_type: str = "llama"
  extra: tuple = ()  # other scalar config.json fields, written back unchanged

  @property
  def max_positions(self) -> int:
    return self.max_position_embeddings

  def rope_parameters(self) -> dict[str, Any]:
    d: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type in ("linear", "llama3"):
      d["factor"] = self.rope_factor
    if self.rope_type == "llama3":
      d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
               original_max_position_embeddings=self.original_max_position_embeddings)
    return d

  def to_hf(self, task: str) -> dict[str, Any]:
    d = dict(self.extra)
    d.update({k: getattr(self, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
        "tie_word_embeddings", "bos_token_id", "pad_token_id", "model_type")})
    eos = self.eos_token_id
    d["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
    d["rope_parameters"] = self.rope_parameters()
    if self.model_type == "llama":
      d["attention_bias"] = self.qkv_bias
      d["mlp_bias"] = self.mlp_bias
    else:
      # Mistral defaults to a 4096 window and Qwen2 reads use_sliding_window: say "none" explicitly.
      d["sliding_window"] = None
      if self.model_type == "qwen2":
        d["use_sliding_window"] = False
    arch = _ARCH[self.model_type]
    d["architectures"] = [f"{arch}ForCausalLM" if task == "causal_lm" else f"{arch}ForSequenceClassification"]
    if task == "seq_cls":
      d["num_labels"] = self.num_labels
      d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
      d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
    return d


def _rope(c: dict[str, Any]) -> dict[str, Any]:
  """RoPE fields from v5 "rope_parameters" or the older "rope_scaling" + "rope_theta"."""
  rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
  if any(isinstance(v, dict) for v in rp.values()):
    raise UserError(f"per-layer rope_parameters ({sorted(rp)}) are not supported for {c['model_type']}")
  rope_type = rp.get("rope_type") or rp.get("type") or "default"
  if rope_type not in ROPE_TYPES:
    raise UserError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
  out = dict(rope_type=rope_type, rope_theta=float(rp.get("rope_theta", c.get("rope_theta", 10000.0))))
  if rope_type in ("linear", "llama3"):
    out["rope_factor"] = float(rp["factor"])
  if rope_type == "llama3":
    out.update(low_freq_factor=float(rp["low_freq_factor"]), high_freq_factor=float(rp["high_freq_factor"]),
               original_max_position_embeddings=int(
                   c.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings")
                   or c["max_position_embeddings"]))
  return out


def _sliding_window(c: dict[str, Any]) -> None:
  """Refuses a sliding window that would change attention; only full attention is implemented."""
  window = c.get("sliding_window")
  if c["model_type"] == "qwen2" and not c.get("use_sliding_window"):
    window = None  # Qwen2 configs carry a window they do not use
  if window is not None and window < c["max_position_embeddings"]:
    raise UserError(
        f"{c['model_type']} sliding_window={window} is not supported (only sliding_window null, i.e. full "
        f"attention, or a window >= max_position_embeddings={c['max_position_embeddings']}); "
        "use a checkpoint without sliding-window attention")


def config_from_hf(c: dict[str, Any]) -> Config:
  model_type = c["model_type"]
  _sliding_window(c)
  known = {f.name for f in dataclasses.fields(Config)} | {"attention_bias", "sliding_window"}
  extra = hf.extra_fields(c, known | _HANDLED)
  heads = c["num_attention_heads"]
  attention_bias = bool(c.get("attention_bias", False))
  eos = c.get("eos_token_id")
  return Config(
      vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
      num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
      num_key_value_heads=c.get("num_key_value_heads") or heads,
      head_dim=c.get("head_dim") or c["hidden_size"] // heads,
      max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c.get("rms_norm_eps", 1e-6),
      hidden_act=c.get("hidden_act", "silu"), tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2" or attention_bias, o_bias=model_type == "llama" and attention_bias,
      mlp_bias=model_type == "llama" and bool(c.get("mlp_bias", False)),
      bos_token_id=c.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=c.get("pad_token_id"),
      num_labels=c.get("num_labels") or len(c.get("id2label") or {}) or 2,
      model_type=model_type, extra=extra, **_rope(c))


def rope_inv_freq(cfg: Config) -> np.ndarray:
  """Inverse frequencies [head_dim / 2] in float32, computed as transformers does."""
  d = cfg.head_dim
  inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d))))
  inv = inv.astype(np.float32)
  if cfg.rope_type == "linear":
    inv = inv / np.float32(cfg.rope_factor)
  elif cfg.rope_type == "llama3":
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, lo, hi = (np.float32(x) for x in (cfg.rope_factor, cfg.low_freq_factor, cfg.high_freq_factor))
    old = np.float32(cfg.original_max_position_embeddings)
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x [B, T, H, D] by positions [B, T] (half-split layout, as transformers)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm decoder layer; Dense names match transformers' so LoRA targets read the same.

  Llama holds all layers as one Block with parameters stacked [L, ...] (layers.stacked).
  """

  def __init__(self, cfg: Config, *, dtype, param_dtype, rngs):
    d, hd, kw = cfg.hidden_size, cfg.head_dim, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = L.RMSNorm(d, eps=cfg.rms_norm_eps, **kw)
    self.q_proj = L.Dense(d, cfg.num_attention_heads * hd, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
    self.k_proj = L.Dense(d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.v_proj = L.Dense(d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.o_proj = L.Dense(cfg.num_attention_heads * hd, d, ("heads", "embed"), use_bias=cfg.o_bias, **kw)
    self.post_attention_layernorm = L.RMSNorm(d, eps=cfg.rms_norm_eps, **kw)
    self.gate_proj = L.Dense(d, cfg.intermediate_size, ("embed", "mlp"), use_bias=cfg.mlp_bias, **kw)
    self.up_proj = L.Dense(d, cfg.intermediate_size, ("embed", "mlp"), use_bias=cfg.mlp_bias, **kw)
    self.down_proj = L.Dense(cfg.intermediate_size, d, ("mlp", "embed"), use_bias=cfg.mlp_bias, **kw)
    self.act = L.activation(cfg.hidden_act)
    self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads

  def __call__(self, x, positions, inv_freq, mask, layer, kv=None, index=None):
    h = self.input_layernorm(x)
    q = apply_rope(L.split_heads(self.q_proj(h), self.heads), positions, inv_freq)
    k = apply_rope(L.split_heads(self.k_proj(h), self.kv_heads), positions, inv_freq)
    v = L.split_heads(self.v_proj(h), self.kv_heads)
    if kv is not None:
      kv = (L.write_cache(kv[0], k, layer, index), L.write_cache(kv[1], v, layer, index))
      k, v = L.cache_view(kv[0], layer), L.cache_view(kv[1], layer)
    x = x + self.o_proj(L.merge_heads(L.attention(q, k, v, mask)))
    h = self.post_attention_layernorm(x)
    x = x + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))
    return x, kv


class Llama(CausalLM):
  """Decoder trunk + LM head (tied or not; task causal_lm) or a score head (seq_cls)."""

  def __init__(self, cfg: Config, task: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config, self.task, self.dtype = cfg, task, dtype
    self.embed_tokens = L.Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
    self.layers = L.stacked(lambda r: Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                            cfg.num_hidden_layers, rngs)
    self.norm = L.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.lm_head = (L.Dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False, **kw)
                    if task == "causal_lm" and not cfg.tie_word_embeddings else None)
    self.score = (L.Dense(cfg.hidden_size, cfg.num_labels, ("embed", "labels"), use_bias=False, **kw)
                  if task == "seq_cls" else None)

  def _trunk(self, ids, positions, mask, cache=None, index=None):
    inv_freq = rope_inv_freq(self.config)  # a trace-time constant
    x = self.embed_tokens(ids)

    def layer(block, carry, i, _):
      x, kv = carry
      return block(L.activations(x), positions, inv_freq, mask, i, kv, index)

    x, cache = L.scan_layers(self.layers, layer, (x, cache), remat=self.remat)
    return self.norm(x), cache

  def head(self, hidden: jax.Array) -> jax.Array:
    """float32 logits from final hidden states."""
    if self.lm_head is None:
      return self.embed_tokens.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def _cache_shape(self, batch: int, max_len: int) -> tuple[int, ...]:
    c = self.config
    return (c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim)


def build(cfg: Config, task: str, *, dtype, param_dtype, rngs) -> Llama:
  return Llama(cfg, task, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def tensors(cfg: Config, task: str) -> list[Tensor]:
  p = "model."
  out = [Tensor(("embed_tokens", "embedding"), p + "embed_tokens.weight")]
  for i in range(cfg.num_hidden_layers):
    h, n = ("layers",), f"{p}layers.{i}."
    out += [Tensor(h + ("input_layernorm", "scale"), n + "input_layernorm.weight", layer=i),
            Tensor(h + ("post_attention_layernorm", "scale"), n + "post_attention_layernorm.weight", layer=i)]
    for name, bias in (("q_proj", cfg.qkv_bias), ("k_proj", cfg.qkv_bias), ("v_proj", cfg.qkv_bias),
                       ("o_proj", cfg.o_bias)):
      out.append(linear(h + (name, "kernel"), f"{n}self_attn.{name}.weight", layer=i))
      if bias:
        out.append(Tensor(h + (name, "bias"), f"{n}self_attn.{name}.bias", layer=i))
    for name in ("gate_proj", "up_proj", "down_proj"):
      out.append(linear(h + (name, "kernel"), f"{n}mlp.{name}.weight", layer=i))
      if cfg.mlp_bias:
        out.append(Tensor(h + (name, "bias"), f"{n}mlp.{name}.bias", layer=i))
  out.append(Tensor(("norm", "scale"), p + "norm.weight"))
  if task == "causal_lm" and not cfg.tie_word_embeddings:
    out.append(linear(("lm_head", "kernel"), "lm_head.weight"))
  if task == "seq_cls":
    out.append(linear(("score", "kernel"), "score.weight"))
  return out
