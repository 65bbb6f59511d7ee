"""The synthetic review corpus: deterministic, balanced, varied, graded."""

import collections
import json
import time

import numpy as np
import pytest

from rcfd_jax import corpus


@pytest.fixture(scope="module")
def reviews():
  return corpus.generate_reviews(4000, seed=0)


def _distinct_2(texts):
  bigrams, total = set(), 0
  for t in texts:
    words = t.split()
    bigrams.update(zip(words, words[1:]))
    total += max(len(words) - 1, 0)
  return len(bigrams) / total


def test_same_seed_same_bytes(tmp_path):
  a = corpus.write_corpus(tmp_path / "a", n_reviews=500, seed=3).reviews.read_bytes()
  b = corpus.write_corpus(tmp_path / "b", n_reviews=500, seed=3).reviews.read_bytes()
  c = corpus.write_corpus(tmp_path / "c", n_reviews=500, seed=4).reviews.read_bytes()
  assert a == b and a != c
  rows = [json.loads(line) for line in a.decode("utf-8").splitlines()]
  assert len(rows) == 500 and set(rows[0]) == {"text", "label", "score"}
  assert corpus.pretraining_texts(500, seed=3) == [r["text"] for r in rows]


def test_labels_balanced_and_consistent(reviews):
  counts = collections.Counter(r["label"] for r in reviews)
  assert set(counts) == {"positive", "negative", "mixed"}
  # Positive and negative near 45% each; a few mixed reviews so the sentiment is graded.
  assert abs(counts["positive"] - counts["negative"]) < 0.05 * len(reviews)
  assert 0.05 < counts["mixed"] / len(reviews) < 0.2
  for r in reviews:  # the label follows from the text's score, never contradicts it
    assert (r["score"] > 0) == (r["label"] == "positive") or r["label"] == "mixed"


def test_sentiment_is_graded_not_two_spikes(reviews):
  pos = np.array([r["score"] for r in reviews if r["label"] == "positive"])
  # Within one label the score spreads over a wide range: a classifier's logit will too.
  assert pos.std() > 0.5 and np.percentile(pos, 90) - np.percentile(pos, 10) > 1.5
  assert len({round(s, 1) for s in pos}) > 20


def test_vocabulary_and_variety(reviews):
  texts = [r["text"] for r in reviews]
  words = {w.strip(".,:").lower() for t in texts for w in t.split()}
  assert len(words) > 500
  assert len(set(texts)) > 0.99 * len(texts)
  lengths = [t.count(". ") + 1 for t in texts]
  assert min(lengths) >= 2 and max(lengths) >= 5
  # distinct-2 over 200 reviews (the size of an evaluation batch of generations). The
  # grammar gives ~0.37; degenerate RL text ("beautifully beautifully ...") falls below 0.1,
  # so 0.3 leaves the reproduction a clear gap between natural and collapsed text.
  assert _distinct_2(texts[:200]) > 0.3


def test_fast():
  start = time.perf_counter()
  corpus.generate_reviews(20000, seed=1)
  assert time.perf_counter() - start < 2.0
