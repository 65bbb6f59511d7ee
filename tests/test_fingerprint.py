"""Content identities: what two tokenizers, two weight files or two reward functions share or not."""

import json

from rcfd_jax import config as config_lib, corpus, fingerprint, rewards, tiny


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
