"""The synthetic review corpus: deterministic, balanced, varied, graded."""

import collections
import json
import re
import time

import numpy as np
import pytest

from rcfd_jax.reproduce import corpus


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


# ----------------------------------------------------------------------------- the voiced regime


@pytest.fixture(scope="module")
def voiced():
  return corpus.generate_reviews(4000, seed=0, regime="voiced")


def _opening(r):
  """(rating, title line, body sentences) of a voiced review."""
  rating, _, rest = r["text"].partition("/10 ")
  title, *body = re.split(r"(?<=[.!])\s", rest)
  return int(rating), title, body


def test_voiced_same_seed_same_bytes(tmp_path):
  a = corpus.write_corpus(tmp_path / "a", n_reviews=300, seed=3, regime="voiced").reviews.read_bytes()
  b = corpus.write_corpus(tmp_path / "b", n_reviews=300, seed=3, regime="voiced").reviews.read_bytes()
  plain = corpus.write_corpus(tmp_path / "c", n_reviews=300, seed=3).reviews.read_bytes()
  assert a == b and a != plain
  rows = [json.loads(line) for line in a.decode("utf-8").splitlines()]
  assert set(rows[0]) == {"text", "label", "score", "rating", "register", "intensity"}
  assert corpus.pretraining_texts(300, seed=3, regime="voiced") == [r["text"] for r in rows]


def test_voiced_labels_follow_the_score(voiced):
  counts = collections.Counter(r["label"] for r in voiced)
  assert abs(counts["positive"] - counts["negative"]) < 0.05 * len(voiced) and counts["mixed"] > 0
  for r in voiced:
    band = corpus._MIXED_BAND  # pylint: disable=protected-access
    assert r["label"] == ("positive" if r["score"] > band else "negative" if r["score"] < -band else "mixed")
  pos = np.array([r["score"] for r in voiced if r["label"] == "positive"])
  assert pos.std() > 0.5  # graded within a label, so the classifier's logit spreads too


def test_rating_and_title_state_the_verdict(voiced):
  ratings = np.array([_opening(r)[0] for r in voiced])
  assert (ratings == [r["rating"] for r in voiced]).all() and set(ratings) == set(range(1, 11))
  assert np.corrcoef(ratings, [r["score"] for r in voiced])[0, 1] > 0.9
  level = {w: lv for table in (corpus.ELABORATE_ADJECTIVES, corpus.TERSE_ADJECTIVES) for lv, ws in table.items()
           for w in ws}
  for r in voiced:
    rating, title, _ = _opening(r)
    if rating in (5, 6):
      continue
    words = [w.strip(".!:,").lower() for w in title.split()]
    graded = [level[w] for w in words if w in level]
    sign = np.sign(graded[0])  # titles state the verdict without negations
    assert sign == np.sign(rating - 5.5), (rating, title)


def test_voice_shows_in_the_opening_and_persists(voiced):
  by = collections.defaultdict(list)
  for r in voiced:
    _, title, body = _opening(r)
    by[r["register"]].append((title, body))
  # The title line already tells the register apart...
  assert all(len(t.split()) <= 3 for t, _ in by["terse"])
  assert all(t.split()[0] in ("A", "An") and ":" not in t for t, _ in by["plain"])
  assert all(re.match(r"^[A-Z]\w* [A-Z]\w+: ", t) for t, _ in by["elaborate"])
  # ...and the body keeps it: short formulaic sentences, or long ones full of names and places.
  words = {k: [len(s.split()) for _, body in v for s in body] for k, v in by.items()}
  assert max(words["terse"]) <= 5 and min(words["elaborate"]) >= 15
  assert np.mean(words["terse"]) < np.mean(words["plain"]) < np.mean(words["elaborate"])
  terse_vocab = {w.strip(".!,").lower() for t, body in by["terse"] for s in [t, *body] for w in s.split()}
  assert len(terse_vocab) < 120 < len({w for t, b in by["elaborate"] for s in b for w in s.split()})
  # Intensity: a reviewer's intensifiers are their own, from the title to the last sentence.
  strong_only = {"incredibly", "extremely", "absolutely", "so", "really"}
  mild_only = {"fairly", "rather", "pretty", "quite"}
  for r in voiced:
    used = set(r["text"].lower().replace(".", " ").replace("!", " ").split())
    if r["intensity"] == "mild":
      assert not used & strong_only, r["text"]
    if r["intensity"] == "strong":
      assert not used & mild_only, r["text"]


def test_voiced_fast():
  start = time.perf_counter()
  corpus.generate_reviews(20000, seed=1, regime="voiced")
  assert time.perf_counter() - start < 2.0
