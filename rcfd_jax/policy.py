"""The policy being trained: a causal LM, optional LoRA adapters, optional value head.

The trainer works on pure state: `split` returns the static graph and two
states, the trainable one (LoRA adapters, or every weight for full
fine-tuning, plus the value head) and the frozen one (base weights under
LoRA, nothing otherwise). The reference policy pi_0 is:
  - with LoRA: the same graph with every adapter set to zero, evaluated on
    the frozen base weights, so no second copy of the model is held;
  - with full fine-tuning: a frozen copy of the initial weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rcfd_jax import sharding
from rcfd_jax.models import hf
from rcfd_jax.models import layers as L
from rcfd_jax.models import lora


def load_tokenizer(path: str):
  """The policy's tokenizer: prompts padded on the left, with EOS as the pad where it has none."""
  tok = hf.load_tokenizer(path)
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token  # generation pads after EOS; masks make the id irrelevant
  tok.padding_side = "left"
  return tok


class Policy(nnx.Module):
  """A causal LM with an optional scalar value head on its final hidden states."""

  def __init__(self, lm: nnx.Module, hidden_size: int, *, value_head: bool, rngs: nnx.Rngs):
    self.lm = lm
    self.value = (L.Dense(hidden_size, 1, ("embed", None), init_std=0.0, rngs=rngs)
                  if value_head else None)

  def completion_outputs(self, seq_ids, seq_mask, prompt_len: int):
    """Log-prob inputs for completion tokens of [B, P+N] sequences.

    Returns (logits_bnv float32 predicting tokens P..P+N-1, values_bn or None).
    The vocabulary projection runs only on the N completion positions.
    """
    positions = L.positions_from_mask(seq_mask)
    _, hidden = self.lm(seq_ids, seq_mask, positions=positions, return_hidden=True)
    h = hidden[:, prompt_len - 1:-1]
    logits = self.lm.head(h)
    values = self.value(h)[..., 0].astype(jnp.float32) if self.value is not None else None
    return logits, values


def hidden_size(lm: nnx.Module) -> int:
  """Width of the LM's final hidden states, read off an abstract forward pass."""
  ids = jnp.zeros((1, 2), jnp.int32)
  _, hidden = nnx.eval_shape(lambda m: m(ids, return_hidden=True), lm)
  return hidden.shape[-1]


@dataclasses.dataclass(frozen=True)
class PolicyParts:
  """Static graph plus the trainable and frozen states of a Policy."""
  graphdef: Any
  trainable: nnx.State
  frozen: nnx.State
  uses_lora: bool

  def merge(self, trainable: nnx.State, frozen: nnx.State) -> Policy:
    return nnx.merge(self.graphdef, trainable, frozen)

  def reference(self, trainable: nnx.State, frozen: nnx.State, ref_frozen: nnx.State | None) -> Policy:
    """pi_0: adapters zeroed under LoRA, the initial weights otherwise."""
    if self.uses_lora:
      return nnx.merge(self.graphdef, lora.without_adapters(trainable), frozen)
    return nnx.merge(self.graphdef, ref_frozen, frozen)


def trainable_filter(uses_lora: bool):
  """Which variables the optimizer updates."""
  if uses_lora:
    return nnx.Any(nnx.LoRAParam, nnx.PathContains("value"))
  return nnx.Param


def build(lm: nnx.Module, config, *, value_head: bool, mesh) -> tuple[PolicyParts, nnx.State | None]:
  """Wraps a loaded LM as a Policy per config.model.lora; returns parts and pi_0 state.

  The second result is the frozen copy of the initial trainable weights that
  full fine-tuning needs for its reference policy (None under LoRA).
  """
  rngs = nnx.Rngs(config.seed)
  lm.remat = bool(config.model.remat)
  uses_lora = config.model.lora.rank > 0
  if uses_lora:
    lora.apply(lm, rank=config.model.lora.rank, alpha=config.model.lora.alpha,
               targets=tuple(config.model.lora.targets), rngs=rngs)
  with nnx.use_eager_sharding(False):  # placed with its logical sharding just below
    policy = Policy(lm, hidden_size(lm), value_head=value_head, rngs=rngs)
  graphdef, trainable, frozen = nnx.split(policy, trainable_filter(uses_lora), ...)
  # Newly added variables (adapters, value head) are placed with their logical sharding; beside
  # an abstract LM (models.load_abstract) they stay abstract.
  shardings = sharding.state_shardings(trainable, mesh)
  if sharding.is_abstract((trainable, frozen)):
    trainable = sharding.abstract(trainable, shardings)
  else:
    trainable = jax.device_put(trainable, shardings)
  parts = PolicyParts(graphdef, trainable, frozen, uses_lora)
  ref = None if uses_lora else sharding.run_placed(lambda t: jax.tree.map(jnp.copy, t), shardings, trainable)
  return parts, ref


def count(state: nnx.State) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
