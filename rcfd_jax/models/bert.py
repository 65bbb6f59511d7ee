"""BERT and DistilBERT sequence classifiers (reward models such as distilbert-imdb).

Both are post-LayerNorm encoders with learned absolute positions and
bidirectional attention; they differ in embeddings (BERT adds token-type 0),
in the head on the [CLS] hidden state (BERT: pooler dense + tanh, then the
classifier; DistilBERT: pre_classifier dense + ReLU, then the classifier) and
in their config.json and tensor names. One module serves both so the encoder
math lives in one place; `tensors` maps it to either checkpoint layout.

Inputs are right-padded, as these tokenizers pad: [CLS] sits at slot 0 and
positions are slot indices, exactly as transformers computes them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rcfd_jax.models import hf, layers as L
from rcfd_jax.models.hf import Tensor, dense, layer_norm

MODEL_TYPES = ("bert", "distilbert")
TASKS = ("seq_cls",)
PREFIXES = ("bert.", "distilbert.")

# DistilBERT's config.json names for the fields Config keeps in BERT's names.
_DISTIL_NAMES = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                 "intermediate_size": "hidden_dim", "hidden_act": "activation"}


@dataclasses.dataclass(frozen=True)
class Config:
  """The fields the math needs, in BERT's names for both model types."""
  model_type: str
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2           # 0 for DistilBERT, which has no token types
  layer_norm_eps: float = 1e-12      # DistilBERT hard-codes 1e-12
  sinusoidal_pos_embds: bool = False  # DistilBERT only; the table is still stored in the checkpoint
  pad_token_id: int | None = 0
  num_labels: int = 2
  labels: tuple[str, ...] = ()       # id2label names, kept so a saved reward model reads the same
  extra: tuple = ()                  # other config.json fields, written back unchanged

  @property
  def max_positions(self) -> int:
    return self.max_position_embeddings

  def to_hf(self, task: str) -> dict[str, Any]:
    del task  # only seq_cls exists
    d = dict(self.extra)
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "max_position_embeddings", "pad_token_id", "model_type")
    for k in keep:
      d[_DISTIL_NAMES.get(k, k) if self.model_type == "distilbert" else k] = getattr(self, k)
    if self.model_type == "distilbert":
      d["sinusoidal_pos_embds"] = self.sinusoidal_pos_embds
      d["architectures"] = ["DistilBertForSequenceClassification"]
    else:
      d.update(type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps,
               architectures=["BertForSequenceClassification"])
    names = self.labels or tuple(f"LABEL_{i}" for i in range(self.num_labels))
    d["num_labels"] = self.num_labels
    d["id2label"] = {str(i): n for i, n in enumerate(names)}
    d["label2id"] = {n: i for i, n in enumerate(names)}
    return d


def _labels(c: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
  """(num_labels, names) from config.json; id2label wins, as in transformers."""
  id2label = c.get("id2label") or {}
  if id2label:
    return len(id2label), tuple(id2label[k] for k in sorted(id2label, key=int))
  return c.get("num_labels") or 2, ()


def config_from_hf(c: dict[str, Any]) -> Config:
  distil = c["model_type"] == "distilbert"
  name = (lambda k: _DISTIL_NAMES.get(k, k)) if distil else (lambda k: k)
  used = {name(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                            "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
                            "layer_norm_eps", "sinusoidal_pos_embds", "pad_token_id", "model_type")}
  extra = hf.extra_fields(c, used)
  num_labels, labels = _labels(c)
  hidden = c[name("hidden_size")]
  return Config(
      model_type=c["model_type"], vocab_size=c["vocab_size"], hidden_size=hidden,
      num_hidden_layers=c[name("num_hidden_layers")], num_attention_heads=c[name("num_attention_heads")],
      intermediate_size=c.get(name("intermediate_size")) or 4 * hidden,
      hidden_act=c.get(name("hidden_act"), "gelu"),
      max_position_embeddings=c.get("max_position_embeddings", 512),
      type_vocab_size=0 if distil else c.get("type_vocab_size", 2),
      layer_norm_eps=1e-12 if distil else c.get("layer_norm_eps", 1e-12),
      sinusoidal_pos_embds=bool(c.get("sinusoidal_pos_embds", False)) if distil else False,
      pad_token_id=c.get("pad_token_id", 0), num_labels=num_labels, labels=labels, extra=extra)


def sinusoidal_table(n_pos: int, dim: int) -> np.ndarray:
  """DistilBERT's fixed position table: sin on even features, cos on odd ones."""
  pos = np.arange(n_pos, dtype=np.float64)[:, None]
  j = np.arange(dim)
  angle = pos / np.power(10000.0, 2 * (j // 2) / dim)
  return np.where(j % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


class EncoderLayer(nnx.Module):
  """Post-LN block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

  def __init__(self, cfg: Config, *, dtype, param_dtype, rngs):
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = L.Dense(d, d, ("embed", "heads"), **kw)
    self.k = L.Dense(d, d, ("embed", "heads"), **kw)
    self.v = L.Dense(d, d, ("embed", "heads"), **kw)
    self.o = L.Dense(d, d, ("heads", "embed"), **kw)
    self.attn_ln = L.LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
    self.fc1 = L.Dense(d, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.fc2 = L.Dense(cfg.intermediate_size, d, ("mlp", "embed"), **kw)
    self.ffn_ln = L.LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
    self.act = L.activation(cfg.hidden_act)
    self.heads = cfg.num_attention_heads

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    q, k, v = (L.split_heads(f(x), self.heads) for f in (self.q, self.k, self.v))
    a = L.attention(q, k, v, mask, scale=1.0 / math.sqrt(q.shape[-1]))
    x = self.attn_ln(x + self.o(L.merge_heads(a)))
    return self.ffn_ln(x + self.fc2(self.act(self.fc1(x))))


class EncoderClassifier(nnx.Module):
  """BERT / DistilBERT trunk with its [CLS] classification head."""

  def __init__(self, cfg: Config, task: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    d, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config, self.task, self.dtype = cfg, task, dtype
    self.word = L.Embed(cfg.vocab_size, d, ("vocab", "embed"), **kw)
    self.pos = L.Embed(cfg.max_position_embeddings, d, ("positions", "embed"), **kw)
    if cfg.sinusoidal_pos_embds:
      self.pos.embedding[...] = jnp.asarray(sinusoidal_table(cfg.max_position_embeddings, d), param_dtype)
    self.token_type = (L.Embed(cfg.type_vocab_size, d, ("positions", "embed"), **kw)
                       if cfg.type_vocab_size > 0 else None)
    self.emb_ln = L.LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
    self.layers = L.stacked(lambda r: EncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                            cfg.num_hidden_layers, rngs)
    # BERT's pooler (tanh) or DistilBERT's pre_classifier (ReLU): both [hidden, hidden] on [CLS].
    self.pool = L.Dense(d, d, ("embed", "mlp"), **kw)
    self.pool_act = jax.nn.relu if cfg.model_type == "distilbert" else jnp.tanh
    self.classifier = L.Dense(d, cfg.num_labels, ("mlp", "labels"), **kw)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """float32 [B, num_labels] logits for right-padded input_ids [B, T]."""
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    key_valid = attention_mask.astype(bool)
    x = self.word(input_ids) + self.pos(jnp.arange(t))[None]
    if self.token_type is not None:
      x = x + self.token_type(jnp.zeros((t,), jnp.int32))[None]
    x = self.emb_ln(x)
    # transformers masks keys only: padded query rows still attend to the real tokens.
    mask = jnp.broadcast_to(key_valid[:, None, :], (b, t, t))
    x = L.scan_layers(self.layers, lambda layer, x, i, _: layer(L.activations(x), mask), x)
    pooled = self.pool_act(self.pool(x[:, 0]))
    return self.classifier(pooled).astype(jnp.float32)


def build(cfg: Config, task: str, *, dtype, param_dtype, rngs) -> EncoderClassifier:
  return EncoderClassifier(cfg, task, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def tensors(cfg: Config, task: str) -> list[Tensor]:
  del task
  if cfg.model_type == "distilbert":
    p, emb = "distilbert.", "distilbert.embeddings."
    sub = dict(q="attention.q_lin", k="attention.k_lin", v="attention.v_lin", o="attention.out_lin",
               attn_ln="sa_layer_norm", fc1="ffn.lin1", fc2="ffn.lin2", ffn_ln="output_layer_norm")
    layer_prefix, head = p + "transformer.layer.", "pre_classifier"
  else:
    p, emb = "bert.", "bert.embeddings."
    sub = dict(q="attention.self.query", k="attention.self.key", v="attention.self.value",
               o="attention.output.dense", attn_ln="attention.output.LayerNorm", fc1="intermediate.dense",
               fc2="output.dense", ffn_ln="output.LayerNorm")
    layer_prefix, head = p + "encoder.layer.", "bert.pooler.dense"
  out = [Tensor(("word", "embedding"), emb + "word_embeddings.weight"),
         Tensor(("pos", "embedding"), emb + "position_embeddings.weight")]
  if cfg.type_vocab_size > 0:
    out.append(Tensor(("token_type", "embedding"), emb + "token_type_embeddings.weight"))
  out += layer_norm(("emb_ln",), emb + "LayerNorm")
  for i in range(cfg.num_hidden_layers):
    for ours, theirs in sub.items():
      make = layer_norm if ours.endswith("_ln") else dense
      out += make(("layers", ours), f"{layer_prefix}{i}.{theirs}", layer=i)
  out += dense(("pool",), head) + dense(("classifier",), "classifier")
  return out
