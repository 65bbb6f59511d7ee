"""The FLOPs each program must do: an analytic count from the models' shapes and the config.

A matmul of a [tokens, in] activation by an [in, out] weight is 2 * tokens *
in * out FLOPs. Per token and layer, W is the multiply-adds of the layer's
matmuls (read off the parameter shapes) and W_a those of its LoRA adapters;
A = heads * head_dim is the attention width; V the vocabulary, d the width.
Attention is causal for the decoders (the t-th of T positions attends to t
keys: 4 * A * t FLOPs per layer) and full for the encoder reward models (T
keys each). Only matmuls count (as in MFU); docs/tpu.md writes the formulas
out per program. With P prompt tokens, N new tokens, T = P + N, R = B * k
rollouts, L layers:

  forward(T, h)  = 2 T L (W + W_a) + 4 A L T (T + 1) / 2 + 2 d V h       (logits at h positions)
  rollout        = R [ prefill: forward(P, 1)
                       + decode: sum_{i=1}^{N-1} (2 L (W + W_a) + 4 A L (P + i) + 2 d V)
                       + reference: forward(T, N) without adapters (none when pi_0 samples:
                         rl.tilt_proposal=reference, whose sampler gives pi_0's log-probs)
                       + in-graph reward models ]
  update         = epochs * R [ forward(T, N) + backward + remat ]
      backward   = activation gradients through every matmul (2 T L W + 4 T L W_a, as much as the
                   forward again for the frozen base, twice for the adapters), attention gradients
                   (twice its forward), logits' gradient 2 d V N; full fine-tuning adds the weight
                   gradients (2 T L W + 2 d V N)
      remat      = config.model.remat: the layers' forward once more, 2 T L (W + W_a) + attention
  encoder RM     = rows [ 2 T L W + 4 A L T^2 + DeBERTa's relative terms + the [CLS] head ]
  demo_scoring   = rows [ forward(P + D, D) without adapters + in-graph reward models ]
"""

from __future__ import annotations

import math
from typing import Any

from flax import nnx

from rcfd_jax import sharding
from rcfd_jax.models import layers as L

_DECODERS = ("gpt2", "llama", "qwen2", "mistral")


def _dense_macs(module) -> dict[str, float]:
  """Multiply-adds per token of a module's Dense layers, by role: layers (all L), adapters, and heads."""
  out = {"layers": 0.0, "lora": 0.0}
  for path, node in nnx.iter_graph(module):
    if not isinstance(node, L.Dense):
      continue
    macs = math.prod(node.kernel.get_value().shape)
    stacked = (sharding.variable_names(node.kernel) or (None,))[0] == "layers"  # [L, in, out] (layers.stacked)
    key = "layers" if stacked else str(path[-1])
    out[key] = out.get(key, 0.0) + macs
    if node.lora_a is not None:
      out["lora"] += math.prod(node.lora_a.get_value().shape) + math.prod(node.lora_b.get_value().shape)
  return out


def _decoder(lm) -> dict[str, float]:
  """Width, layers, attention width, vocabulary-head and per-token layer multiply-adds of a causal LM."""
  c = lm.config
  macs = _dense_macs(lm)
  if c.model_type == "gpt2":
    d, layers, attn = c.n_embd, c.n_layer, c.n_embd
  else:
    d, layers, attn = c.hidden_size, c.num_hidden_layers, c.num_attention_heads * c.head_dim
  vocab = getattr(c, "vocab_size")
  return {"d": d, "L": layers, "A": attn, "W": macs["layers"] / layers, "Wa": macs["lora"] / layers,
          "head": d * vocab, "labels": d * getattr(c, "num_labels", 1)}


def _forward(m: dict, tokens: int, heads: int, adapters: bool = True, head_macs: float | None = None) -> float:
  """One row's forward over `tokens` positions with logits at `heads` of them (causal attention)."""
  w = m["W"] + (m["Wa"] if adapters else 0.0)
  return (2 * tokens * m["L"] * w + 4 * m["A"] * m["L"] * tokens * (tokens + 1) / 2
          + 2 * (m["head"] if head_macs is None else head_macs) * heads)


def _encoder(rm, tokens: int) -> float:
  """One row of an encoder reward model (BERT, DistilBERT, DeBERTa) over `tokens` positions."""
  c = rm.config
  macs = _dense_macs(rm)
  d, layers = c.hidden_size, c.num_hidden_layers
  flops = 2 * tokens * macs["layers"] + 4 * d * layers * tokens * tokens
  flops += 2 * tokens * macs.get("embed_proj", 0.0) + 2 * (macs.get("pool", 0.0) + macs.get("classifier", 0.0))
  terms = len(set(getattr(c, "pos_att_type", ()))) if getattr(c, "relative_attention", False) else 0
  flops += terms * 2 * tokens * 2 * getattr(c, "att_span", 0) * d * layers  # c2p / p2c scores
  return flops


def _encoder_per_call(rm) -> float:
  """Work of one encoder call that does not depend on the rows: DeBERTa projects its relative table."""
  c = rm.config
  terms = len(set(getattr(c, "pos_att_type", ()))) if getattr(c, "relative_attention", False) else 0
  return terms * 2 * 2 * getattr(c, "att_span", 0) * c.hidden_size ** 2 * c.num_hidden_layers


def _in_graph_rm(rewards, frozen_rm, tokens: int) -> float:
  """The in-graph reward model (a decoder sharing the policy's tokenizer) on one row."""
  c = rewards.classifier
  if c is None or not c.in_graph:
    return 0.0
  rm = _decoder(nnx.merge(c.graphdef, frozen_rm))
  return _forward(rm, tokens, 1, head_macs=rm["labels"])


def program_flops(config, t, progs: dict[str, Any], remat: bool | None = None) -> dict[str, float]:
  """name -> FLOPs the program must do (all devices together), for the programs of `progs`.

  t is the train.Trainer the programs were built from. remat defaults to
  config.model.remat; False leaves the recomputation out (what MFU counts).
  """
  remat = config.model.remat if remat is None else remat
  policy = t.parts.merge(t.parts.trainable, t.parts.frozen)
  m = _decoder(policy.lm)
  sc = t.sc
  b, p, n = config.rollout.prompts_per_step, config.data.max_prompt_tokens, sc.max_new_tokens
  total = p + n
  d_len, demo_rows = config.data.demo_max_tokens, config.reward.demo_batch_size
  full_ft = not t.parts.uses_lora

  def rollout_rows(k: int, from_reference: bool = False) -> float:
    """k rollouts a prompt; from_reference (rl.tilt_proposal=reference): pi_0 samples, its log-probs are the
    sampler's, so no reference forward runs and the decoder runs without adapters."""
    wa = 0.0 if from_reference else m["Wa"]
    prefill = _forward(m, p, 1, adapters=not from_reference)
    decode = sum(2 * m["L"] * (m["W"] + wa) + 4 * m["A"] * m["L"] * (p + i) + 2 * m["head"] for i in range(1, n))
    reference = 0.0 if from_reference else _forward(m, total, n, adapters=not t.parts.uses_lora)
    return b * k * (prefill + decode + reference + _in_graph_rm(t.rewards, t.frozen.rm, total))

  fwd = _forward(m, total, n)
  attention = 4 * m["A"] * m["L"] * total * (total + 1) / 2
  backward = 2 * total * m["L"] * m["W"] + 4 * total * m["L"] * m["Wa"] + 2 * attention + 2 * m["head"] * n
  if full_ft:
    backward += 2 * total * m["L"] * m["W"] + 2 * m["head"] * n
  remat = 2 * total * m["L"] * (m["W"] + m["Wa"]) + attention if remat else 0.0
  update = sc.ppo_epochs * b * sc.samples_per_prompt * (fwd + backward + remat)
  out = {"rollout": rollout_rows(sc.samples_per_prompt, sc.tilt_proposal == "reference"), "update": update,
         "eval_rollout": rollout_rows(1)}  # the evaluation samples the policy, whatever trains it
  out["iteration"] = out["rollout"] + out["update"]
  out["demo_scoring"] = demo_rows * (_forward(m, p + d_len, d_len, adapters=not t.parts.uses_lora)
                                     + _in_graph_rm(t.rewards, t.frozen.rm, p + d_len))
  c = t.rewards.classifier
  for name, prog in progs.items():
    if name.endswith("reward_model"):
      rm = nnx.merge(c.graphdef, c.state)
      rows, tokens = prog.args[1].shape
      if rm.config.model_type in _DECODERS:  # a decoder RM with a tokenizer of its own
        dims = _decoder(rm)
        out[name] = rows * _forward(dims, tokens, 1, head_macs=dims["labels"])
      else:
        out[name] = rows * _encoder(rm, tokens) + _encoder_per_call(rm)
  return {name: out[name] for name in progs}
