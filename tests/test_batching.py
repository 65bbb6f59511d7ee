"""Batches: the batch of step s from (seed, s, batch size), fixed shapes, epochs, process shares, resume."""

import json

import numpy as np
import pytest

from rcfd_jax import batching, prompts
from rcfd_jax.errors import UserError
from rcfd_jax.reproduce import corpus, tiny


@pytest.fixture(scope="module")
def tok():
  return tiny.train_tokenizer(corpus.pretraining_texts(300, seed=5), vocab_size=400)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory, tok):
  """45 continuation prompts of the synthetic corpus, of several lengths, and their data config."""
  cfg = prompts.default_data_config()
  cfg.path = str(corpus.write_corpus(tmp_path_factory.mktemp("corpus"), n_reviews=300, seed=0).reviews)
  cfg.update(dict(format="continuation", max_examples=45, prompt_tokens=6, max_prompt_tokens=9, demo_max_tokens=20))
  return cfg, prompts.load_prompts(cfg, tok)


def test_batcher_deterministic_fixed_shapes_and_padding(train_set, tok):
  cfg, ds = train_set
  a, b = batching.Batcher(ds, 8, cfg, tok.pad_token_id), batching.Batcher(ds, 8, cfg, tok.pad_token_id)
  for step in (0, 5, 11):
    x, y = a.batch(step), b.batch(step)
    np.testing.assert_array_equal(x.indices, y.indices)
    assert x.prompt_ids.shape == (8, 9) and x.demo_ids.shape == (8, 20)
    assert x.prompt_ids.dtype == np.int32
  x = a.batch(2)
  for row, i in enumerate(x.indices):
    p, d = ds.prompt_ids[i], ds.demo_ids[i]
    assert x.prompt_ids[row, 9 - len(p):].tolist() == p and x.prompt_mask[row].sum() == len(p)
    assert x.prompt_mask[row, 9 - len(p):].all() and (x.prompt_ids[row, :9 - len(p)] == 0).all()
    assert x.demo_ids[row, :len(d)].tolist() == d and x.demo_mask[row].sum() == len(d)
    assert x.demo_texts[row] == ds.demo_texts[i] and x.prompt_texts[row] == ds.prompt_texts[i]


def test_batcher_epochs_see_every_example_once_and_wrap(train_set, tok):
  cfg, ds = train_set  # 45 examples, batch 8: batch 5 straddles epochs 0 and 1
  b = batching.Batcher(ds, 8, cfg, tok.pad_token_id)
  stream = np.concatenate([b.batch(s).indices for s in range(12)])  # 96 = 2 epochs + 6
  for e in range(2):
    epoch = stream[45 * e:45 * (e + 1)]
    assert sorted(epoch.tolist()) == list(range(45))
    perm = np.random.default_rng([cfg.shuffle_seed, e]).permutation(45)
    np.testing.assert_array_equal(epoch, perm)
  assert not np.array_equal(stream[:45], stream[45:90])
  assert b.position(5) == batching.DataPosition(epoch=0, offset=40)
  assert b.position(6) == batching.DataPosition(epoch=1, offset=3) == b.batch(6).position


def test_batcher_process_shares_concatenate_to_global_batch(train_set, tok):
  cfg, ds = train_set
  b = batching.Batcher(ds, 8, cfg, tok.pad_token_id)
  for step in (0, 5):
    whole = b.batch(step)
    shares = [b.batch(step, p, 4) for p in range(4)]
    assert all(s.prompt_ids.shape == (2, 9) for s in shares)
    np.testing.assert_array_equal(np.concatenate([s.indices for s in shares]), whole.indices)
    np.testing.assert_array_equal(np.concatenate([s.demo_ids for s in shares]), whole.demo_ids)
  with pytest.raises(UserError, match="not divisible by the 3 processes"):
    b.batch(0, 0, 3)


def test_batcher_state_checks_resume(train_set, tok):
  cfg, ds = train_set
  b = batching.Batcher(ds, 8, cfg, tok.pad_token_id)
  saved = json.loads(json.dumps(b.state(7)))
  b.check_state(7, saved)
  with pytest.raises(UserError, match="global_batch_size 8 -> 4"):
    batching.Batcher(ds, 4, cfg, tok.pad_token_id).check_state(7, saved)
