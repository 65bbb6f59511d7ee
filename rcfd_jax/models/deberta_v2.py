"""DeBERTa-v2 / v3 sequence classifiers (e.g. OpenAssistant/reward-model-deberta-v3-large-v2).

A post-LN encoder whose attention adds two disentangled terms to the
content score q.k: content-to-position (c2p, the query against embeddings
of the relative distance) and position-to-content (p2c, the key against
them). Relative distances are bucketed, exactly within +-position_buckets/2
and logarithmically beyond, and index a shared table of 2 * span
embeddings that is LayerNorm-ed once per forward (norm_rel_ebd). With
share_att_key the content q/k projections also project those embeddings.
v3 has no absolute positions (position_biased_input=False) and no token types.

The math follows transformers v5's modeling_deberta_v2.py: every term is
divided by sqrt(head_dim * (1 + number of position terms)); buckets are
computed in float32 as torch does; padding is a [T, S] mask built from the
2-D attention mask on both queries and keys, and padded positions of the
embedding output are zeroed. The v2-xlarge convolution (conv_kernel_size)
and z_steps are not implemented; configs that need them are refused.
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
from rcfd_jax.models.hf import Tensor, dense, layer_norm, linear

MODEL_TYPES = ("deberta-v2",)
TASKS = ("seq_cls",)
PREFIXES = ("deberta.",)

_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
           "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
           "relative_attention", "max_relative_positions", "position_buckets", "position_biased_input",
           "pos_att_type", "share_att_key", "norm_rel_ebd", "embedding_size", "pooler_hidden_size",
           "pooler_hidden_act", "pad_token_id", "model_type")


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 0
  layer_norm_eps: float = 1e-7
  relative_attention: bool = False
  max_relative_positions: int = -1      # < 1 means max_position_embeddings
  position_buckets: int = -1            # <= 0 means no log buckets
  position_biased_input: bool = True    # absolute position embeddings added to the input
  pos_att_type: tuple[str, ...] = ()    # subset of ("c2p", "p2c")
  share_att_key: bool = False
  norm_rel_ebd: str = "none"            # "layer_norm" normalises the relative table
  embedding_size: int | None = None     # != hidden_size adds a bias-free embed_proj
  pooler_hidden_size: int | None = None
  pooler_hidden_act: str = "gelu"
  pad_token_id: int | None = 0
  num_labels: int = 2
  labels: tuple[str, ...] = ()          # id2label names
  model_type: str = "deberta-v2"
  extra: tuple = ()                     # other config.json fields, written back unchanged

  @property
  def max_positions(self) -> int:
    return self.max_position_embeddings

  @property
  def rel_max(self) -> int:
    """The max_position of the bucket function, after transformers' fallback."""
    return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

  @property
  def att_span(self) -> int:
    """Half the size of the relative embedding table."""
    return self.position_buckets if self.position_buckets > 0 else self.rel_max

  @property
  def norm_rel(self) -> bool:
    return "layer_norm" in [x.strip() for x in self.norm_rel_ebd.lower().split("|")]

  def to_hf(self, task: str) -> dict[str, Any]:
    del task
    d = dict(self.extra)
    d.update({k: getattr(self, k) for k in _FIELDS})
    d["pos_att_type"] = list(self.pos_att_type)
    d["embedding_size"] = self.embedding_size or self.hidden_size
    d["pooler_hidden_size"] = self.pooler_hidden_size or self.hidden_size
    d["architectures"] = ["DebertaV2ForSequenceClassification"]
    names = self.labels or tuple(f"LABEL_{i}" for i in range(self.num_labels))
    d["num_labels"] = self.num_labels
    d["id2label"] = {str(i): n for i, n in enumerate(names)}
    d["label2id"] = {n: i for i, n in enumerate(names)}
    return d


def config_from_hf(c: dict[str, Any]) -> Config:
  if (c.get("conv_kernel_size") or 0) > 0:
    raise UserError("DeBERTa-v2 checkpoints with conv_kernel_size > 0 (v2-xlarge style) are not supported; "
                    "use a DeBERTa-v3 checkpoint")
  if c.get("hidden_size") != (c.get("pooler_hidden_size") or c.get("hidden_size")):
    raise UserError("DeBERTa-v2 pooler_hidden_size must equal hidden_size")
  pos_att = c.get("pos_att_type") or ()
  if isinstance(pos_att, str):
    pos_att = pos_att.lower().split("|")
  pos_att = tuple(x.strip() for x in pos_att)
  if set(pos_att) - {"c2p", "p2c"}:
    raise UserError(f"DeBERTa-v2 pos_att_type {list(pos_att)} may only hold 'c2p' and 'p2c'")
  id2label = c.get("id2label") or {}
  labels = tuple(id2label[k] for k in sorted(id2label, key=int))
  extra = hf.extra_fields(c, _FIELDS)
  fields = {k: c[k] for k in _FIELDS if k in c and k != "pos_att_type"}
  return Config(**fields, pos_att_type=pos_att, num_labels=len(labels) or c.get("num_labels") or 2,
                labels=labels, extra=extra)


def relative_buckets(t: int, bucket_size: int, max_position: int) -> np.ndarray:
  """[T, T] int32 relative position (query - key), log-bucketed like transformers.

  Distances inside +-bucket_size/2 are kept; larger ones map to
  mid + ceil(log(|d|/mid) / log((max_position-1)/mid) * (mid-1)), signed.
  Done in float32 with numpy at trace time (T is static), which matches
  torch's float32 ceil at the bucket edges.
  """
  rel = np.arange(t)[:, None] - np.arange(t)[None, :]
  if bucket_size <= 0 or max_position <= 0:
    return rel.astype(np.int32)
  mid = bucket_size // 2
  abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel)).astype(np.float32)
  denom = np.log(np.float32((max_position - 1) / mid), dtype=np.float32)
  ratio = np.log(abs_pos / np.float32(mid), dtype=np.float32) / denom
  log_pos = np.ceil(ratio * np.float32(mid - 1)) + np.float32(mid)
  bucket = np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * np.sign(rel).astype(np.float32))
  return bucket.astype(np.int32)


class DisentangledAttention(nnx.Module):
  """Self-attention with c2p / p2c relative-position terms."""

  def __init__(self, cfg: Config, *, dtype, param_dtype, rngs):
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query_proj = L.Dense(d, d, ("embed", "heads"), **kw)
    self.key_proj = L.Dense(d, d, ("embed", "heads"), **kw)
    self.value_proj = L.Dense(d, d, ("embed", "heads"), **kw)
    separate = cfg.relative_attention and not cfg.share_att_key
    self.pos_key_proj = (L.Dense(d, d, ("embed", "heads"), **kw)
                         if separate and "c2p" in cfg.pos_att_type else None)
    self.pos_query_proj = (L.Dense(d, d, ("embed", "heads"), **kw)
                           if separate and "p2c" in cfg.pos_att_type else None)
    self.heads = cfg.num_attention_heads
    self.relative = cfg.relative_attention
    self.pos_att_type = cfg.pos_att_type
    self.span = cfg.att_span
    self.scale_factor = 1 + len(set(cfg.pos_att_type))

  def __call__(self, x: jax.Array, mask: jax.Array, rel_pos: np.ndarray | None,
               rel_emb: jax.Array | None) -> jax.Array:
    q, k, v = (L.split_heads(f(x), self.heads) for f in (self.query_proj, self.key_proj, self.value_proj))
    scale = math.sqrt(q.shape[-1] * self.scale_factor)
    scores = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / scale
    if self.relative:
      scores = scores + self._position_scores(q, k, rel_pos, rel_emb) / scale
    # As transformers: masked scores become float32 min, so a fully padded query row is uniform.
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return L.merge_heads(jnp.einsum("bhts,bshd->bthd", probs, v))

  def _position_scores(self, q, k, rel_pos, rel_emb) -> jax.Array:
    """Unscaled c2p + p2c terms, [B, H, T, S] float32."""
    t = q.shape[1]
    rows = np.arange(t)[:, None]
    rel_emb = rel_emb[None]  # [1, 2 * span, hidden] for the Dense layers
    out = jnp.zeros((), jnp.float32)
    if "c2p" in self.pos_att_type:
      proj = self.key_proj if self.pos_key_proj is None else self.pos_key_proj
      pos_k = L.split_heads(proj(rel_emb), self.heads)[0]              # [2span, H, D]
      c2p = jnp.einsum("bthd,rhd->bhtr", q, pos_k).astype(jnp.float32)
      idx = np.clip(rel_pos + self.span, 0, 2 * self.span - 1)        # [T, S]
      out = out + c2p[:, :, rows, idx]
    if "p2c" in self.pos_att_type:
      proj = self.query_proj if self.pos_query_proj is None else self.pos_query_proj
      pos_q = L.split_heads(proj(rel_emb), self.heads)[0]
      p2c = jnp.einsum("bshd,rhd->bhsr", k, pos_q).astype(jnp.float32)
      idx = np.clip(-rel_pos + self.span, 0, 2 * self.span - 1)       # indexed [key, query]
      out = out + jnp.swapaxes(p2c[:, :, rows, idx], -1, -2)
    return out


class Layer(nnx.Module):
  """x = LN(x + W_o attn(x)); x = LN(x + ffn(x))."""

  def __init__(self, cfg: Config, *, dtype, param_dtype, rngs):
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn = DisentangledAttention(cfg, **kw)
    self.attn_out = L.Dense(d, d, ("heads", "embed"), **kw)
    self.attn_ln = L.LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
    self.fc1 = L.Dense(d, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.fc2 = L.Dense(cfg.intermediate_size, d, ("mlp", "embed"), **kw)
    self.ffn_ln = L.LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
    self.act = L.activation(cfg.hidden_act)

  def __call__(self, x, mask, rel_pos, rel_emb):
    x = self.attn_ln(x + self.attn_out(self.attn(x, mask, rel_pos, rel_emb)))
    return self.ffn_ln(x + self.fc2(self.act(self.fc1(x))))


class DebertaV2Classifier(nnx.Module):
  """Embeddings, disentangled-attention encoder, ContextPooler on [CLS], classifier."""

  def __init__(self, cfg: Config, task: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    e = cfg.embedding_size or d
    self.config, self.task, self.dtype = cfg, task, dtype
    self.word = L.Embed(cfg.vocab_size, e, ("vocab", "embed"), **kw)
    self.pos = (L.Embed(cfg.max_position_embeddings, e, ("positions", "embed"), **kw)
                if cfg.position_biased_input else None)
    self.token_type = (L.Embed(cfg.type_vocab_size, e, ("positions", "embed"), **kw)
                       if cfg.type_vocab_size > 0 else None)
    self.embed_proj = L.Dense(e, d, ("mlp", "embed"), use_bias=False, **kw) if e != d else None
    self.emb_ln = L.LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
    self.layers = L.stacked(lambda r: Layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                            cfg.num_hidden_layers, rngs)
    self.rel_embeddings = (L.Embed(2 * cfg.att_span, d, ("buckets", "embed"), **kw)
                           if cfg.relative_attention else None)
    self.rel_ln = (L.LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
                   if cfg.relative_attention and cfg.norm_rel else None)
    self.pool = L.Dense(d, d, ("embed", "mlp"), **kw)
    self.pool_act = L.activation(cfg.pooler_hidden_act)
    self.classifier = L.Dense(d, cfg.num_labels, ("mlp", "labels"), **kw)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """float32 [B, num_labels] scores for right-padded input_ids [B, T]."""
    cfg = self.config
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    valid = attention_mask.astype(bool)
    x = self.word(input_ids)
    if self.pos is not None:
      x = x + self.pos(jnp.arange(t))[None]
    if self.token_type is not None:
      x = x + self.token_type(jnp.zeros((t,), jnp.int32))[None]
    if self.embed_proj is not None:
      x = self.embed_proj(x)
    x = self.emb_ln(x) * valid[..., None].astype(self.dtype)
    mask = valid[:, :, None] & valid[:, None, :]
    rel_pos = rel_emb = None
    if self.rel_embeddings is not None:
      rel_pos = relative_buckets(t, cfg.position_buckets, cfg.rel_max)
      rel_emb = self.rel_embeddings.embedding[...].astype(self.dtype)
      if self.rel_ln is not None:
        rel_emb = self.rel_ln(rel_emb)
    x = L.scan_layers(self.layers, lambda layer, x, i, _: layer(L.activations(x), mask, rel_pos, rel_emb), x)
    pooled = self.pool_act(self.pool(x[:, 0]))
    return self.classifier(pooled).astype(jnp.float32)


def build(cfg: Config, task: str, *, dtype, param_dtype, rngs) -> DebertaV2Classifier:
  return DebertaV2Classifier(cfg, task, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def tensors(cfg: Config, task: str) -> list[Tensor]:
  del task
  emb, enc = "deberta.embeddings.", "deberta.encoder."
  out = [Tensor(("word", "embedding"), emb + "word_embeddings.weight")]
  if cfg.position_biased_input:
    out.append(Tensor(("pos", "embedding"), emb + "position_embeddings.weight"))
  if cfg.type_vocab_size > 0:
    out.append(Tensor(("token_type", "embedding"), emb + "token_type_embeddings.weight"))
  if (cfg.embedding_size or cfg.hidden_size) != cfg.hidden_size:
    out.append(linear(("embed_proj", "kernel"), emb + "embed_proj.weight"))
  out += layer_norm(("emb_ln",), emb + "LayerNorm")
  separate = cfg.relative_attention and not cfg.share_att_key
  for i in range(cfg.num_hidden_layers):
    h, n = ("layers",), f"{enc}layer.{i}."
    for proj in ("query_proj", "key_proj", "value_proj"):
      out += dense(h + ("attn", proj), n + "attention.self." + proj, i)
    if separate and "c2p" in cfg.pos_att_type:
      out += dense(h + ("attn", "pos_key_proj"), n + "attention.self.pos_key_proj", i)
    if separate and "p2c" in cfg.pos_att_type:
      out += dense(h + ("attn", "pos_query_proj"), n + "attention.self.pos_query_proj", i)
    out += dense(h + ("attn_out",), n + "attention.output.dense", i)
    out += layer_norm(h + ("attn_ln",), n + "attention.output.LayerNorm", i)
    out += dense(h + ("fc1",), n + "intermediate.dense", i) + dense(h + ("fc2",), n + "output.dense", i)
    out += layer_norm(h + ("ffn_ln",), n + "output.LayerNorm", i)
  if cfg.relative_attention:
    out.append(Tensor(("rel_embeddings", "embedding"), enc + "rel_embeddings.weight"))
    if cfg.norm_rel:
      out += layer_norm(("rel_ln",), enc + "LayerNorm")
  out += dense(("pool",), "pooler.dense") + dense(("classifier",), "classifier")
  return out
