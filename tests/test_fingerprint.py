"""Content identities: when two tokenizers or two weight files count as the same, and what that keys."""

import json

from rcfd_jax import config as config_lib, fingerprint, rewards
from rcfd_jax.reproduce import corpus, tiny


def _tokenizer_pair():
  """A trained BPE tokenizer and a copy with the same vocabulary but one merge fewer."""
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast
  tok = tiny.train_tokenizer(corpus.pretraining_texts(100, 0), 400)
  spec = json.loads(tok.backend_tokenizer.to_str())
  spec["model"]["merges"] = spec["model"]["merges"][:-1]
  other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  pad_token=tiny.PAD, eos_token=tiny.EOS, unk_token=tiny.UNK)
  assert other.get_vocab() == tok.get_vocab()
  return tok, other


def test_same_vocabulary_other_merges_is_another_tokenizer():
  tok, other = _tokenizer_pair()
  assert fingerprint.tokenizer(tok) != fingerprint.tokenizer(other)
  # Calls that pad or truncate rewrite the backend's settings, not its ids: the identity stays.
  before = fingerprint.tokenizer(tok)
  tok(["a b", "a"], padding="max_length", max_length=8, truncation=True)
  assert fingerprint.tokenizer(tok) == before


def test_reward_model_runs_in_the_step_only_with_the_policys_full_tokenizer(tmp_path):
  tok, other = _tokenizer_pair()
  cfg = tiny.gpt2_config(len(tok), n_embd=16, n_layer=1, num_labels=2)
  c = config_lib.base().reward.classifier
  c.path = str(tiny.write_model_dir(tmp_path / "rm_same", cfg, tok))
  assert rewards.load_classifier(c, tok, mesh=None).in_graph
  c.path = str(tiny.write_model_dir(tmp_path / "rm_other_merges", cfg, other))
  assert not rewards.load_classifier(c, tok, mesh=None).in_graph


def test_file_digest_is_read_once_and_again_after_a_rewrite(tmp_path, monkeypatch):
  import hashlib
  f = tmp_path / "model.safetensors"
  f.write_bytes(b"weights v1")
  reads = []
  hash_bytes = fingerprint._hash_bytes
  monkeypatch.setattr(fingerprint, "_hash_bytes", lambda p: reads.append(p) or hash_bytes(p))
  memo = tmp_path / "memo"
  first = fingerprint.file_digest(f, memo)
  assert first == hashlib.sha256(b"weights v1").hexdigest()
  monkeypatch.setattr(fingerprint, "_memo", {})  # a new process: the memo file answers
  assert fingerprint.file_digest(f, memo) == first and len(reads) == 1
  f.write_bytes(b"weights v2")  # same size, new bytes
  assert fingerprint.file_digest(f, memo) == hashlib.sha256(b"weights v2").hexdigest()
  assert len(reads) == 2


def test_reward_model_retrained_in_place_changes_the_demonstration_rewards(tiny_assets, tmp_path):
  """Same shapes, same config, same file size: the cached R(x, y_d) must not be reused."""
  import shutil
  import sys
  from pathlib import Path

  import numpy as np
  from safetensors.numpy import load_file, save_file

  from rcfd_jax import train
  sys.path.insert(0, str(Path(__file__).parent))
  from test_train import tiny_config
  rm = tmp_path / "rm"
  shutil.copytree(Path(tiny_assets) / "reward_model", rm)
  c = tiny_config(tiny_assets, tmp_path / "cache", **{"reward.classifier.path": str(rm),
                                                      "reward.sources": ("classifier",)})
  before = train.build(c, tmp_path / "unused")[0].demo_train
  weights = rm / "model.safetensors"
  size = weights.stat().st_size
  tensors = load_file(str(weights))
  rng = np.random.default_rng(0)
  save_file({k: v + rng.normal(0, 0.5, v.shape).astype(v.dtype) for k, v in tensors.items()},
            str(weights), metadata={"format": "pt"})
  assert weights.stat().st_size == size
  after = train.build(c, tmp_path / "unused")[0].demo_train
  assert not np.allclose(before, after)
