"""demos: the demonstration-reward cache (its key, its reads and atomic writes) without scoring anything.

`score` runs the compiled demo_scoring program and is exercised by every
training test; here it is replaced by a counting stand-in, so the cache
logic is checked directly and nothing compiles.
"""

import dataclasses
import errno
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import load_config
from rcfd_jax import demos, prompts, rewards as rewards_lib, words


def _dataset(n: int, fingerprint: str) -> prompts.PromptDataset:
  return prompts.PromptDataset(prompt_ids=[[5, 6]] * n, prompt_texts=["p"] * n, demo_texts=["d"] * n,
                            demo_ids=[[7, 2]] * n, extras=[{}] * n, fingerprint=fingerprint)


def _rewards(sources=("classifier", "loglik"), classifier=None, function=None) -> rewards_lib.Rewards:
  parsed = rewards_lib.parse_sources(sources)
  automata = {s.name: None for s in parsed if s.kind == "words"}  # cache_key reads only the names
  return rewards_lib.Rewards(parsed, classifier, function, automata)


def _classifier(model_dir: Path, **changes) -> rewards_lib.Classifier:
  """A Classifier with the fields cache_key reads (no weights loaded)."""
  c = rewards_lib.Classifier(graphdef=None, state=None, tokenizer=None, in_graph=True, label_index=1,
                             max_tokens=64, input="concat", model_dir=model_dir, tokenizer_fp="tokenizer-0")
  return dataclasses.replace(c, **changes)


@dataclasses.dataclass
class Tok:
  eos_token_id: int = 2


def _other_function(prompts, completions, rows):  # a reward defined in another module than sentiment_words
  return [0.0] * len(completions)


def _copy_with_new_weights(src: Path, dst: Path) -> Path:
  """A copy of model directory `src` whose weight file differs in its last byte (same size)."""
  shutil.copytree(src, dst)
  w = dst / "model.safetensors"
  b = bytearray(w.read_bytes())
  b[-1] ^= 0x01
  w.write_bytes(bytes(b))
  return dst


@pytest.fixture
def base(tiny_assets, tmp_path):
  """(config, rewards, dataset, tokenizer) of the tiny run: the starting point every change departs from."""
  c = load_config(f"tiny:{tiny_assets}", {"reward.cache_dir": str(tmp_path / "cache")})
  return c, _rewards(classifier=_classifier(tiny_assets / "reward_model")), _dataset(4, "data-0"), Tok()


def _key(c, r, ds, tok):
  return demos.cache_key(ds, r, tok, c)


# Each change to something the demonstration rewards depend on: (name, fn(base, tmp_path) -> new args).
CHANGES = {
    "sources": lambda c, r, ds, t, tmp: (c, dataclasses.replace(r, sources=r.sources[::-1]), ds, t),
    "policy weights": lambda c, r, ds, t, tmp: (
        _set(c, "policy.path", str(_copy_with_new_weights(Path(c.policy.path), tmp / "policy"))), r, ds, t),
    "data": lambda c, r, ds, t, tmp: (c, r, _dataset(4, "data-1"), t),
    "eos id": lambda c, r, ds, t, tmp: (c, r, ds, Tok(eos_token_id=3)),
    "max_prompt_tokens": lambda c, r, ds, t, tmp: (_set(c, "data.max_prompt_tokens", 9), r, ds, t),
    "demo_max_tokens": lambda c, r, ds, t, tmp: (_set(c, "data.demo_max_tokens", 23), r, ds, t),
    "dtype": lambda c, r, ds, t, tmp: (_set(c, "model.dtype", "bfloat16"), r, ds, t),
    "classifier weights": lambda c, r, ds, t, tmp: (c, dataclasses.replace(r, classifier=dataclasses.replace(
        r.classifier, model_dir=_copy_with_new_weights(r.classifier.model_dir, tmp / "rm"))), ds, t),
    "classifier tokenizer": lambda c, r, ds, t, tmp: (c, _with_classifier(r, tokenizer_fp="tokenizer-1"), ds, t),
    "label_index": lambda c, r, ds, t, tmp: (c, _with_classifier(r, label_index=0), ds, t),
    "classifier max_tokens": lambda c, r, ds, t, tmp: (c, _with_classifier(r, max_tokens=32), ds, t),
    "classifier input": lambda c, r, ds, t, tmp: (c, _with_classifier(r, input="pair"), ds, t),
    "classifier in_graph": lambda c, r, ds, t, tmp: (c, _with_classifier(r, in_graph=False), ds, t),
    "reward function": lambda c, r, ds, t, tmp: (
        c, dataclasses.replace(r, function=rewards_lib.sentiment_words), ds, t),
}


def _set(c, key, value):
  c = c.copy_and_resolve_references()
  c.update_from_flattened_dict({key: value})
  return c


def _with_classifier(r, **changes):
  return dataclasses.replace(r, classifier=dataclasses.replace(r.classifier, **changes))


@pytest.mark.parametrize("change", list(CHANGES))
def test_cache_key_changes_with_each_input_it_names(change, base, tmp_path):
  before = _key(*base)
  after = _key(*CHANGES[change](*base, tmp_path))
  assert after != before, change
  assert len(after) == 32 and int(after, 16) >= 0


def test_cache_key_names_the_reward_function_by_its_code(base):
  c, r, ds, t = base
  one = _key(c, dataclasses.replace(r, function=rewards_lib.sentiment_words), ds, t)
  two = _key(c, dataclasses.replace(r, function=_other_function), ds, t)
  assert one != two and one == _key(c, dataclasses.replace(r, function=rewards_lib.sentiment_words), ds, t)


def test_cache_key_changes_with_a_lexicon_words_reward_counts(base, monkeypatch):
  c, _, ds, t = base
  r = _rewards(("words:sentiment",))
  before = _key(c, r, ds, t)
  lexicons = words.lexicons()
  monkeypatch.setattr(words, "lexicons", lambda: {"sentiment": {**lexicons["sentiment"], "meh": -1.0}})
  assert _key(c, r, ds, t) != before


def test_cache_key_ignores_what_the_rewards_do_not_depend_on(base, tiny_assets, tmp_path):
  """Training settings, where the cache lives, and where byte-identical models live do not matter."""
  c, r, ds, t = base
  before = _key(c, r, ds, t)
  for key, value in {"rl.beta": 0.5, "rl.objective": "max", "optim.learning_rate": 0.1, "total_steps": 3,
                     "seed": 7, "rollout.temperature": 0.5, "rollout.samples_per_prompt": 4,
                     "reward.demo_batch_size": 8, "reward.cache_dir": str(tmp_path / "elsewhere"),
                     "policy.path": str(shutil.copytree(tiny_assets / "policy", tmp_path / "policy_copy"))}.items():
    assert _key(_set(c, key, value), r, ds, t) == before, key
  rm_copy = shutil.copytree(tiny_assets / "reward_model", tmp_path / "rm_copy")
  assert _key(c, _with_classifier(r, model_dir=rm_copy), ds, t) == before


def test_cache_path_is_the_key_under_the_expanded_cache_dir():
  assert demos.cache_path("~/rewards", "abc") == Path.home() / "rewards" / "abc.npy"


# ------------------------------------------------------------------------------------------- _read


def test_read_returns_a_finite_array_of_the_expected_shape(tmp_path):
  f = tmp_path / "k.npy"
  v = np.arange(10, dtype=np.float32).reshape(5, 2)
  np.save(f, v)
  np.testing.assert_array_equal(demos._read(f, 5, 2), v)


@pytest.mark.parametrize("stored", [
    np.zeros((4, 2), np.float32),      # one example short
    np.zeros((5, 3), np.float32),      # another number of reward sources
    np.zeros((10,), np.float32),       # flattened
    np.array([[0.0, 1.0]] * 4 + [[np.nan, 1.0]], np.float32),
    np.array([[0.0, 1.0]] * 4 + [[0.0, -np.inf]], np.float32),
], ids=["rows", "sources", "flat", "nan", "inf"])
def test_read_rejects_wrong_shapes_and_non_finite_values(stored, tmp_path):
  f = tmp_path / "k.npy"
  np.save(f, stored)
  assert demos._read(f, 5, 2) is None


def test_read_rejects_missing_truncated_garbage_and_pickled_files(tmp_path):
  f = tmp_path / "k.npy"
  assert demos._read(f, 5, 2) is None
  np.save(f, np.ones((5, 2), np.float32))
  whole = f.read_bytes()
  for cut in (len(whole) - 4, 20):
    f.write_bytes(whole[:cut])
    assert demos._read(f, 5, 2) is None, cut
  f.write_bytes(b"not a numpy file at all")
  assert demos._read(f, 5, 2) is None
  np.save(f, np.array([[{}] * 2] * 5, dtype=object), allow_pickle=True)
  assert demos._read(f, 5, 2) is None


def test_read_treats_an_empty_file_as_a_miss(tmp_path):
  f = tmp_path / "k.npy"
  f.write_bytes(b"")
  assert demos._read(f, 5, 2) is None


# ------------------------------------------------------------------------------------------ _write


def test_write_then_read_round_trips_and_replaces_the_old_values(tmp_path):
  f = tmp_path / "sub" / "k.npy"  # the directory is created
  old, new = np.ones((5, 2), np.float32), np.full((5, 2), 2.0, np.float32)
  demos._write(f, old)
  np.testing.assert_array_equal(demos._read(f, 5, 2), old)
  demos._write(f, new)
  np.testing.assert_array_equal(demos._read(f, 5, 2), new)


def test_a_write_that_fails_halfway_leaves_the_old_cache_whole(tmp_path, monkeypatch):
  f = tmp_path / "k.npy"
  old, new = np.ones((5, 2), np.float32), np.full((5, 2), 2.0, np.float32)
  demos._write(f, old)
  real_save = np.save
  seen = []

  def save_half_then_fail(fh, values, allow_pickle):
    real_save(fh, values, allow_pickle=allow_pickle)
    fh.truncate(fh.tell() // 2)
    # Mid-write, a reader of the cache still finds the old values, complete.
    seen.append(demos._read(f, 5, 2))
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(np, "save", save_half_then_fail)
  demos._write(f, new)  # a warning, not an error: the run goes on without the cache
  monkeypatch.undo()
  np.testing.assert_array_equal(seen[0], old)
  np.testing.assert_array_equal(demos._read(f, 5, 2), old)

  g = tmp_path / "fresh.npy"  # no old cache: none is left behind, rather than half of one
  monkeypatch.setattr(np, "save", save_half_then_fail)
  demos._write(g, new)
  assert not g.exists()


# -------------------------------------------------------------------------------------- rewards_for


def test_rewards_for_scores_each_dataset_once_then_reads_the_cache(base, monkeypatch):
  c, r, _, t = base
  train, val = _dataset(6, "train-0"), _dataset(3, "val-0")
  calls = []

  def counting_score(ds, progs, parts, frozen, rewards, tokenizer, config):
    calls.append(ds.fingerprint)  # each call returns new values: a cache hit must return the old ones
    return np.full((len(ds), len(rewards.names)), float(len(calls)), np.float32)

  monkeypatch.setattr(demos, "score", counting_score)
  args = (None, None, None, r, t, c)
  first = demos.rewards_for((train, val), *args)
  assert calls == ["train-0", "val-0"]
  assert [x.shape for x in first] == [(6, 2), (3, 2)]
  second = demos.rewards_for((train, val), *args)
  assert calls == ["train-0", "val-0"]  # nothing scored again
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)

  # A damaged cache file is scored again; the other dataset still comes from the cache.
  np.save(demos.cache_path(c.reward.cache_dir, demos.cache_key(val, r, t, c)), np.full((3, 2), np.nan, np.float32))
  third = demos.rewards_for((train, val), *args)
  assert calls == ["train-0", "val-0", "val-0"]
  np.testing.assert_array_equal(third[0], first[0])
  np.testing.assert_array_equal(third[1], np.full((3, 2), 3.0, np.float32))

  # Another demonstration length is another cache entry.
  demos.rewards_for((train,), None, None, None, r, t, _set(c, "data.demo_max_tokens", 16))
  assert calls[-1] == "train-0" and len(calls) == 4
