"""The in-graph word-count reward equals rewards.sentiment_words on decoded text."""

import jax
import numpy as np
import pytest

from rcfd_jax import rewards, words
from rcfd_jax.reproduce import corpus, tiny


@pytest.fixture(scope="module")
def tok():
  return tiny.train_tokenizer(corpus.pretraining_texts(400, 0), 600)


@pytest.fixture(scope="module")
def automaton(tok):
  return words.compile_tokens(words.lexicons()["sentiment"], tok)


def _python(tok, ids, mask):
  texts = tok.batch_decode(np.where(mask, ids, tok.pad_token_id), skip_special_tokens=True)
  return np.asarray(rewards.sentiment_words(None, texts, None), np.float32)


def test_byte_automaton_on_strings():
  lex = {"good": 1.0, "bad": -1.0, "goods": 2.0}
  nxt, score = words.byte_automaton(lex)

  def run(word):
    s = words.OPEN
    for b in word.encode():
      s = nxt[s, b]
    return score[s]

  cases = {"good": 1, "(Good.)": 1, "GOOD!!": 1, "goods": 2, "goodness": 0, "go.od": 0, "bad'": -1,
           "xbad": 0, "": 0, "...": 0, "'bad,": -1, "good.x": 0}
  for w, want in cases.items():
    assert run(w) == want, w


def test_matches_python_on_corpus_text(tok, automaton):
  texts = corpus.pretraining_texts(60, 3)
  texts += ["Good, GOOD. (bad) goodness bad!x  awful\n\tboring", "best", "  worst  ", "love loved lovely"]
  enc = tok(texts, padding="max_length", max_length=400, truncation=True, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"].astype(bool)
  got = np.asarray(jax.jit(lambda t, m: words.reward(automaton, t, m))(ids, mask))
  np.testing.assert_array_equal(got, _python(tok, ids, mask))
  assert np.abs(got).sum() > 10  # the corpus does hold lexicon words


def test_matches_python_on_random_tokens(tok, automaton):
  """Random token strings, as an untrained policy samples them: words split across tokens."""
  rng = np.random.default_rng(0)
  lex = sorted(words.lexicons()["sentiment"])
  pieces = [" ", ",", ".", "(", "'", "s", "ly", "\n"]

  def chunk():
    """A random token, or a lexicon word in a random case, spacing and BPE split."""
    if rng.random() < 0.5:
      return [int(rng.integers(len(tok)))]
    w = str(rng.choice(lex))
    w = w.upper() if rng.random() < 0.2 else w
    w = str(rng.choice(pieces)) + w if rng.random() < 0.5 else " " + w
    cut = int(rng.integers(0, len(w)))
    return tok.encode(w[:cut]) + tok.encode(w[cut:]) + (tok.encode(str(rng.choice(pieces))) if rng.random() < .5 else [])

  rows = []
  for _ in range(3000):
    row = []
    while len(row) < 24:
      row += chunk()
    rows.append(row[:24])
  ids = np.asarray(rows, np.int32)
  mask = np.arange(24)[None] < rng.integers(0, 25, (len(rows), 1))
  got = np.asarray(jax.jit(lambda t, m: words.reward(automaton, t, m))(ids, mask))
  want = _python(tok, ids, mask)
  np.testing.assert_array_equal(got, want)
  assert (want != 0).sum() > 100


def test_rewards_kind_in_graph(tok):
  r = rewards.build(_cfg(("words:sentiment", "length")), tok, None)
  assert not r.needs_host
  ids = tok(["a good and great film", "bad"], padding=True, return_tensors="np")["input_ids"]
  mask = ids != tok.pad_token_id
  out = r.in_graph(None, ids, mask, mask, np.zeros(ids.shape, np.float32))
  np.testing.assert_array_equal(np.asarray(out["words:sentiment"]), [2.0, -1.0])


def test_unknown_lexicon(tok):
  from rcfd_jax.errors import UserError
  with pytest.raises(UserError, match="lexicon"):
    rewards.build(_cfg(("words:nope",)), tok, None)


def _cfg(sources):
  from rcfd_jax import config
  c = config.base().reward
  c.sources = sources
  return c
