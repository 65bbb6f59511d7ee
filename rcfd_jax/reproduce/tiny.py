"""Small tokenizers and model directories the project builds itself.

CPU runs, tests and the paper reproduction never touch a hub: they train a
byte-level BPE tokenizer on local text and write randomly initialised
Hugging Face model directories (config.json, model.safetensors, tokenizer)
that load through the same path as any downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import jax.numpy as jnp

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
  """A byte-level BPE tokenizer (transformers fast tokenizer) trained on `texts`.

  pad is id 0, eos id 1; left padding, as generation wants.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(texts), trainer=trainer)
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left")


def gpt2_config(vocab_size: int, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                n_positions: int = 256, num_labels: int | None = None) -> dict[str, Any]:
  """config.json of a small GPT-2 (pad 0, eos 1 as train_tokenizer makes them)."""
  cfg = dict(model_type="gpt2", vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
             n_layer=n_layer, n_head=n_head, n_inner=4 * n_embd, activation_function="gelu_new",
             layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=1, pad_token_id=0,
             architectures=["GPT2LMHeadModel"])
  if num_labels:
    cfg.update(architectures=["GPT2ForSequenceClassification"], num_labels=num_labels)
  return cfg


def write_model_dir(out_dir: str | Path, hf_config: dict[str, Any], tokenizer=None, seed: int = 0,
                    mesh=None) -> Path:
  """Builds a random model for `hf_config` and saves it (with the tokenizer) as a HF directory."""
  from rcfd_jax import models
  model = models.build(hf_config, dtype=jnp.float32, mesh=mesh, seed=seed)
  return models.save_pretrained(model, out_dir, tokenizer=tokenizer)
